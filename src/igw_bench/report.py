"""A comparison's report: JSON (everything), a Markdown table (per rate and arm, then ratios against a
reference arm) and PNG plots (TTFT p90 and output tokens/s against the rate), side by side in one
directory under ``benchmarks/results/``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

__all__ = ["format_markdown", "plot", "write_report"]


def _num(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _secs(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _measured(arm: dict[str, Any]) -> dict[float, dict[str, Any]]:
    return {s["qps"]: s for s in arm.get("steps", []) if "skipped" not in s}


def format_markdown(report: dict[str, Any], *, reference: str | None = None) -> str:
    """The report as Markdown; ratios are ``reference`` (default: the first igw arm) over each other arm."""
    wl, fleet = report["workload"], report["fleet"]
    lines = [
        f"### {report['benchmark']}: {wl['spec']} ({report['started']})",
        "",
        f"Workload: {wl['description']}. Steps of {wl['step_s']:g} simulated s at {', '.join(f'{q:g}' for q in wl['qps'])} "
        f"QPS after a {wl['warmup_s']:g} s warm-up at {wl['warmup_qps']:g} QPS (not measured); seed {wl['seed']}.",
        f"Fleet: {fleet['servers']} x {fleet['kind']}, profile {fleet['profile']}, {fleet['kv_blocks']} KV blocks each, "
        f"time dilation {fleet['time_dilation']:g} (times below are simulated: real / dilation).",
        f"Machine: {report['machine']['cpus']} CPUs, load average at the end {report['machine']['load_avg'][0]:.1f}.",
        "",
        "| QPS | arm | out tok/s | req/s | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | e2e p90 | hit (usage) "
        "| hit (server) | hotspot | gw CPU ms/req | gw RSS MiB | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    arms = report["arms"]
    qps_values = wl["qps"]
    for q in qps_values:
        for arm in arms:
            if "error" in arm:
                continue
            step = next((s for s in arm["steps"] if s["qps"] == q), None)
            if step is None:
                continue
            if "skipped" in step:
                lines.append(f"| {q:g} | {arm['arm']} | {step['skipped']} |" + " |" * 12)
                continue
            lines.append(
                f"| {q:g} | {arm['arm']} | {_num(step['output_tokens_per_s'], ',.0f')} | {_num(step['requests_per_s'], '.2f')} "
                f"| {_secs(step['ttft_s']['p50'])} | {_secs(step['ttft_s']['p90'])} | {_secs(step['ttft_s']['p99'])} "
                f"| {_secs(step['itl_s']['p50'])} | {_secs(step['e2e_s']['p90'])} | {step['hit_rate_usage']:.1%} "
                f"| {step['hit_rate_server']:.1%} | {_num(step['hotspot'], '.2f')} "
                f"| {_num(step['gateway_cpu_ms_per_request'], '.2f')} | {_num(step['gateway_rss_mib'], '.0f')} "
                f"| {step['failed']} |"
            )
    lines.extend(f"\n{arm['arm']}: failed to run: {arm['error']}" for arm in arms if "error" in arm)
    ref_name = reference or next((a["arm"] for a in arms if a["arm"].startswith("igw") and "error" not in a), None)
    ref = next((a for a in arms if a["arm"] == ref_name), None)
    if ref is not None:
        others = [a for a in arms if a is not ref and "error" not in a]
        lines += [
            "",
            f"Ratios, {ref_name} / each arm (output tokens/s: higher is better for {ref_name}; TTFT p90: lower is).",
            "",
            "| QPS | " + " | ".join(f"vs {a['arm']}: tok/s · TTFT p90" for a in others) + " |",
            "|---|" + "---|" * len(others),
        ]
        mine = _measured(ref)
        for q in qps_values:
            cells = []
            for other in others:
                theirs = _measured(other).get(q)
                own = mine.get(q)
                if own is None or theirs is None:
                    cells.append("-")
                    continue
                tok = (
                    own["output_tokens_per_s"] / theirs["output_tokens_per_s"]
                    if theirs["output_tokens_per_s"]
                    else math.nan
                )
                ttft = own["ttft_s"]["p90"] / theirs["ttft_s"]["p90"] if theirs["ttft_s"]["p90"] else math.nan
                cells.append(f"{_ratio(tok)} · {_ratio(ttft)}")
            lines.append(f"| {q:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """TTFT p90 and output tokens/s against QPS, one line per arm, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tok) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in report["arms"]:
        steps = sorted(_measured(arm).values(), key=lambda s: s["qps"])
        if not steps:
            continue
        qps = [s["qps"] for s in steps]
        ax_ttft.plot(qps, [s["ttft_s"]["p90"] for s in steps], marker="o", label=arm["arm"])
        ax_tok.plot(qps, [s["output_tokens_per_s"] for s in steps], marker="o", label=arm["arm"])
    ax_ttft.set(xlabel="QPS (simulated)", ylabel="TTFT p90 (s, log)", yscale="log", title="TTFT p90 vs QPS")
    ax_tok.set(xlabel="QPS (simulated)", ylabel="output tokens/s", title="Throughput vs QPS")
    for ax in (ax_ttft, ax_tok):
        ax.grid(True, alpha=0.3)
    ax_tok.legend(fontsize=8)
    fig.suptitle(f"{report['workload']['spec']} — {report['fleet']['servers']} servers ({report['started']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``compare-<workload>-<time>.json``, ``.md`` and ``.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["workload"]["spec"].split(":")[0]
    stamp = report["started"].replace("-", "").replace(":", "").replace("+0000", "Z")
    stem = out_dir / f"compare-{name}-{stamp}"
    json_path = stem.with_suffix(".json")
    json_path.write_bytes(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2))
    md_path = stem.with_suffix(".md")
    md_path.write_text(format_markdown(report))
    return [json_path, md_path, plot(report, stem.with_suffix(".png"))]
