"""Pool file: short and mapping forms, defaults, validation errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from igw.api.types import Endpoint, Engine
from igw.config.pool import ConfigError, PoolSpec, load_pool, parse_pool, pool_from_addresses


def test_defaults_for_an_empty_pool() -> None:
    spec = parse_pool({})
    assert spec == PoolSpec()
    assert (spec.name, spec.engine, spec.models, spec.endpoints) == ("default", None, None, [])
    assert spec.build() == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"endpoints": ["10.0.0.1:8000"]},
            [Endpoint("10.0.0.1:8000", "10.0.0.1", 8000, None, None, ())],
        ),
        (
            {"engine": "sglang", "models": ["m"], "endpoints": ["10.0.0.1:8000", "10.0.0.2:9000"]},
            [
                Endpoint("10.0.0.1:8000", "10.0.0.1", 8000, Engine.SGLANG, frozenset({"m"}), ()),
                Endpoint("10.0.0.2:9000", "10.0.0.2", 9000, Engine.SGLANG, frozenset({"m"}), ()),
            ],
        ),
        (
            {
                "models": ["pool-model"],
                "endpoints": [
                    {"address": "10.0.0.1:8000"},
                    {
                        "address": "10.0.0.2:8000",
                        "engine": "trtllm-serve",
                        "models": ["own"],
                        "labels": {"zone": "b", "rack": "r1"},
                    },
                ],
            },
            [
                Endpoint("10.0.0.1:8000", "10.0.0.1", 8000, None, frozenset({"pool-model"}), ()),
                Endpoint(
                    "10.0.0.2:8000",
                    "10.0.0.2",
                    8000,
                    Engine.TRTLLM_SERVE,
                    frozenset({"own"}),
                    (("rack", "r1"), ("zone", "b")),
                ),
            ],
        ),
        (
            {"models": ["pool-model"], "endpoints": [{"address": "10.0.0.1:8000", "models": []}]},
            [Endpoint("10.0.0.1:8000", "10.0.0.1", 8000, None, frozenset(), ())],
        ),
        (
            {"endpoints": ["[::1]:8000", {"address": "[fd00::2]:8001"}]},
            [
                Endpoint("[::1]:8000", "::1", 8000, None, None, ()),
                Endpoint("[fd00::2]:8001", "fd00::2", 8001, None, None, ()),
            ],
        ),
        (
            {"endpoints": [" localhost:8000 ", "10.0.0.1:08001"]},
            [
                Endpoint("localhost:8000", "localhost", 8000, None, None, ()),
                Endpoint("10.0.0.1:8001", "10.0.0.1", 8001, None, None, ()),
            ],
        ),
    ],
    ids=["short-form", "pool-defaults", "mapping-overrides", "explicit-empty-models", "ipv6", "normalised"],
)
def test_parse_pool_builds_endpoints(raw: dict[str, Any], expected: list[Endpoint]) -> None:
    assert parse_pool(raw).build() == expected


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        ({"endpoints": ["10.0.0.1:8000", "10.0.0.1:8000"]}, ["10.0.0.1:8000", "twice"]),
        ({"endpoints": ["10.0.0.1:8000", {"address": "10.0.0.1:08000"}]}, ["10.0.0.1:8000", "twice"]),
        ({"endpoints": ["[::1]:80", "[::1]:80"]}, ["[::1]:80", "twice"]),
        ({"endpoints": ["nonsense"]}, ["endpoints.0.address", "nonsense", "host:port"]),
        ({"endpoints": ["10.0.0.1:8000", "10.0.0.2"]}, ["endpoints.1.address", "10.0.0.2"]),
        ({"endpoints": [{"address": "10.0.0.1:0"}]}, ["endpoints.0.address", "out of range"]),
        ({"endpoints": [{"address": "10.0.0.1:65536"}]}, ["endpoints.0.address", "out of range"]),
        ({"endpoints": ["10.0.0.1:http"]}, ["endpoints.0.address", "host:port"]),
        ({"endpoints": [":8000"]}, ["endpoints.0.address", "host:port"]),
        ({"endpoints": ["::1:8000"]}, ["endpoints.0.address", "IPv6"]),
        ({"endpoints": ["[::1:8000"]}, ["endpoints.0.address", "brackets"]),
        ({"endpoints": [8000]}, ["endpoints.0"]),
        ({"endpoints": "10.0.0.1:8000"}, ["endpoints"]),
        ({"endpointz": ["10.0.0.1:8000"]}, ["endpointz", "Extra inputs"]),
        ({"endpoints": [{"address": "10.0.0.1:8000", "zone": "a"}]}, ["endpoints.0.zone", "Extra inputs"]),
        ({"engine": "ollama"}, ["engine", "vllm"]),
        ({"endpoints": [{"address": "10.0.0.1:8000", "engine": "x"}]}, ["endpoints.0.engine"]),
        ({"models": "m"}, ["models"]),
        ([{"address": "10.0.0.1:8000"}], ["(top)"]),
    ],
    ids=[
        "duplicate",
        "duplicate-after-normalisation",
        "duplicate-ipv6",
        "not-host-port",
        "second-missing-port",
        "port-zero",
        "port-too-big",
        "port-not-number",
        "no-host",
        "bare-ipv6",
        "unbalanced-bracket",
        "endpoint-not-string-or-mapping",
        "endpoints-not-a-list",
        "unknown-top-key",
        "unknown-endpoint-key",
        "unknown-engine",
        "unknown-endpoint-engine",
        "models-not-a-list",
        "top-level-list",
    ],
)
def test_parse_pool_errors_name_the_problem(raw: Any, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pool(raw, source="pool.yaml")
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    if "twice" not in needles:
        assert message.startswith("pool.yaml: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", PoolSpec()),
        ("# nothing but a comment\n", PoolSpec()),
        ("endpoints:\n  - 10.0.0.1:8000\n", parse_pool({"endpoints": ["10.0.0.1:8000"]})),
        (
            'name: p\nengine: sglang\nmodels: [m]\nendpoints:\n  - "[::1]:8000"\n'
            "  - {address: 10.0.0.2:8000, engine: vllm, labels: {zone: a}}\n",
            parse_pool(
                {
                    "name": "p",
                    "engine": "sglang",
                    "models": ["m"],
                    "endpoints": [
                        "[::1]:8000",
                        {"address": "10.0.0.2:8000", "engine": "vllm", "labels": {"zone": "a"}},
                    ],
                }
            ),
        ),
    ],
    ids=["empty-file", "comment-only", "short-form", "mixed-forms"],
)
def test_load_pool(tmp_path: Path, text: str, expected: PoolSpec) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    assert load_pool(path) == expected
    assert load_pool(str(path)) == expected


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("endpoints: [10.0.0.1:8000\n", ["not valid YAML"]),
        ("endpoints:\n  - [::1]:8000\n", ["not valid YAML"]),
        ("endpoints:\n\t- a\n", ["not valid YAML"]),
        ("endpoints:\n  - 10.0.0.1:8000\n  - 10.0.0.1:8000\n", ["twice"]),
        ("endpoints:\n  - nonsense\n", ["endpoints.0.address"]),
        ("- 10.0.0.1:8000\n", ["(top)"]),
        ("extra: 1\n", ["extra", "Extra inputs"]),
    ],
    ids=["unclosed-flow", "unquoted-ipv6", "tab-indent", "duplicate", "bad-address", "top-level-list", "unknown-key"],
)
def test_load_pool_errors(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pool(path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    if "twice" not in needles:
        assert str(path) in message


def test_load_pool_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.yaml"
    with pytest.raises(ConfigError, match="cannot read pool file") as info:
        load_pool(path)
    assert str(path) in str(info.value)


def test_load_pool_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read pool file"):
        load_pool(tmp_path)


@pytest.mark.parametrize(
    ("addresses", "kwargs", "expected_addresses"),
    [
        (["10.0.0.1:8000"], {}, ["10.0.0.1:8000"]),
        (
            ["[::1]:8000", "127.0.0.1:8001"],
            {"engine": Engine.SGLANG, "models": ["m"]},
            ["[::1]:8000", "127.0.0.1:8001"],
        ),
    ],
    ids=["one", "engine-and-models"],
)
def test_pool_from_addresses(addresses: list[str], kwargs: dict[str, Any], expected_addresses: list[str]) -> None:
    spec = pool_from_addresses(addresses, name="flags", **kwargs)
    built = spec.build()
    assert [e.address for e in built] == expected_addresses
    assert spec.name == "flags"
    assert all(e.engine == kwargs.get("engine") for e in built)
    models = kwargs.get("models")
    assert all(e.models == (frozenset(models) if models else None) for e in built)


def test_pool_from_addresses_error_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--endpoint: endpoints\.0\.address"):
        pool_from_addresses(["bad"])
