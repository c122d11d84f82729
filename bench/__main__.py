"""The CLI: `python -m bench run ...` measures and writes a results folder; `python -m bench report
DIR` redraws report.md and the plots from DIR/results.json.

    python -m bench run --url http://127.0.0.1:8000/v1 --model tiny-llama --workload synthetic \\
        --mode closed --concurrency 1,4,16 --num-requests 32 --seed 0
    python -m bench run --target agg=http://127.0.0.1:8000/v1 --target vllm=http://127.0.0.1:8100/v1 \\
        --baseline vllm --mode open --rate 2,8 --out /tmp/agg-vs-vllm

Scenarios start and stop their own servers (bench/deploy.py) and write a results folder:

    python -m bench kv-routing      # round-robin vs kv routing
    python -m bench vs-vllm         # agg, agg_router vs vLLM's server
    python -m bench profile         # py-spy on agg under load
    python -m bench router-speed    # the router's index and policy, no servers
    python -m bench aiperf-check    # aiperf and the harness, same deployment
    python -m bench stages          # TTFT split: dispatch, engine, delivery
    python -m bench remote-prefill  # a remote prefill against a local one, stage by stage
    python -m bench first-burst     # the first bursts after a start
    python -m bench migration       # SIGKILL a decode worker: detection and resume times
    python -m bench admission       # a burst of 800: 429s, and /health meanwhile
    python -m bench failover        # SIGKILL the Redis primary behind Sentinels under load
    python -m bench soak            # 10 minutes of load, a decode worker SIGKILLed every 2

Without --out, results go to bench/out/COMMAND-YYYYMMDDTHHMMSSZ (ignored by git). The last line
printed is the path of the report.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from bench.flags import add_dataclass_flags, from_flags
from bench.output import default_out
from bench.records import LoadMode, Slo, Target
from bench.runner import RunConfig, RunOptions
from bench.workloads import WorkloadKind, WorkloadParams

# name -> (module, its spec dataclass, help); each module has run(spec, out) -> report path.
SCENARIOS = {
    "kv-routing": ("bench.kv_routing", "KvRoutingSpec", "KV-aware routing against round-robin on agg_router"),
    "vs-vllm": ("bench.vs_vllm", "VsVllmSpec", "agg and agg_router against vLLM's own server"),
    "profile": ("bench.profiling", "ProfileSpec", "py-spy profiles of a deployment's processes under load"),
    "router-speed": ("bench.router_speed", "RouterSpeedSpec", "the router's decision time and event rate, no servers"),
    "aiperf-check": ("bench.aiperf_check", "AiperfCheckSpec", "aiperf and the harness on the same agg deployment"),
    "stages": ("bench.stages", "StagesSpec", "time to first token split into dispatch, engine and delivery"),
    "remote-prefill": ("bench.remote_prefill", "RemotePrefillSpec", "remote against local prefill, by stage"),
    "first-burst": ("bench.first_burst", "FirstBurstSpec", "the first bursts of requests after a fresh start"),
    "migration": ("bench.migration", "MigrationSpec", "detection and resume times when a decode worker is SIGKILLed"),
    "admission": ("bench.admission", "AdmissionSpec", "a burst past admission control: 429s, /health meanwhile"),
    "failover": ("bench.failover", "FailoverSpec", "a Redis Sentinel failover under steady load"),
    "soak": ("bench.soak", "SoakSpec", "a bounded soak: load, worker kills, a Redis failover; leaks and errors"),
}


OUT_HELP = "results folder (default: bench/out/COMMAND-TIMESTAMP, ignored by git)"


class UsageError(ValueError):
    """A flag's value that the run cannot use."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="benchmark one or more endpoints")
    run.add_argument("--url", action="append", default=[], help="an endpoint's base URL, ending in /v1")
    run.add_argument("--label", action="append", default=[], help="a name for the --url at the same position")
    run.add_argument("--target", action="append", default=[], metavar="LABEL=URL", help="a labelled endpoint")
    run.add_argument("--model", default="tiny-llama", help="model name sent to every target")
    run.add_argument("--baseline", help="label of the target the others are compared with")
    run.add_argument("--workload", choices=[k.value for k in WorkloadKind], default=WorkloadKind.SYNTHETIC.value)
    run.add_argument("--mode", choices=[m.value for m in LoadMode], default=LoadMode.CLOSED.value)
    run.add_argument("--concurrency", default="1,4", help="closed loop: comma-separated concurrencies")
    run.add_argument("--rate", default="2,8", help="open loop: comma-separated arrival rates, per second")
    run.add_argument("--slo-ttft-ms", type=float, help="goodput SLO on time to first token")
    run.add_argument("--slo-itl-ms", type=float, help="goodput SLO on mean inter-token latency")
    run.add_argument("--out", type=Path, help=OUT_HELP)
    add_dataclass_flags(run, RunOptions, "run options")
    add_dataclass_flags(run, WorkloadParams, "workload parameters")
    report = sub.add_parser("report", help="redraw report.md and plots from a results folder")
    report.add_argument("dir", type=Path)
    for name, (module, spec_name, text) in SCENARIOS.items():
        scenario = sub.add_parser(name, help=text)
        scenario.add_argument("--out", type=Path, help=OUT_HELP)
        add_dataclass_flags(scenario, getattr(importlib.import_module(module), spec_name), "scenario options")
    return parser


