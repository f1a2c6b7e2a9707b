"""`cloudless-fl <command>`: run (Hydra), data split, plan, report."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: cloudless-fl <command> [args]

commands:
  run [hydra overrides...]   run an experiment (e.g. strategy=fedavg topology=geo4 seed=2)
  data split --out DIR ...   write per-region shards (see `cloudless-fl data split -h`)
  plan [overrides...]        the elastic scheduler's plan beside the static one (e.g. topology=geo4 strategy=ma)
  launch [options]           a real local federation: SuperLink + one SuperNode per region behind shaped WAN proxies
  trainer --socket PATH      a region's trainer kept warm between messages (its SuperNode: --node-config trainer=PATH)
  worker --endpoint H:P ...  a region's worker on another machine, joining its SuperNode's jobs (docs/deployment.md)
  report FOLDER              compare every results.json below FOLDER: table (report.md) and plots/*.png
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
        from .run import hydra_main

        sys.argv = [sys.argv[0], *rest]
        hydra_main()
    elif command == "data":
        data_command(rest)
    elif command == "plan":
        from .errors import CloudlessError
        from .reporting.plan_table import plan_command

        try:
            print(plan_command(rest))
        except CloudlessError as exc:
            raise SystemExit(f"error: {exc}") from None
    elif command == "launch":
        launch_command(rest)
    elif command == "trainer":
        from clients.warm_trainer import main as trainer_main

        trainer_main(rest)
    elif command == "worker":
        from .training.worker_agent import main as worker_main

        worker_main(rest)
    elif command == "report":
        if len(rest) != 1:
            raise SystemExit("usage: cloudless-fl report FOLDER")
        from pathlib import Path

        from .reporting.report import write_report
        from .reporting.results import load_runs

        if not Path(rest[0]).is_dir():
            raise SystemExit(f"error: {rest[0]} is not a folder; pass the folder holding the runs' results.json")
        text = write_report(rest[0])
        print(text)
        if not load_runs(rest[0])[0]:
            raise SystemExit(f"error: no readable results.json under {rest[0]}")
    else:
        raise SystemExit(f"unknown command {command!r}\n\n{USAGE}")


def data_command(argv: list[str]) -> None:
    from .config import compose, topology_of
    from .training.data import load_source, split_dataset
    from .errors import CloudlessError
    from .control.topology import load_topology

    parser = argparse.ArgumentParser(prog="cloudless-fl data")
    sub = parser.add_subparsers(dest="action", required=True)
    split = sub.add_parser("split", help="write <out>/<region>/train.npz and <out>/test.npz")
    split.add_argument("--out", required=True, help="output folder")
    split.add_argument("--topology", default="geo4", help="preset name or topology YAML path (data shares)")
    split.add_argument("--source", default="digits", help="digits, tabular, npz, mnist, fashionmnist, cifar10, imagefolder")
    split.add_argument("--root", default=None, help="where the source dataset lies (not needed for digits)")
    split.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--test-seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.topology.endswith((".yaml", ".yml")):
            topology = load_topology(args.topology)
        else:
            topology = topology_of(compose([f"topology={args.topology}"]))
        sizes = split_dataset(load_source(args.source, args.root), topology.shares(), args.out,
                              alpha=args.alpha, seed=args.seed, test_fraction=args.test_fraction,
                              test_seed=args.test_seed)
    except CloudlessError as exc:
        raise SystemExit(f"error: {exc}") from None
    for region, n in sizes.items():
        print(f"{region}: {n} samples -> {args.out}/{region}/train.npz")
    print(f"test split -> {args.out}/test.npz")


def launch_command(argv: list[str]) -> None:
    from pathlib import Path

    from .errors import CloudlessError
    from .deployment.launch import SECURITY, launch, sigterm_as_interrupt

    parser = argparse.ArgumentParser(prog="cloudless-fl launch",
                                     description="Run the app on a local Deployment Engine federation "
                                                 "(SuperLink + one SuperNode per region) over shaped WAN links.")
    parser.add_argument("--topology", default="geo4", help="preset name or topology YAML path")
    parser.add_argument("--strategy", default="asgd_ga_delta")
    parser.add_argument("--rounds", type=int, default=20, help="rounds / periods / model versions")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="> 1: links and paced compute that many times faster")
    parser.add_argument("--no-pace", action="store_true",
                        help="compute at this machine's speed instead of each region's profile")
    parser.add_argument("--security", choices=SECURITY, default="auth",
                        help="auth (default): TLS, and only SuperNodes with a registered key, each bound to its "
                             "region; tls: TLS only; insecure: plain HTTP")
    parser.add_argument("--max-workers", type=int, default=None,
                        help="the most data-parallel worker processes per region and job (default: each region's "
                             "workers.max; 1: the SuperNode's ClientApp process alone)")
    parser.add_argument("--cold", action="store_true",
                        help="no warm trainer per region: every message's ClientApp process imports PyTorch and "
                             "computes the job itself, as in a plain Flower app")
    parser.add_argument("--data", default=None,
                        help="a folder `cloudless-fl data split` wrote for this topology (e.g. --source tabular); "
                             "default: the bundled digits, split into <out>/data")
    parser.add_argument("--out", default=None, help="run folder (default outputs/launch/<time>)")
    parser.add_argument("--app", default=".", help="the Flower app folder (this checkout)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to the run (key=value)")
    args = parser.parse_args(argv)
    import time

    out = Path(args.out or f"outputs/launch/{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        with sigterm_as_interrupt():
            code = launch(args.topology, args.strategy, args.rounds, out, seed=args.seed,
                          time_scale=args.time_scale, pace=not args.no_pace, security=args.security,
                          max_workers=args.max_workers, warm=not args.cold,
                          data=None if args.data is None else Path(args.data), overrides=args.overrides,
                          app_dir=Path(args.app))
    except CloudlessError as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: every process started was stopped") from None
    print(f"run folder: {out} (logs/, results in {out}/<time>/results.json)")
    raise SystemExit(code)
