"""igw_bench: benchmark harness (talks to everything over the network)."""
