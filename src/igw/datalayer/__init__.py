"""Side lane: what igw knows about the endpoints (the pool, their metrics, their load)."""