def parse_targets(args: argparse.Namespace) -> tuple[Target, ...]:
    if len(args.label) > len(args.url):
        raise UsageError("each --label needs a --url at the same position")
    pairs = [(args.label[i] if i < len(args.label) else f"target{i}", url) for i, url in enumerate(args.url)]
    for spec in args.target:
        label, sep, url = spec.partition("=")
        if not sep or not label or not url:
            raise UsageError(f"--target {spec!r}: expected LABEL=URL")
        pairs.append((label, url))
    if not pairs:
        raise UsageError("give at least one --url or --target")
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"target labels must differ: {labels}")
    return tuple(Target(label, url.rstrip("/"), args.model) for label, url in pairs)


def parse_values(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag} {text!r}: expected positive numbers")
    return tuple(sorted(set(values)))


def parse_slo(args: argparse.Namespace) -> Slo | None:
    given = (args.slo_ttft_ms, args.slo_itl_ms)
    if given == (None, None):
        return None
    if None in given:
        raise UsageError("give both --slo-ttft-ms and --slo-itl-ms, or neither")
    return Slo(ttft_ms=args.slo_ttft_ms, itl_ms=args.slo_itl_ms)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    targets = parse_targets(args)
    mode = LoadMode(args.mode)
    if args.baseline is not None and args.baseline not in {t.label for t in targets}:
        raise UsageError(f"--baseline {args.baseline!r} is not one of the target labels")
    values = (parse_values(args.concurrency, "--concurrency") if mode is LoadMode.CLOSED
              else parse_values(args.rate, "--rate"))
    return RunConfig(targets=targets, workload=WorkloadKind(args.workload), params=from_flags(WorkloadParams, args),
                     mode=mode, load_values=values, options=from_flags(RunOptions, args), slo=parse_slo(args),
                     baseline=args.baseline)


def main(argv: list[str] | None = None) -> int:
    from bench import report, runner

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    if args.command != "report" and args.out is None:
        args.out = default_out(args.command)
    if args.command == "report":
        path = report.write_all(report.load_result(args.dir / "results.json"), args.dir)
    elif args.command in SCENARIOS:
        module_name, spec_name, _ = SCENARIOS[args.command]
        module = importlib.import_module(module_name)
        path = module.run(from_flags(getattr(module, spec_name), args), args.out)
    else:
        try:
            config = config_from_args(args)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result = runner.run(config)
        num_failed = sum(not r.ok for r in result.records)
        if num_failed:
            logging.getLogger("bench").warning("%d of %d requests failed; see report.md", num_failed,
                                               len(result.records))
        path = report.write_all(result, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
