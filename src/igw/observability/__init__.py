"""Side lane: Prometheus metrics, health, logging."""
