"""The ``igw`` command. The only module that calls ``sys.exit``.

Subcommands: ``run`` (EPP + Envoy in front of your servers), ``demo`` (the same in front of a
simulated fleet, with traffic), ``config validate`` (check an EndpointPickerConfig), ``sim``
(the vLLM simulator), ``bench`` (benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from igw.api.types import Engine


def _size(text: str) -> int:
    units = {"k": 1024, "ki": 1024, "m": 1024**2, "mi": 1024**2, "g": 1024**3, "gi": 1024**3}
    t = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * units[suffix])
    return int(t)


def _add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run the Endpoint Picker and Envoy in front of a pool of model servers")
    src = p.add_argument_group("pool (one of; the Kubernetes sources need --no-envoy)")
    src.add_argument("--pool", metavar="FILE", help="pool YAML file (name, engine, models, endpoints)")
    src.add_argument("--endpoint", metavar="HOST:PORT", action="append", default=[], help="a model server (repeat)")
    src.add_argument("--engine", choices=[e.value for e in Engine], default=None,
                     help="with --endpoint (default vllm)")  # fmt: skip
    src.add_argument("--model", action="append", default=None, help="served model name, with --endpoint (repeat)")
    k8s = p.add_argument_group("Kubernetes mode (docs/kubernetes.md)")
    k8s.add_argument("--pool-name", help="serve this InferencePool (its pods become the endpoints)")
    k8s.add_argument("--pool-namespace", help="default: $NAMESPACE, else the service account's namespace")
    k8s.add_argument("--pool-group", default="inference.networking.k8s.io",
                     help="InferencePool API group (inference.networking.x-k8s.io: the v1alpha2 pools)")  # fmt: skip
    k8s.add_argument("--endpoint-selector", metavar="K=V,...", help="without CRDs: pods with these labels")
    k8s.add_argument("--endpoint-target-ports", metavar="PORT[,PORT]", action="append", default=[],
                     help="with --endpoint-selector: the model-server ports (1 to 8)")  # fmt: skip
    k8s.add_argument("--kubeconfig", help="default: in-cluster in a pod, else $KUBECONFIG or ~/.kube/config")
    k8s.add_argument("--kube-context", help="a kubeconfig context other than the current one")
    k8s.add_argument("--ha-enable-leader-election", action="store_true",
                     help="active-passive replicas: only the Lease holder reports ready")  # fmt: skip
    k8s.add_argument("--ha-lease-name", help="default: igw-epp-<pool name>")
    k8s.add_argument("--ha-lease-namespace", help="default: the pool's namespace")
    k8s.add_argument("--ha-lease-duration", type=float, default=15.0, help="seconds")
    k8s.add_argument("--ha-renew-deadline", type=float, default=10.0, help="seconds")
    k8s.add_argument("--ha-retry-period", type=float, default=2.0, help="seconds")
    k8s.add_argument("--no-legacy-inference-models", action="store_true",
                     help="do not read v1alpha2 InferenceModel resources")  # fmt: skip
    gw = p.add_argument_group("gateway (Envoy)")
    gw.add_argument("--listen", default="127.0.0.1:8081", metavar="HOST:PORT", help="where clients connect")
    gw.add_argument("--admin-port", type=int, default=19000, help="Envoy admin port (loopback)")
    gw.add_argument("--body-mode", choices=["buffered", "duplex"], default="buffered",
                    help="ext_proc request body mode: BUFFERED or FULL_DUPLEX_STREAMED (needs --fail-close)")  # fmt: skip
    gw.add_argument("--upstream", choices=["override-host", "original-dst"], default="override-host",
                    help="how Envoy follows the pick (override-host: pool members only, with fallbacks)")  # fmt: skip
    gw.add_argument("--fail-close", action="store_true",
                    help="answer 503 when the EPP is down (default: fail open to least-request balancing)")  # fmt: skip
    gw.add_argument("--no-response-headers", action="store_true",
                    help="buffered mode: don't send response headers to the EPP (fewer messages; no status, "
                         "time-to-first-byte or served-endpoint correction)")  # fmt: skip
    gw.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    gw.add_argument("--no-envoy", action="store_true", help="run only the EPP (your gateway connects to it)")
    cfg = p.add_argument_group("scheduling (EndpointPickerConfig; default: queue 2, kv-cache 2, prefix 3)")
    one = cfg.add_mutually_exclusive_group()
    one.add_argument("--config-file", metavar="FILE", help="EndpointPickerConfig YAML file")
    one.add_argument("--config-text", metavar="YAML", help="EndpointPickerConfig as inline YAML")
    cfg.add_argument("--decision-header", action="store_true",
                     help="answer a request's x-igw-explain header with the decision in x-igw-decision")  # fmt: skip
    cfg.add_argument("--recent-decisions", type=int, default=64,
                     help="decisions kept for /debug/decisions on the metrics port (0: none)")  # fmt: skip
    epp = p.add_argument_group("endpoint picker")
    epp.add_argument("--host", default="127.0.0.1", help="EPP bind address (0.0.0.0 in a cluster)")
    epp.add_argument("--grpc-port", type=int, default=9002)
    epp.add_argument("--grpc-health-port", type=int, default=9003)
    epp.add_argument("--metrics-port", type=int, default=9090)
    epp.add_argument("--secure-serving", action="store_true",
                     help="TLS on the ext_proc port (gateways connect with TLS, as to the reference EPP)")  # fmt: skip
    epp.add_argument("--cert-path", help="with --secure-serving: a directory with tls.crt and tls.key "
                     "(default: a self-signed certificate)")  # fmt: skip
    epp.add_argument("--enable-cert-reload", action="store_true", help="re-read --cert-path files when they change")
    epp.add_argument("--health-checking", action="store_true", help="also serve gRPC health on the ext_proc port")
    epp.add_argument("--fallbacks", type=int, default=None,
                     help="fallbacks listed after the pick (default 2 with override-host, else 0)")  # fmt: skip
    epp.add_argument("--max-body-size", type=_size, default="32Mi", help="larger request bodies get 413")
    epp.add_argument("--max-inflight", type=int, default=0, help="shed with 429 above this many requests (0: off)")
    epp.add_argument("--refresh-metrics-interval", type=float, default=0.05, help="seconds between scrapes")
    epp.add_argument("--metrics-staleness-threshold", type=float, default=2.0, help="seconds")
    p.add_argument("-v", "--verbose", action="count", default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igw", description="igw: an inference gateway for self-hosted LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    demo = sub.add_parser("demo", help="4 simulated vLLM servers + EPP + Envoy + a short workload")
    demo.add_argument("--requests", type=int, default=200, help="requests to send")
    demo.add_argument("--concurrency", type=int, default=16)
    demo.add_argument("--duration", type=float, default=60.0, help="upper bound on the workload, seconds")
    demo.add_argument("--servers", type=int, default=4)
    demo.add_argument("--keep-running", action="store_true", help="keep the gateway up after the workload")
    demo.add_argument("--port", type=int, default=8081, help="gateway port")
    config = sub.add_parser("config", help="check configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    validate = config_sub.add_parser(
        "validate", help="load an EndpointPickerConfig and print the effective configuration"
    )
    validate.add_argument("file", help="EndpointPickerConfig YAML file ('-' for stdin)")
    validate.add_argument("--pool", metavar="FILE", help="also check a pool file")
    validate.add_argument("--quiet", action="store_true", help="print nothing when the file is valid")
    sub.add_parser("sim", help="run simulated vLLM servers (see igw sim --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks (see igw bench --help)", add_help=False)
    return parser


def _run_command(args: argparse.Namespace) -> Coroutine[Any, Any, None]:
    from igw.app.envoy import EnvoySettings, UpstreamMode
    from igw.app.epp import Epp
    from igw.app.gateway import GatewaySettings, run_gateway, wait_for_signal
    from igw.config.pool import ConfigError, load_pool, pool_from_addresses
    from igw.config.settings import (
        AdmissionSettings,
        BodyMode,
        DataLayerSettings,
        EppSettings,
        ObservabilitySettings,
        SchedulingSettings,
        ServerSettings,
    )

    kubernetes = bool(args.pool_name or args.endpoint_selector)
    if bool(args.pool) + bool(args.endpoint) + kubernetes != 1:
        raise ConfigError(
            "give exactly one pool source: --pool FILE, --endpoint HOST:PORT (repeatable), "
            "or --pool-name / --endpoint-selector (Kubernetes)"
        )
    k8s_only = {
        "--pool-namespace": args.pool_namespace, "--kubeconfig": args.kubeconfig, "--kube-context": args.kube_context,
        "--endpoint-target-ports": args.endpoint_target_ports, "--ha-enable-leader-election": args.ha_enable_leader_election,
        "--ha-lease-name": args.ha_lease_name, "--ha-lease-namespace": args.ha_lease_namespace,
        "--no-legacy-inference-models": args.no_legacy_inference_models,
        "--pool-group": args.pool_group != "inference.networking.k8s.io",
    }  # fmt: skip
    stray = [flag for flag, value in k8s_only.items() if value]
    if stray and not kubernetes:
        raise ConfigError(f"{', '.join(stray)}: Kubernetes-mode flags, they need --pool-name or --endpoint-selector")
    if kubernetes and not args.no_envoy:
        raise ConfigError("Kubernetes mode runs the EPP for your gateway: add --no-envoy")
    pool = (
        None
        if kubernetes
        else load_pool(args.pool)
        if args.pool
        else pool_from_addresses(args.endpoint, engine=Engine(args.engine) if args.engine else None, models=args.model)
    )
    upstream = UpstreamMode(args.upstream)
    fallbacks = args.fallbacks if args.fallbacks is not None else (2 if upstream is UpstreamMode.OVERRIDE_HOST else 0)
    if (args.cert_path or args.enable_cert_reload) and not args.secure_serving:
        raise ConfigError("--cert-path and --enable-cert-reload go with --secure-serving")
    if upstream is UpstreamMode.ORIGINAL_DST and fallbacks:
        raise ConfigError("--fallbacks needs --upstream override-host (ORIGINAL_DST takes a single ip:port)")
    body_mode = BodyMode.BUFFERED if args.body_mode == "buffered" else BodyMode.FULL_DUPLEX_STREAMED
    epp_settings = EppSettings(
        server=ServerSettings(
            host=args.host,
            grpc_port=args.grpc_port,
            health_port=args.grpc_health_port,
            metrics_port=args.metrics_port,
            max_request_body_bytes=args.max_body_size,
            default_body_mode=body_mode,
            secure_serving=args.secure_serving,
            cert_path=args.cert_path,
            enable_cert_reload=args.enable_cert_reload,
            # igw's own Envoy health-checks a TLS ext_proc port on that port.
            health_checking=args.health_checking or (args.secure_serving and not args.no_envoy),
        ),
        datalayer=DataLayerSettings(
            scrape_interval=args.refresh_metrics_interval, staleness_threshold=args.metrics_staleness_threshold
        ),
        scheduling=SchedulingSettings(fallbacks=fallbacks),
        admission=AdmissionSettings(max_inflight_requests=args.max_inflight),
        observability=ObservabilitySettings(
            decision_header=args.decision_header, recent_decisions=max(0, args.recent_decisions)
        ),
    )
    config_text, config_source = _config_text(args)
    if pool is None:
        from igw.app.kubernetes import KubernetesSettings, run_kubernetes

        raw_ports = [p.strip() for flag in args.endpoint_target_ports for p in flag.split(",") if p.strip()]
        if not all(p.isdigit() for p in raw_ports):
            raise ConfigError(f"--endpoint-target-ports: {','.join(raw_ports)!r} is not a list of port numbers")
        ports = tuple(int(p) for p in raw_ports)
        return run_kubernetes(
            KubernetesSettings(
                pool_name=args.pool_name,
                pool_namespace=args.pool_namespace,
                pool_group=args.pool_group,
                endpoint_selector=args.endpoint_selector,
                endpoint_target_ports=ports,
                kubeconfig=args.kubeconfig,
                kube_context=args.kube_context,
                leader_election=args.ha_enable_leader_election,
                lease_name=args.ha_lease_name,
                lease_namespace=args.ha_lease_namespace,
                lease_duration_s=args.ha_lease_duration,
                renew_deadline_s=args.ha_renew_deadline,
                retry_period_s=args.ha_retry_period,
                legacy_inference_models=not args.no_legacy_inference_models,
            ),
            epp_settings,
            config_text=config_text,
            config_source=config_source,
        )
    if args.no_envoy:

        async def epp_only() -> None:
            async with Epp(epp_settings, pool, config_text=config_text, config_source=config_source) as epp:
                print(f"igw: EPP ext_proc on {args.host}:{epp.grpc_port} (Ctrl-C to stop)", flush=True)
                await wait_for_signal()

        return epp_only()
    listen_host, _, listen_port = args.listen.rpartition(":")
    if not listen_port.isdigit():
        raise ConfigError(f"--listen {args.listen!r} is not HOST:PORT")
    try:
        envoy = EnvoySettings(
            listen_host=listen_host.strip("[]") or "127.0.0.1",
            listen_port=int(listen_port),
            admin_port=args.admin_port,
            upstream=upstream,
            fail_open=not args.fail_close,
            body_mode=body_mode,
            max_request_body_bytes=args.max_body_size,
            retries=fallbacks,
            concurrency=args.envoy_concurrency,
            response_headers=not args.no_response_headers,
            epp_tls=args.secure_serving,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return run_gateway(
        GatewaySettings(epp=epp_settings, envoy=envoy, envoy_log_level="warning"),
        pool,
        config_text=config_text,
        config_source=config_source,
    )


def _config_text(args: argparse.Namespace) -> tuple[str | None, str]:
    from igw.config.pool import ConfigError

    if args.config_text is not None:
        return args.config_text, "--config-text"
    if args.config_file is None:
        return None, "the default configuration"
    try:
        with open(args.config_file) as f:
            return f.read(), args.config_file
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {args.config_file}: {exc.strerror}") from None


def _validate_command(args: argparse.Namespace) -> int:
    """``igw config validate``: both loading phases against an empty (or the given) pool."""
    from pathlib import Path

    import yaml

    from igw.app.epp import build_collector, load_config
    from igw.config.pool import ConfigError, load_pool
    from igw.config.settings import EppSettings
    from igw.datalayer.store import EndpointStore

    source = "stdin" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {args.file}: {exc.strerror}") from None
    store = EndpointStore()
    if args.pool:
        pool = load_pool(args.pool)
        store = EndpointStore(pool_name=pool.name)
        store.set_endpoints(pool.build())
    config = load_config(text, store, source=source)
    try:
        build_collector(EppSettings(), store, config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not args.quiet:
        print(f"# {source}: valid; effective configuration:")
        print(yaml.safe_dump(config.describe(), sort_keys=False), end="")
    return 0


def _run_async(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        asyncio.run(coro)


def _offer_igw_to_the_replay(argv: list[str]) -> None:
    """``igw sim replay --policies igw,...``: igw's own Endpoint Picker as a replay policy, with the
    EndpointPickerConfig of ``--igw-config FILE`` (removed from ``argv``), else the default one."""
    from igw.app.replay_router import IgwRouter
    from igw_sim.replay.routers import ROUTERS

    config_text: str | None = None
    if "--igw-config" in argv:
        at = argv.index("--igw-config")
        if at + 1 >= len(argv):
            raise SystemExit("igw: error: --igw-config needs a file")
        path = argv[at + 1]
        del argv[at : at + 2]
        try:
            with open(path) as f:
                config_text = f.read()
        except OSError as exc:
            raise SystemExit(f"igw: error: cannot read {path}: {exc.strerror}") from None
    ROUTERS["igw"] = lambda seed: IgwRouter(config_text)


def main(argv: list[str] | None = None) -> int:
    # igw forks only to exec Envoy: gRPC's fork handlers have nothing to do (and would log about it).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":
        from igw_sim.cli import main as sim_main

        if argv[1:2] == ["replay"]:
            _offer_igw_to_the_replay(argv)
        return sim_main(argv[1:])
    if argv and argv[0] == "bench":
        from igw_bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", 0) > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from igw.app.envoy import EnvoyError
    from igw.config.pool import ConfigError

    try:
        if args.command == "run":
            _run_async(_run_command(args))
        elif args.command == "config":
            return _validate_command(args)
        elif args.command == "demo":
            from igw_bench.demo import DemoOptions, run_demo

            return run_demo(
                DemoOptions(
                    requests=args.requests,
                    concurrency=args.concurrency,
                    duration_s=args.duration,
                    servers=args.servers,
                    keep_running=args.keep_running,
                    gateway_port=args.port,
                )
            )
    except ConfigError as exc:
        print(f"igw: error: {exc}", file=sys.stderr)
        return 2
    except EnvoyError as exc:
        print(f"igw: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"igw: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
