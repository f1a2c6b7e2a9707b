"""One malicious region against each defence: final accuracy and time to target, clean vs attacked.

The attacker is a real region of the run (its ClientApp trains honestly, then
sends its update × −10, × 1e4, or random noise of the update's norm); runs use
the in-process engine and the benchmark's own configs (`conf/`), so only the
attack and the defence differ. `absent` is the same federation with the
attacker refusing to take part: the best any defence can do, since the
attacker's data is lost either way.

    .venv/bin/python experiments/bench_attacks.py                    # geo4, MA and ASGD-GA delta
    .venv/bin/python experiments/bench_attacks.py --strategies ma --attacker ap-chengdu topology=lan
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message
from flwr.app import Error as MessageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import _run, execute, last_evaluations, pool, share_budget  # noqa: E402

ATTACKS = ("x-10", "x1e4", "noise")
DEFENCES = {  # name → overrides. The default is `screen` for MA and ASGD-GA delta, `relatedness` for gradient-mode
    # ASGD-GA (validation.min_relatedness=auto)
    "screen": ["validation.min_relatedness=null"],  # length checks (norm_factor), agreement (MA), clip (ASGD-GA)
    "relatedness": ["validation.min_relatedness=2"],  # ASGD-GA: the screen plus the relatedness check
    "none": ["validation.norm_factor=null", "validation.min_agreement=null", "validation.clip_factor=null",
             "validation.min_relatedness=null"],
    "median": ["validation.norm_factor=null", "validation.min_agreement=null", "strategy.aggregation=median"],
}


def budget_defence(k: float) -> list[str]:
    """ASGD-GA's share budget `k` in place of the length bound and the clip."""
    return ["validation.min_relatedness=null", *share_budget(k)]


DEFENCES["budget"] = budget_defence(2)
STRATEGY_DEFENCES = {"ma": ("screen", "none", "median"),
                     "asgd_ga_delta": ("screen", "relatedness", "none", "budget"),
                     "asgd_ga": ("screen", "relatedness", "none")}
ATTACK = {"attacker": None, "kind": None}  # set before the worker processes fork
# Fresh noise for every update: the ClientApp seeds torch's global generator when it builds its model, so noise drawn
# from that would repeat job after job (a consistent direction, not noise).
NOISE = torch.Generator().manual_seed(0)


def attack_arrays(arrays: ArrayRecord, sent: ArrayRecord, update: str, kind: str) -> ArrayRecord:
    """The reply's arrays with its change replaced: × −10, × 1e4, or noise of the change's norm."""
    new, base = arrays.to_torch_state_dict(), sent.to_torch_state_dict()
    out = {}
    for name, tensor in new.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        change = tensor - base[name] if update == "weights" else tensor
        if kind == "x-10":
            change = -10.0 * change
        elif kind == "x1e4":
            change = 1e4 * change
        elif kind == "noise":
            change = torch.randn(change.shape, generator=NOISE) * change.norm() / max(1, change.numel()) ** 0.5
        else:
            raise ValueError(f"unknown attack {kind!r}; one of {', '.join(ATTACKS)}")
        out[name] = base[name] + change if update == "weights" else change
    return ArrayRecord(out)


def attacking_app(make_client_app):
    """`make_client_app`, with the attacker region's replies altered (or, for `absent`, its query refused)."""

    def make(*args, **kwargs):
        honest = make_client_app(*args, **kwargs)

        def app(msg: Message, context) -> Message:
            reply = honest(msg, context)
            if reply.has_error() or "info" not in reply.content.config_records:
                return reply
            if reply.content.config_records["info"].get("region") != ATTACK["attacker"]:
                return reply
            if ATTACK["kind"] == "absent":
                return Message(MessageError(code=0, reason="the attacker stays away"), reply_to=msg)
            if msg.metadata.message_type == "train" and ATTACK["kind"] in ATTACKS:
                update = str(reply.content.config_records["info"]["update"])
                reply.content["arrays"] = attack_arrays(reply.content["arrays"], msg.content["arrays"], update,
                                                        ATTACK["kind"])
            return reply

        return app

    return make


def run_to_the_end(job):
    """A run whose every region ended quarantined raises after writing its results: that is a result here."""
    from cloudless_fl.errors import CloudlessError

    try:
        return _run(job)
    except CloudlessError:
        summary = json.loads((Path(job[1]) / "results.json").read_text())["summary"]
        return job[1], summary, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["ma", "asgd_ga_delta"], choices=sorted(STRATEGY_DEFENCES))
    parser.add_argument("--attacker", default="ap-beijing", help="the malicious region (default: ap-beijing)")
    parser.add_argument("--defences", nargs="+", choices=sorted(DEFENCES), help="only these (default: all)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="(default: all)")
    parser.add_argument("--share-budget", type=float, default=2.0, help="the `budget` defence's (default: 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="outputs/attacks")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. topology=lan)")
    args = parser.parse_args()

    import clients.region_app as region_app

    region_app.make_client_app = attacking_app(region_app.make_client_app)
    ATTACK["attacker"] = args.attacker
    DEFENCES["budget"] = budget_defence(args.share_budget)
    cases = []  # (strategy, defence, attack)
    for strategy in args.strategies:
        defences = [d for d in STRATEGY_DEFENCES[strategy] if args.defences is None or d in args.defences]
        cases += [(strategy, d, "clean") for d in defences if d != "median"]
        cases += [(strategy, "screen", "absent")] if "screen" in defences else []
        cases += [(strategy, d, a) for d in defences for a in args.attacks]
    out = Path(args.out)
    results = {}
    for kind in ("clean", "absent", *args.attacks):  # one pool per attack: the workers fork with it set
        ATTACK["kind"] = kind
        jobs = [([f"strategy={s}", *DEFENCES[d], f"seed={args.seed}", *args.overrides], str(out / f"{s}-{d}-{a}"))
                for s, d, a in cases if a == kind]
        with pool(args.workers) as workers:
            execute(workers, jobs, run_to_the_end)
        for s, d, a in cases:
            if a == kind:
                results[(s, d, a)] = json.loads((out / f"{s}-{d}-{a}" / "results.json").read_text())["summary"]

    print(f"\nattacker: {args.attacker}; seed {args.seed}; {' '.join(args.overrides) or 'geo4 defaults'}")
    print(f"{'strategy':<14} {'defence':<8} {'attack':<7} {'final':>6} {'last 5':>6} {'best':>6} {'t-target':>9} "
          f"{'held back':>9} {'rejected':>8} {'quarantined':>11}")
    for (s, d, a), summary in results.items():
        t = summary["time_to_target_s"]
        print(f"{s:<14} {d:<8} {a:<7} {summary['final_accuracy']:6.3f} "
              f"{last_evaluations(str(out / f'{s}-{d}-{a}')):6.3f} {summary['best_accuracy']:6.3f} "
              f"{'—' if t is None else f'{t:8.0f}s':>9} {summary['screened_updates']:>9} "
              f"{summary['rejected_updates']:>8} {summary['quarantined_regions']:>11}")


if __name__ == "__main__":
    main()
