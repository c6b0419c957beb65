"""Plain types and errors shared by every layer; imports nothing else from igw."""
