"""A comparison's report: the Markdown tables (rows, skipped steps, ratios) and the files written."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from igw_bench.report import format_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = 15


def _step(qps: float, tok: float, ttft_p90: float, **extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {
        "qps": qps,
        "requests": 100,
        "ok": 100,
        "failed": 0,
        "errors": {},
        "span_s": 10.0,
        "output_tokens_per_s": tok,
        "requests_per_s": 10.0,
        "ttft_s": {"p50": ttft_p90 / 2, "p90": ttft_p90, "p99": ttft_p90 * 2},
        "itl_s": {"p50": 0.01, "p90": 0.02},
        "e2e_s": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        "hit_rate_usage": 0.5,
        "hit_rate_server": 0.25,
        "preemptions": 0.0,
        "endpoint_share": {"a": 0.5, "b": 0.5},
        "hotspot": 1.0,
        "gateway_cpu_cores": 0.1,
        "gateway_cpu_ms_per_request": 1.5,
        "gateway_rss_mib": 100.0,
        "wall_s": 50.0,
    }
    step.update(extra)
    return step


WORKLOAD = {"spec": "w4:groups=4", "description": "w4: 4 groups", "qps": [10.0, 20.0, 30.0], "step_s": 20.0,
            "warmup_s": 10.0, "warmup_qps": 20.0, "seed": 1}  # fmt: skip
FLEET = {"kind": "simulated vLLM (igw sim)", "servers": 8, "profile": "h100-llama3-8b", "kv_blocks": 8192,
         "time_dilation": 5.0, "loras": [], "max_loras": None}  # fmt: skip


def _report() -> dict[str, Any]:
    return {
        "benchmark": "igw bench compare",
        "started": "2026-01-02T03:04:05+00:00",
        "finished": "2026-01-02T04:00:00+00:00",
        "workload": dict(WORKLOAD),
        "fleet": dict(FLEET),
        "machine": {"cpus": 4, "python": "3.11", "load_avg": [1.0, 1.0, 1.0]},
        "arms": [
            {
                "arm": "igw",
                "steps": [
                    _step(10.0, 1000.0, 0.2),
                    _step(20.0, 1800.0, 0.5),
                    {"qps": 30.0, "skipped": "saturated at 20 QPS"},
                ],
            },
            {
                "arm": "envoy-lr",
                "steps": [_step(10.0, 500.0, 0.4), _step(20.0, 900.0, 1.0), _step(30.0, 1000.0, 2.0)],
            },
            {"arm": "vllm-router:cache_aware", "error": "did not start", "steps": []},
        ],
    }


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table: its rows (header first, separator left out) as lists of cell texts."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in markdown.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not line.startswith("|---"):
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


def test_the_main_table_has_a_row_per_rate_and_arm_that_ran() -> None:
    main = _tables(format_markdown(_report()))[0]
    header, rows = main[0], main[1:]
    assert header[:2] == ["QPS", "arm"]
    assert len(header) == COLUMNS
    assert [(r[0], r[1]) for r in rows] == [
        ("10", "igw"), ("10", "envoy-lr"), ("20", "igw"), ("20", "envoy-lr"), ("30", "igw"), ("30", "envoy-lr"),
    ]  # fmt: skip
    assert all(len(r) == COLUMNS for r in rows)


def test_a_row_shows_the_steps_figures() -> None:
    main = _tables(format_markdown(_report()))[0]
    header, rows = main[0], main[1:]
    row = dict(zip(header, rows[1], strict=True))  # 10 QPS, envoy-lr
    assert row["out tok/s"] == "500"
    assert row["TTFT p50"] == "200 ms"
    assert row["TTFT p90"] == "400 ms"
    assert row["TTFT p99"] == "800 ms"
    assert row["e2e p90"] == "2.00 s"
    assert row["hit (usage)"] == "50.0%"
    assert row["hit (server)"] == "25.0%"
    assert row["failed"] == "0"


def test_a_skipped_step_is_a_row_that_says_why() -> None:
    rows = _tables(format_markdown(_report()))[0][1:]
    skipped = next(r for r in rows if r[:2] == ["30", "igw"])
    assert skipped[2] == "saturated at 20 QPS"
    assert skipped[3:] == [""] * (COLUMNS - 3)


def test_an_arm_that_failed_is_named_with_its_error_and_has_no_rows() -> None:
    markdown = format_markdown(_report())
    assert "vllm-router:cache_aware: failed to run: did not start" in markdown
    assert all(r[1] != "vllm-router:cache_aware" for r in _tables(markdown)[0][1:])


def test_missing_values_show_as_dashes() -> None:
    report = _report()
    report["arms"][1]["steps"][0].update(
        hotspot=math.nan, gateway_cpu_ms_per_request=None, gateway_rss_mib=None, ttft_s={"p50": math.nan,
        "p90": math.nan, "p99": None}
    )  # fmt: skip
    main = _tables(format_markdown(report))[0]
    row = dict(zip(main[0], main[2], strict=True))
    assert row["arm"] == "envoy-lr"
    for column in ("hotspot", "gw CPU ms/req", "gw RSS MiB", "TTFT p50", "TTFT p90", "TTFT p99"):
        assert row[column] == "-", column


def test_ratios_are_the_igw_arm_over_each_other_arm_that_ran() -> None:
    tables = _tables(format_markdown(_report()))
    assert len(tables) == 2
    header, *rows = tables[1]
    assert header == ["QPS", "vs envoy-lr: tok/s · TTFT p90"]
    assert rows == [["10", "2.00x · 0.50x"], ["20", "2.00x · 0.50x"], ["30", "-"]]


def test_ratios_against_another_reference() -> None:
    header, *rows = _tables(format_markdown(_report(), reference="envoy-lr"))[1]
    assert header == ["QPS", "vs igw: tok/s · TTFT p90"]
    assert rows[0] == ["10", "0.50x · 2.00x"]


def test_the_first_igw_arm_that_ran_is_the_default_reference() -> None:
    report = _report()
    report["arms"].insert(0, {"arm": "igw:broken", "error": "bad config", "steps": []})
    report["arms"].append({"arm": "igw:other", "steps": [_step(10.0, 250.0, 0.1)]})
    header = _tables(format_markdown(report))[1][0]
    assert header == ["QPS", "vs envoy-lr: tok/s · TTFT p90", "vs igw:other: tok/s · TTFT p90"]


def test_without_an_igw_arm_there_are_no_ratios() -> None:
    report = _report()
    report["arms"] = report["arms"][1:]
    markdown = format_markdown(report)
    assert "Ratios" not in markdown
    assert len(_tables(markdown)) == 1


def test_a_zero_denominator_is_a_dash_not_a_crash() -> None:
    report = _report()
    report["arms"][1]["steps"][0].update(output_tokens_per_s=0.0, ttft_s={"p50": 0.0, "p90": 0.0, "p99": 0.0})
    qps, cell = _tables(format_markdown(report))[1][1]
    assert qps == "10"
    assert "-" in cell
    assert not any(c.isdigit() for c in cell)


def test_the_text_names_the_workload_fleet_and_dilation() -> None:
    markdown = format_markdown(_report())
    assert "w4:groups=4" in markdown
    assert "10, 20, 30" in markdown
    assert "8 x simulated vLLM (igw sim)" in markdown
    assert "time dilation 5" in markdown


@pytest.mark.timeout(60)
def test_write_report_writes_json_markdown_and_png_side_by_side(tmp_path: Path) -> None:
    report = _report()
    report["arms"][1]["steps"][2]["hotspot"] = math.nan
    original = copy.deepcopy(report)
    out = tmp_path / "nested" / "results"

    paths = write_report(report, out)

    stem = "compare-w4-20260102T030405Z"
    assert [p.name for p in paths] == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    assert all(p.parent == out for p in paths)
    json_path, md_path, png_path = paths
    data = json.loads(json_path.read_text())
    assert data["arms"][0]["arm"] == "igw"
    assert data["arms"][1]["steps"][2]["hotspot"] is None  # NaN is not JSON: null
    assert data["workload"] == original["workload"]
    assert md_path.read_text() == format_markdown(original)
    assert png_path.read_bytes().startswith(PNG_MAGIC)
    assert png_path.stat().st_size > 1000
