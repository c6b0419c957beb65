"""``igw bench scrape`` end to end, tiny: it measures the EPP's CPU while it scrapes."""

from __future__ import annotations

from igw_bench.procs import run_loop
from igw_bench.scrape import ScrapeOptions, format_table, run_scrape


def test_scrape_benchmark_reports_a_cost_per_fleet_size() -> None:
    rows = run_loop(run_scrape(ScrapeOptions(endpoints=(2, 4), duration_s=1.0, warmup_s=0.5)))
    assert [r["endpoints"] for r in rows] == [2, 4]
    for r in rows:
        assert 0 < r["core_share"] < 1.5
        assert r["cpu_us_per_scrape"] > 0
    assert "| 4 | 50 ms |" in format_table(rows)
