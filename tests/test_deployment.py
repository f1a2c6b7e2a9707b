"""The Deployment Engine for real: SuperLink + 3 SuperNodes behind shaped proxies, on loopback."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from flwr.app import ArrayRecord
from omegaconf import OmegaConf

from cloudless_fl.checkpoint import CheckpointError, load_checkpoint
from cloudless_fl.control.meter import record_bytes
from cloudless_fl.config import compose
from cloudless_fl.deployment.certs import write_node_key
from cloudless_fl.deployment.launch import (CONNECTION, Federation, descendants, free_port, launch, prepare_split,
                                           sigterm_as_interrupt, submit)
from cloudless_fl.control.topology import load_topology
from cloudless_fl.training.data import load_source, split_dataset
from cloudless_fl.training.models import build_model
from conftest import modelled_baseline_s

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture
def three_regions(tmp_path) -> Path:
    """geo4 minus its coordinator: three regions over real (shaped) WAN links."""
    raw = OmegaConf.to_container(compose(["topology=geo4"]).topology)
    del raw["regions"]["ap-beijing"]
    raw["coordinator"] = "ap-shanghai"
    raw["name"] = "geo3"
    for name, share in {"ap-shanghai": 0.3, "ap-guangzhou": 0.3, "ap-chengdu": 0.4}.items():
        raw["regions"][name]["data_share"] = share
    path = tmp_path / "geo3.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def flower_processes() -> set[str]:
    """Live Flower processes (zombies left for a container's init to reap are not running)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines()
            if any(k in line for k in ("flower-super", "flwr-serverapp", "flwr-clientapp", "cloudless-fl trainer"))
            and not line.split()[1].startswith("Z")}


def results_of(run_dir: Path) -> dict:
    [path] = run_dir.glob("*/results.json")
    return json.loads(path.read_text())


