"""Names of the Endpoint Picker protocol (headers and metadata shared with the proxy)."""

from __future__ import annotations

DESTINATION_HEADER = "x-gateway-destination-endpoint"
"""EPP -> proxy: ``ip:port[,ip:port...]``; the first is the pick, the rest are fallbacks."""
LB_METADATA_NAMESPACE = "envoy.lb"
"""Dynamic-metadata namespace carrying the destination (same value as the header)."""
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
"""Proxy -> EPP: the endpoints the proxy allows for this request (absent: all)."""
SERVED_KEY = "x-gateway-destination-endpoint-served"
"""Proxy -> EPP on the response path: the endpoint that actually served the request."""
REQUEST_ID_HEADER = "x-request-id"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
"""Client -> EPP: send the request to the server under this model name (the response keeps the
client's name)."""
FAIRNESS_ID_HEADER = "x-gateway-inference-fairness-id"
