"""Foundation: plugin contracts and the registry. Imports only ``igw.api``."""
