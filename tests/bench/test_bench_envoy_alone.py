"""Arm A's Envoy bootstrap: a static least-request pool of the given backends, no ext_proc."""

from __future__ import annotations

import json

from igw_bench.envoy_alone import envoy_alone_bootstrap


def test_bootstrap_proxies_to_every_backend_without_ext_proc() -> None:
    config = envoy_alone_bootstrap(8000, 9000, ["127.0.0.1:7001", "127.0.0.1:7002"])
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8000}
    assert config["admin"]["address"]["socket_address"]["port_value"] == 9000
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [7001, 7002]
    assert "ext_proc" not in json.dumps(config)
