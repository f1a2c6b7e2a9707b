"""Checkpoint and resume: a killed run resumed ends exactly where an uninterrupted one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from cloudless_fl.checkpoint import Checkpointer, CheckpointError, load_checkpoint, save_checkpoint
from cloudless_fl.config import compose, prepare_data
from cloudless_fl.run import run
from cloudless_fl.strategy.asgd_ga import AsyncGradAccum
from cloudless_fl.strategy.ma import ModelAveraging
from cloudless_fl.training import protocol
from cloudless_fl.training.compression import make_codec
from conftest import TWO_REGIONS, small_run_overrides
from strategy_helpers import Federation, topology

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "ma": ["strategy=ma", "strategy.num_rounds=16", "strategy.local_steps=4", "strategy.outer_momentum=0.5",
           "compression=none"],
    "asgd_ga": ["strategy=asgd_ga", "strategy.num_rounds=300", "strategy.eval_every=10", "strategy.momentum=0.9",
                "strategy.average_decay=0.9", "compression=none"],  # the served average is resumed too
    "fedavg": ["strategy=fedavg", "strategy.num_rounds=16", "strategy.local_epochs=0.25", "compression=none"],
    # compressed traffic: the regions' snapshots (held model, error-feedback residual) resume exactly too
    "ma_int8": ["strategy=ma", "strategy.num_rounds=16", "strategy.local_steps=4", "compression=int8"],
    # drift correction: the regions' kept starts and gradients, and the server's books of them
    "ma_drift": ["strategy=ma", "strategy.num_rounds=16", "strategy.local_steps=4", "strategy.drift_correction=true",
                 "strategy.drift_warmup=0", "compression=none"],
    "fedavg_int4": ["strategy=fedavg", "strategy.num_rounds=16", "strategy.local_epochs=0.25", "compression=int4"],
    # + drift correction from the start: the corrections in flight are re-sent as sent, the mirrors resume
    "asgd_ga_delta_topk": ["strategy=asgd_ga_delta", "strategy.num_rounds=300", "strategy.eval_every=10",
                           "compression=topk", "compression.fraction=0.05", "strategy.drift_warmup=0"],
}
EVERY = {"ma": 2, "asgd_ga": 20, "fedavg": 2, "ma_int8": 2, "ma_drift": 2, "fedavg_int4": 2, "asgd_ga_delta_topk": 20}


def overrides(topology, strategy):
    return [*small_run_overrides(topology), *RUNS[strategy], f"checkpoint.every={EVERY[strategy]}",
            "scheduler=elastic"]


def final_state(run_dir: Path):
    meta, tensors = load_checkpoint(run_dir / "checkpoint.pt")
    model = tensors["optimizer"]["model"] if "optimizer" in tensors else tensors["model"]
    return meta, model


def comparable(payload: dict) -> dict:
    """The results minus what legitimately differs: the resume event and the run folder."""
    return {"history": payload["history"], "summary": payload["summary"], "regions": payload["regions"],
            "costs": payload["costs"], "schedule": payload["schedule"],
            "events": [e for e in payload["events"] if e["event"] != "resumed"]}


@pytest.mark.subprocess
@pytest.mark.parametrize("strategy", RUNS)
def test_a_killed_run_resumes_to_the_same_model_and_figures(two_region_topology, tmp_path, strategy):
    whole = tmp_path / "whole"
    expected = run(compose(overrides(two_region_topology, strategy)), whole)

    killed = tmp_path / "killed"
    # one intra-op thread, as in this process (conftest.py): with two, a sum splits differently and the
    # killed run's evaluations differ from the whole run's in the last bits on some CPUs (seen on AMD EPYC)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cloudless_fl.run", *overrides(two_region_topology, strategy),
                             f"hydra.run.dir={killed}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (killed / "results.json").exists()  # killed mid-run, not after it
    step_at_kill = load_checkpoint(killed / "checkpoint.pt")[0]["step"]
    assert 0 < step_at_kill < int(RUNS[strategy][1].split("=")[1])

    resumed = run(compose([*overrides(two_region_topology, strategy), f"resume={killed}"]), killed)
    assert comparable(resumed) == comparable(expected)
    assert [e["step"] for e in resumed["events"] if e["event"] == "resumed"] == [step_at_kill]
    (_, model_whole), (_, model_resumed) = final_state(whole), final_state(killed)
    for name, tensor in model_whole.items():
        assert torch.equal(model_resumed[name], tensor), name
    average_whole = load_checkpoint(whole / "checkpoint.pt")[1].get("optimizer", {}).get("average", {})
    average_resumed = load_checkpoint(killed / "checkpoint.pt")[1].get("optimizer", {}).get("average", {})
    assert set(average_whole) == set(average_resumed) and (strategy != "asgd_ga" or average_whole)
    for name, tensor in average_whole.items():
        assert torch.equal(average_resumed[name], tensor), name


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 3}, {"model": {"w": torch.ones(4)}})
    meta, tensors = load_checkpoint(path)
    assert meta["step"] == 3 and torch.equal(tensors["model"]["w"], torch.ones(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 a zip that is not ours")
    with pytest.raises(CheckpointError, match="not a cloudless-fl checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_of_another_model_or_config_is_refused(two_region_topology, tmp_path):
    run(compose([*small_run_overrides(two_region_topology), "strategy=ma", "strategy.num_rounds=2"]), tmp_path)
    other_model = [*small_run_overrides(two_region_topology), "strategy=ma", "model.options.hidden=[32]",
                   f"resume={tmp_path}"]
    with pytest.raises(CheckpointError, match="its model is .* this run's is"):
        run(compose(other_model), tmp_path)
    other_strategy = [*small_run_overrides(two_region_topology), "strategy=fedavg", f"resume={tmp_path}"]
    with pytest.raises(CheckpointError, match="its strategy is \"ma\", this run's is \"fedavg\""):
        run(compose(other_strategy), tmp_path)


def test_checkpoints_never_unpickle(tmp_path):
    """A payload carrying an arbitrary object is refused by the weights-only loader, not executed."""
    import hashlib
    import io

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    buffer = io.BytesIO()
    torch.save({"meta": "{}", "tensors": {"x": Boom()}}, buffer)
    payload = buffer.getvalue()
    (tmp_path / "evil.pt").write_bytes(b"cloudless-fl-checkpoint 1 " + hashlib.sha256(payload).hexdigest().encode()
                                       + b"\n" + payload)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change, key", [(["strategy.lr=0.05"], "strategy.lr"),
                                         (["validation.min_agreement=0.5"], "validation.min_agreement"),
                                         (["target_accuracy=0.5"], "target_accuracy")])
def test_resume_refuses_a_changed_training_setting_naming_it(two_region_topology, tmp_path, change, key):
    base = [*small_run_overrides(two_region_topology), "strategy=ma", "strategy.num_rounds=2"]
    run(compose(base), tmp_path)
    with pytest.raises(CheckpointError, match=rf"its {key} is .* this run's is"):
        run(compose([*base, *change, f"resume={tmp_path}"]), tmp_path)


def test_resume_refuses_changed_topology_or_data_contents(two_region_topology, tmp_path):
    import yaml

    base = [*small_run_overrides(two_region_topology), "strategy=ma", "strategy.num_rounds=2"]
    run(compose(base), tmp_path / "run")
    topo = yaml.safe_load(open(two_region_topology))
    next(iter(topo["regions"].values()))["samples_per_s"] *= 2
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(topo))
    with pytest.raises(CheckpointError, match="its topology is"):
        run(compose([*base, f"topology_file={edited}", f"resume={tmp_path / 'run'}"]), tmp_path / "run")
    layout = prepare_data(compose(base))
    shard = next(layout.root.glob("*/train.npz"))
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(CheckpointError, match="its data is"):
            run(compose([*base, f"resume={tmp_path / 'run'}"]), tmp_path / "run")
    finally:
        shard.write_bytes(original)


def test_a_finished_run_extends_by_growing_num_rounds(two_region_topology, tmp_path):
    base = [*small_run_overrides(two_region_topology), "strategy=ma"]
    run(compose([*base, "strategy.num_rounds=2"]), tmp_path)
    extended = run(compose([*base, "strategy.num_rounds=4", f"resume={tmp_path}"]), tmp_path)
    assert [e["version"] for e in extended["history"]][-1] == 4


@pytest.mark.parametrize("strategy, rounds, extra", [
    ("fedavg", 2, ["compression=int8"]), ("asgd_ga", 30, ["compression=int8", "strategy.tau_max=1"]),
    ("asgd_ga_delta", 30, ["compression=none", "scheduler=elastic", "scheduler.replan_every=4"]),
    ("ma", 3, ["strategy.drift_correction=true", "strategy.drift_warmup=0"]),
    ("ma", 3, ["strategy.drift_correction=true", "strategy.drift_warmup=0.3", "strategy.stop.max_time_s=60"])])
def test_an_extended_run_is_the_run_it_would_have_been(two_region_topology, tmp_path, strategy, rounds, extra):
    """Extending a finished run to twice its steps ends where a run of all of them does: FedAvg's rounds are
    offset (Flower's loop counts from 1 again; the regions' data streams and the compressed downloads are
    keyed by the round), ASGD-GA's arrival rates and the fractions of its regions' updates applied are
    restored (the slow region's stale ones are dropped: not all are), and so are the scheduler's plan and
    measurements."""
    base = [*small_run_overrides(two_region_topology), f"strategy={strategy}", *extra]
    whole = run(compose([*base, f"strategy.num_rounds={2 * rounds}"]), tmp_path / "whole")
    assert strategy != "asgd_ga" or whole["summary"]["dropped_stale"] > 0
    run(compose([*base, f"strategy.num_rounds={rounds}"]), tmp_path / "extended")
    extended = run(compose([*base, f"strategy.num_rounds={2 * rounds}", f"resume={tmp_path / 'extended'}"]),
                   tmp_path / "extended")
    assert comparable(extended) == comparable(whole)
    (_, model_whole), (_, model_extended) = final_state(tmp_path / "whole"), final_state(tmp_path / "extended")
    for name, tensor in model_whole.items():
        assert torch.equal(model_extended[name], tensor), name


def test_a_run_that_spent_its_time_budget_extends_by_a_larger_one(two_region_topology, tmp_path):
    """The default budget is time: a finished run goes on when resumed with more of it."""
    base = [*small_run_overrides(two_region_topology), "strategy=ma", "strategy.num_rounds=100"]
    first = run(compose([*base, "strategy.stop.max_time_s=20"]), tmp_path)
    assert first["summary"]["ended_by"] == "time budget 20 s reached"
    extended = run(compose([*base, "strategy.stop.max_time_s=40", f"resume={tmp_path}"]), tmp_path)
    assert extended["summary"]["ended_by"] == "time budget 40 s reached"
    assert extended["history"][-1]["version"] > first["history"][-1]["version"]


def test_asgd_gas_balance_state_round_trips_and_loads_from_a_checkpoint_without_each_regions_work():
    """ASGD-GA's checkpointed balance state (arrival intervals, applied fractions, each region's work per job)
    comes back as saved; a checkpoint from before `work` was kept loads with the work unknown (the balance
    waits for the next jobs) instead of failing."""
    state = {"durations": {"fast": 0.5, "slow": 5.0}, "applied": {"fast": 1.0, "slow": 0.75},
             "work": {"fast": 8, "slow": 32}}
    strategy = AsyncGradAccum(update="delta")
    strategy._load_extra_state(state)
    assert strategy._extra_state() == state
    strategy._load_extra_state({k: v for k, v in state.items() if k != "work"})
    assert strategy._extra_state() == {**state, "work": {}}


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_a_resume_resends_the_jobs_in_flight_as_sent_but_a_gone_regions(tmp_path, caplog, compression):
    """An asynchronous run ends with jobs out, and its checkpoint keeps them. Resumed with the region of the
    first of them gone, every other job is re-sent as it was sent — same order, metering, model and
    (compressed) payload, to its region's node — and the gone region's job is lost with it."""
    regions = {name: {**TWO_REGIONS["regions"]["slow"], "data_share": 1 / 3} for name in ("east", "west", "north")}
    fed = Federation(tmp_path / "data", topology(regions))
    path = tmp_path / "checkpoint.pt"
    config = ConfigRecord({**dict(fed.config), "state-dir": str(tmp_path / "region-state")})  # compressed traffic's

    def asgd_ga(**resume):
        return AsyncGradAccum(update="delta", batch_size=16, accumulation_steps={"east": 2, "west": 3, "north": 5},
                              meter=fed.meter(), checkpointer=Checkpointer(path), compression=make_codec(compression),
                              **resume)

    asgd_ga().start(fed.grid, fed.initial, num_rounds=8, train_config=config)
    meta, tensors = load_checkpoint(path)
    saved = meta["inflight"]
    assert len(saved) >= 2
    gone = saved[0]["region"]
    nodes = {name: i + 1 for i, name in enumerate(fed.topology.region_names)}  # node i+1 holds the i-th region
    fed.grid.set_offline(nodes[gone])

    resumed, resent = asgd_ga(resume=True), []
    push = resumed.jobs.push

    def recorded(grid, messages):
        messages = list(messages)
        if not resent:  # the restore's push
            resent.extend((message, resumed.jobs.staged(message)) for message in messages)
        return push(grid, messages)

    resumed.jobs.push = recorded
    with caplog.at_level("INFO", logger="cloudless_fl"):
        resumed.start(fed.grid, fed.initial, num_rounds=9, train_config=config)
    assert f"resumed from {path} at step 8 (t={meta['meter']['now']:.1f} s)" in caplog.messages
    kept = [(i, state) for i, state in enumerate(saved) if state["region"] != gone]
    assert [flight.state_dict() for _, flight in resent] == [state for _, state in kept]
    for (message, flight), (i, state) in zip(resent, kept):
        assert message.metadata.dst_node_id == flight.node_id == nodes[state["region"]]
        assert message.content[protocol.ARRAYS] is flight.payload
        model = tensors["sent"][str(state["version"])]
        assert set(model) == set(fed.initial.to_torch_state_dict())
        payload = tensors["payloads"][str(i)] if compression != "none" else model
        for sent, expected in ((flight.arrays, model), (flight.payload, payload)):
            state_dict = sent.to_torch_state_dict()
            assert set(state_dict) == set(expected)
            for name, tensor in expected.items():
                assert torch.equal(state_dict[name], tensor), name


@pytest.mark.parametrize("make, rounds, every, steps", [
    (lambda **kw: ModelAveraging(local_steps=2, batch_size=16, **kw), 5, 2, [2, 4, 5]),
    (lambda **kw: AsyncGradAccum(update="delta", batch_size=16, accumulation_steps=2, **kw), 7, 3, [3, 6, 7])],
    ids=["ma", "asgd_ga"])
def test_a_checkpoint_is_written_every_every_steps_and_at_the_end(tmp_path, monkeypatch, make, rounds, every, steps):
    written, save = [], Checkpointer.save

    def recorded(self, meta, tensors):
        written.append(meta["step"])
        save(self, meta, tensors)

    monkeypatch.setattr(Checkpointer, "save", recorded)
    fed = Federation(tmp_path / "data", topology())
    make(meter=fed.meter(), checkpointer=Checkpointer(tmp_path / "checkpoint.pt", every=every)).start(
        fed.grid, fed.initial, num_rounds=rounds, train_config=fed.config)
    assert written == steps
