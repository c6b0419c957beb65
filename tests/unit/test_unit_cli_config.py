"""``igw config validate``: the effective configuration, or a one-line error and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from igw.cli import main

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_validate_prints_the_effective_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(EXAMPLES / "config" / "reference-v1.3.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ")
    effective = yaml.safe_load(out)
    assert effective["saturationDetector"] == {"pluginRef": "utilization-detector"}
    assert effective["profileHandler"] == "single-profile-handler"
    assert effective["dataProducers"] == ["approx-prefix-cache-producer"]
    utilization = next(p for p in effective["plugins"] if p["type"] == "utilization-detector")
    assert utilization["parameters"]["metricsStalenessThreshold"] == pytest.approx(0.2)


def test_validate_with_a_pool_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["config", "validate", str(EXAMPLES / "config" / "guarded.yaml"), "--pool", str(EXAMPLES / "pool.yaml")]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("plugins:\n- type: nope-scorer\n", "unknown plugin type 'nope-scorer'"),
        ("plugins:\n- type: queue-scorer\n  parameters: {x: 1}\n", "plugin 'queue-scorer' (type queue-scorer)"),
        ("kind: Pod\n", "kind must be EndpointPickerConfig"),
    ],
    ids=["unknown-type", "bad-parameter", "wrong-kind"],
)
def test_validate_reports_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["config", "validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"igw: error: {path}: ")
    assert fragment in captured.err
    assert "Traceback" not in captured.err


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read configuration file" in capsys.readouterr().err


def test_validate_checks_the_data_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "two-sources.yaml"
    path.write_text(
        "plugins:\n- type: metrics-data-source\n  name: a\n- type: metrics-data-source\n  name: b\n"
        "dataLayer:\n  sources: [{pluginRef: a}, {pluginRef: b}]\n"
    )
    assert main(["config", "validate", str(path)]) == 2
    assert "one metrics data source, 2 given" in capsys.readouterr().err
    path.write_text(
        "plugins:\n- type: core-metrics-extractor\n  parameters:\n    defaultEngine: sglang\n"
        "    engineConfigs: [{name: mine, queuedRequestsSpec: 'my_queue{kind=\"waiting\"}'}]\n"
        "dataLayer:\n  sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: core-metrics-extractor}]}]\n"
    )
    assert main(["config", "validate", str(path), "--quiet"]) == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--endpoint", "127.0.0.1:1", "--no-envoy", "--kubeconfig", "/x"], "--kubeconfig: Kubernetes-mode flags"),
        (["--pool-name", "p"], "add --no-envoy"),
        (["--endpoint", "127.0.0.1:1", "--cert-path", "/x"], "go with --secure-serving"),
        (["--pool-name", "p", "--no-envoy", "--endpoint-target-ports", "x"], "not a list of port numbers"),
    ],
    ids=["stray-kube-flag", "kube-without-no-envoy", "cert-without-tls", "bad-ports"],
)
def test_run_flag_mistakes_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err