def _wait_for(condition, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(poll)


def _events_so_far(run_dir: Path) -> list[str]:
    """The kinds of event in the run's latest checkpoint."""
    try:
        meta, _ = load_checkpoint(next(run_dir.glob("*/checkpoint.pt")))
    except (CheckpointError, OSError, StopIteration):
        return []
    return [e["event"] for e in meta["history"]["events"]]


def _replies_pushed(logs: Path, region: str) -> int:
    """How many replies the SuperLink has taken from `region`'s SuperNode (a reply's arrays follow)."""
    node = re.search(r"SuperNode ID: (\d+)", (logs / f"supernode-{region}.log").read_text())
    return 0 if node is None else (logs / "superlink.log").read_text().count(f"Push replies from node_id={node[1]}")


def _federation_run(three_regions, tmp_path, strategy: str, rounds: int, extra: str,
                    security: str = "insecure"):
    """A started federation and the `flwr run` config for `strategy` on it (checkpoint every step: progress)."""
    topology = load_topology(three_regions)
    run_dir = (tmp_path / "run").resolve()
    prepare_split(topology, run_dir / "data")
    overrides = (f"topology_file={three_regions} dataset=npz dataset.root={run_dir / 'data'} clock=wall "
                 f"progress=false checkpoint.every=1 {extra}")
    config = {"strategy": strategy, "num-rounds": rounds, "overrides": overrides, "output-dir": str(run_dir)}
    return Federation(topology, run_dir, time_scale=20.0, security=security), config


def _submit_after_first_checkpoint(federation: Federation, config: dict) -> tuple[threading.Thread, list[int]]:
    """Start the federation, submit `config` on a thread (its exit code lands in the list); return once
    the run has checkpointed its first step, i.e. is under way."""
    federation.start_superlink()
    for region in federation.topology.region_names:
        federation.start_region(region, federation.run_dir / "data" / region)
    codes: list[int] = []
    run = threading.Thread(target=lambda: codes.append(submit(federation, ROOT, config, None)))
    run.start()
    _wait_for(lambda: list(federation.run_dir.glob("*/checkpoint.pt")), 300, "first checkpoint")
    return run, codes


def test_a_stock_clientapp_trains_under_asgd_ga_delta_on_real_supernodes(three_regions, tmp_path):
    """Someone else's app (tests/stock_app: a quickstart-shaped ClientApp with its own model and data, run as it
    is; nothing of cloudless-fl beside it: no trainer, no pacing, no region query) on a real SuperLink and
    SuperNodes behind shaped links, only its ServerApp's strategy line ours; judged by the model it ends with."""
    before = flower_processes()
    topology = load_topology(three_regions)
    run_dir = (tmp_path / "run").resolve()
    log = io.StringIO()
    with Federation(topology, run_dir, pace=False, security="insecure") as federation:
        federation.start_superlink()
        for i, region in enumerate(topology.region_names):
            federation.start_region(region, run_dir / "no-data", app_config=f"partition-id={i} num-partitions=3")
        code = submit(federation, ROOT / "tests" / "stock_app", {"strategy": "asgd_ga_delta",
                                                                 "num-server-rounds": 12}, log)
    out = log.getvalue()
    assert code == 0, out[-3000:]
    assert "ERROR" not in out and "Traceback" not in out, out[-3000:]
    final = float(out.split("final accuracy ")[1].split()[0])
    assert final > 0.85, out[-3000:]  # 0.35 at the start; FedAvg's first round reaches about 0.93
    assert flower_processes() <= before


def test_a_real_federation_trains_and_leaves_no_process(three_regions, tmp_path):
    """`cloudless-fl launch` end to end on a user's split (`data split --source tabular`: not the bundled digits
    the other deployment tests train on; ASGD-GA's run over TLS is the SuperNode-fault test below)."""
    before = flower_processes()
    data = tmp_path / "tabular"
    split_dataset(load_source("tabular"), load_topology(three_regions).shares(), data)
    log = io.StringIO()
    rounds = 2
    code = launch(str(three_regions), "fedavg", rounds, tmp_path / "run", time_scale=20.0, data=data,
                  overrides=["progress=false", "strategy.eval_every=1"], app_dir=ROOT, stream_to=log)
    assert code == 0, log.getvalue()[-3000:]
    results = results_of(tmp_path / "run")
    assert results["config"]["dataset"]["root"] == str(data.resolve())
    _, tensors = load_checkpoint(next((tmp_path / "run").glob("*/checkpoint.pt")))
    assert tensors["model"]["1.weight"].shape[1] == 40  # a model of the tabular rows' 40 features
    assert not (tmp_path / "run" / "data").exists()  # no digits split beside it
    evaluated = [e for e in results["history"] if e["accuracy"] is not None]
    assert results["clock"] == "wall" and results["history"][-1]["version"] == rounds
    assert evaluated[-1]["accuracy"] > evaluated[0]["accuracy"] + 0.1  # it learned
    assert evaluated[-1]["loss"] < evaluated[0]["loss"]
    assert set(results["regions"]) == {"ap-shanghai", "ap-guangzhou", "ap-chengdu"}
    assert results["summary"]["total_cost_usd"]["instance"] > 0  # the cost model on measured time
    # `auto` on the wall clock: FedAvg's default 30 rounds as the region model times them, each job with the
    # fixed time measured here (seconds: a ClientApp process per message), set once every region answered the
    # first round
    [budget] = [e for e in results["events"] if e["event"] == "time_budget_set"]
    modelled = modelled_baseline_s(OmegaConf.create(results["config"]))
    assert budget["seconds"] > modelled + 30 * 1.0  # over a second per round more
    assert budget["time_s"] < results["history"][2]["time_s"]  # before round 2 ended
    assert results["summary"]["ended_by"] == f"strategy.num_rounds ({rounds} rounds) done"
    assert all(results["regions"][r]["jobs"] >= 1 for r in results["regions"])
    # every job answered by its region's warm trainer (none computed cold in a ClientApp process)
    answered = {r: (tmp_path / "run" / "logs" / f"trainer-{r}.log").read_text().count("answering a train message")
                for r in results["regions"]}
    assert answered == {r: account["jobs"] for r, account in results["regions"].items()}
    # by default over TLS with SuperNode authentication, each region bound to its key's node
    assert "insecure" not in (tmp_path / "run" / "flwr-home" / "config.toml").read_text()
    assert set(results["config"]["region_nodes"]) == set(results["regions"])
    assert not [e for e in results["events"] if e["event"] in ("node_refused", "region_failed")]
    assert stat.S_IMODE((tmp_path / "run" / "keys" / "ap-chengdu").stat().st_mode) == 0o600
    assert flower_processes() <= before  # every process it started is gone


def test_each_region_computes_on_the_workers_its_plan_rents(three_regions, tmp_path):
    """MA with the elastic scheduler on real processes: ap-chengdu's plan rents 2 workers, and its jobs are
    computed by a data-parallel group of 2 forked inside its ClientApp (training/workers.py); the others by 1.
    The plan is adopted when the first period ends (its jobs went out with the roll call, on one worker
    each, as unscheduled): the second period's jobs are the plan's."""
    federation, config = _federation_run(three_regions, tmp_path, "ma", 2, "scheduler=elastic")
    before = flower_processes()
    with federation:
        federation.start_superlink()
        for region in federation.topology.region_names:
            federation.start_region(region, federation.run_dir / "data" / region)
        code = submit(federation, ROOT, config, None)
        assert code == 0, (federation.logs / "flwr-run.log").read_text()[-3000:]
    results = results_of(federation.run_dir)
    rented = {region: account["workers"] for region, account in results["regions"].items()}
    assert rented["ap-chengdu"] == 2  # geo3's plan (cloudless-fl plan), or the test says nothing
    assert results["summary"]["workers"] == rented
    assert flower_processes() <= before


def test_supernode_authentication_admits_only_registered_keys(three_regions, tmp_path):
    """Neither a SuperNode without a key nor one with a key the SuperLink never registered gets in."""
    before = flower_processes()
    with Federation(load_topology(three_regions), tmp_path / "run", time_scale=20.0) as federation:
        federation.start_superlink()
        federation.start_region("ap-shanghai", tmp_path / "run" / "data" / "ap-shanghai")
        unregistered, _ = write_node_key(federation.keys, "rogue")
        rogues = {name: federation._start(name, [
            "flower-supernode", *federation._security("supernode"), *key,
            "--superlink", f"127.0.0.1:{federation.superlink_port}", "--port", str(free_port()),
            "--node-config", "region='ap-chengdu'"])
            for name, key in {"keyless": [], "unregistered": ["--auth-supernode-private-key", str(unregistered)]}.items()}
        for name, rogue in rogues.items():
            assert rogue.wait(120) != 0, name
            assert "Failed to initialize the connection" in (federation.logs / f"{name}.log").read_text()
        listed = subprocess.run(["flwr", "supernode", "ls", CONNECTION, "--format", "json"], capture_output=True,
                                text=True, env=federation.env(), cwd=federation.run_dir, check=True).stdout
        nodes = {int(n["node-id"]): n["status"] for n in json.loads(listed)["nodes"]}
        assert nodes == {federation.node_ids["ap-shanghai"]: "online"}
    assert flower_processes() <= before


def test_a_killed_server_resumes_in_deployment(three_regions, tmp_path):
    """MA on a real federation: SIGKILL the ServerApp after a checkpoint, resubmit with resume=<its folder>.

    Over int8-compressed links: each region keeps its snapshots in its SuperNode's state-dir, across the
    ClientApp processes of every message and across the server's restart."""
    federation, config = _federation_run(three_regions, tmp_path, "ma", 4, "strategy.local_steps=5 compression=int8")
    with federation:
        first, _ = _submit_after_first_checkpoint(federation, config)
        server_apps = [pid for pid in descendants(federation.processes["superlink"].pid)
                       if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert server_apps
        for pid in server_apps:
            os.kill(pid, signal.SIGKILL)
        federation.processes.pop("flwr-run").send_signal(signal.SIGTERM)
        first.join(60)
        [folder] = [p.parent for p in federation.run_dir.glob("*/checkpoint.pt")]
        assert not (folder / "results.json").exists()
        code = submit(federation, ROOT, {**config, "overrides": config["overrides"] + f" resume={folder}"}, None)
        assert code == 0, (federation.logs / "flwr-run.log").read_text()[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert [e["event"] for e in results["events"]].count("resumed") == 1
    assert results["history"][-1]["version"] == 4
    assert [e["version"] for e in results["history"]] == [0, 1, 2, 3, 4]  # nothing lost, nothing counted twice
    assert results["summary"]["rejected_updates"] == 0  # every compressed reply decoded and passed
    model_bytes = record_bytes(ArrayRecord(build_model("mlp", (64,), 10, hidden=[1024, 1024]).state_dict()))
    for region, account in results["regions"].items():  # int8 both ways after each region's first, whole download
        assert account["bytes_up"] < 0.3 * model_bytes * account["jobs"], region
        assert account["bytes_down"] < model_bytes + 0.3 * model_bytes * (account["jobs"] - 1), region
    assert list((federation.run_dir / "region-state").glob("*/job-*.pt"))  # kept by the SuperNodes' ClientApps


def test_asgd_ga_carries_on_without_a_killed_supernode_and_takes_it_back(three_regions, tmp_path):
    """SIGKILL one region's SuperNode while it uploads a reply: ASGD-GA records the loss and goes on;
    restarted, it rejoins.

    Mid-upload is the hard case: Flower's grid retries pulling the half-sent reply until the SuperLink
    expires it (180 s), which froze the run before replies were awaited apart (`ReplyWatch`).
    Over TLS, and judged on learning too: this is also ASGD-GA's end-to-end run in deployment."""
    before = flower_processes()
    # 28 versions: the loss is seen a reply timeout (60 s) after the kill, near version 14, and the restarted node
    # needs ~30 s to be asked and given work; with 16 the run ended before it was back (CI, 2026-12-08)
    federation, config = _federation_run(three_regions, tmp_path, "asgd_ga_delta", 28,
                                         "strategy.reply_timeout_s=60 strategy.rejoin_every=2 strategy.eval_every=4 "
                                         "strategy.stop.max_time_s=null", security="tls")
    with federation:
        run, codes = _submit_after_first_checkpoint(federation, config)
        run_log = federation.logs / "flwr-run.log"
        node_log = federation.logs / "supernode-ap-chengdu.log"
        pushed = _replies_pushed(federation.logs, "ap-chengdu")
        # killed once its next reply is announced, while its arrays are still on the way
        _wait_for(lambda: _replies_pushed(federation.logs, "ap-chengdu") > pushed, 120, "reply from ap-chengdu",
                  poll=0.02)
        federation.kill_region("ap-chengdu")
        _wait_for(lambda: "region_lost" in _events_so_far(federation.run_dir), 120, "loss of ap-chengdu")
        restarted_at = node_log.stat().st_size
        federation.start_region("ap-chengdu", federation.run_dir / "data" / "ap-chengdu")
        run.join(600)
        assert not run.is_alive() and codes == [0], run_log.read_text()[-3000:]
        received = node_log.read_text()[restarted_at:].count("Received successfully")
    results = results_of(federation.run_dir)
    events = [(e["event"], e.get("region")) for e in results["events"]]
    assert ("region_lost", "ap-chengdu") in events and ("region_back", "ap-chengdu") in events
    assert events.index(("region_lost", "ap-chengdu")) < events.index(("region_back", "ap-chengdu"))
    lost_at = next(e["time_s"] for e in results["events"] if e["event"] == "region_lost")
    back_at = next(e["time_s"] for e in results["events"] if e["event"] == "region_back")
    # the others went on while it was away, and the restarted node was asked who it is and then given work
    assert any(lost_at < e["time_s"] < back_at for e in results["history"])
    assert received >= 2
    assert results["history"][-1]["version"] == 28
    evaluated = [e["accuracy"] for e in results["history"] if e["accuracy"] is not None]
    # Judged by the model the run ends with: since ASGD-GA balances by measured arrivals on the wall clock it
    # no longer swings on real processes (before: 0.17, 0.49, 0.71, 0.23, 0.56 at versions 0-16; after: 0.17,
    # 0.48, 0.73, 0.73, 0.90).
    assert evaluated[-1] > 0.6 and evaluated[-1] > evaluated[0] + 0.3  # it learned, and kept it
    assert "insecure" not in (federation.home / "config.toml").read_text()
    assert results["summary"]["lost_regions"] == 1 and results["summary"]["rejoined_regions"] == 1
    assert flower_processes() <= before


def test_fedavg_rounds_time_out_without_a_killed_supernode_and_the_run_goes_on(three_regions, tmp_path):
    before = flower_processes()
    # the first round (trainers warming up) took over 20 s here, and over 30 s on a slower night (2026-12-07: the
    # commit that had passed failed then too); every round after the kill waits out the timeout
    federation, config = _federation_run(three_regions, tmp_path, "fedavg", 3, "strategy.reply_timeout_s=60")
    with federation:
        run, codes = _submit_after_first_checkpoint(federation, config)
        federation.kill_region("ap-chengdu")
        run.join(600)
        run_log = (federation.logs / "flwr-run.log").read_text()
        assert not run.is_alive() and codes == [0], run_log[-3000:]
    results = results_of(federation.run_dir)
    assert [e["version"] for e in results["history"]] == [0, 1, 2, 3]
    incomplete = [e for e in results["events"] if e["event"] == "round_incomplete"]
    assert incomplete and all("ap-chengdu" in e["missing"] or "ap-chengdu" in e["failed"] for e in incomplete)
    assert "ap-chengdu" in run_log  # the warning names the region
    assert results["summary"]["failed_replies"] >= 1
    assert flower_processes() <= before


def test_sigterm_unwinds_like_ctrl_c_so_the_federation_is_stopped():
    stopped = []

    class Recorder:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            stopped.append(exc[0])

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt(), Recorder():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives at the next bytecode; never reached
    assert stopped == [KeyboardInterrupt]
    assert signal.getsignal(signal.SIGTERM) is before  # restored
