"""igw: an inference gateway for self-hosted LLMs."""
