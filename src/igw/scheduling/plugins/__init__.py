"""Built-in scheduling plugins, one per module; importing this package registers them all."""

from igw.scheduling.plugins import (
    availability_filter,
    inflight_scorer,
    kv_cache_scorer,
    label_selector_filter,
    load_aware_scorer,
    lora_affinity_scorer,
    max_score_picker,
    prefix_producer,
    prefix_scorer,
    profile_handler,
    queue_scorer,
    random_picker,
    running_requests_scorer,
    session_affinity_scorer,
    token_load,
    weighted_random_picker,
)

__all__ = [
    "availability_filter",
    "inflight_scorer",
    "kv_cache_scorer",
    "label_selector_filter",
    "load_aware_scorer",
    "lora_affinity_scorer",
    "max_score_picker",
    "prefix_producer",
    "prefix_scorer",
    "profile_handler",
    "queue_scorer",
    "random_picker",
    "running_requests_scorer",
    "session_affinity_scorer",
    "token_load",
    "weighted_random_picker",
]
