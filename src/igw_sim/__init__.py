"""igw_sim: a vLLM-compatible simulator (imports nothing from igw)."""
