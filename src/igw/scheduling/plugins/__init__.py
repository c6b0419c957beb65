"""Built-in scheduling plugins, one per module; importing this package registers them all."""

from igw.scheduling.plugins import (
    availability_filter,
    inflight_scorer,
    kv_cache_scorer,
    max_score_picker,
    queue_scorer,
)

__all__ = ["availability_filter", "inflight_scorer", "kv_cache_scorer", "max_score_picker", "queue_scorer"]
