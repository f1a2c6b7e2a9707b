"""Drop-in: a stock Flower ClientApp (quickstart-shaped, its own model and data) with only the strategy changed."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from cloudless_fl.deployment.grid import InProcessGrid
from conftest import app_modules
from cloudless_fl.errors import ConfigError
from cloudless_fl.strategy import AsyncGradAccum, ModelAveraging
from cloudless_fl.training.compression import Int8, TopK
from cloudless_fl.training.mod import cloudless_mod

STOCK = Path(__file__).resolve().parent / "stock_app"
NODES, ROUNDS = 3, 5


@pytest.fixture
def stock():
    with app_modules(STOCK, "client_app", "task") as modules:
        yield modules


def _run(stock, strategy, num_rounds, train_config):
    """Run `strategy` on the stock app; returns (best accuracy, message types sent)."""
    result, sent = _result(stock, strategy, num_rounds, train_config)
    return max(m["accuracy"] for m in result.evaluate_metrics_serverapp.values()), sent


def _result(stock, strategy, num_rounds, train_config):
    """Run `strategy` on the stock app; returns (Flower's Result, message types sent)."""
    client_app, task = stock
    grid = InProcessGrid(client_app.app, NODES)
    sent = []
    push = grid.push_messages
    grid.push_messages = lambda messages: push([sent.append(m.metadata.message_type) or m for m in messages])
    torch.manual_seed(0)
    initial = ArrayRecord(task.make_model().state_dict())
    model = task.make_model()

    def evaluate(server_round, arrays):
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": task.accuracy(model)})

    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, train_config=train_config,
                            evaluate_fn=evaluate)
    return result, set(sent)


def test_the_served_model_is_evaluated_every_eval_every_versions_and_at_the_end(stock):
    """`eval_every=4` over 10 versions: the initial model, versions 4 and 8, and the last one, nothing else."""
    result, _ = _result(stock, AsyncGradAccum(update="delta", local_lr=0.1, eval_every=4), 10,
                        ConfigRecord({"lr": 0.1}))
    assert sorted(result.evaluate_metrics_serverapp) == [0, 4, 8, 10]


def test_ma_and_asgd_ga_delta_learn_as_well_as_fedavg_with_no_client_change(stock, caplog):
    caplog.set_level(logging.INFO, logger="cloudless_fl")
    config = ConfigRecord({"lr": 0.1})
    fedavg, _ = _run(stock, FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES), ROUNDS, config)
    ma, ma_sent = _run(stock, ModelAveraging(lr=0.1), ROUNDS, config)
    # as much work: one job (an epoch on one node) per version, NODES jobs per FedAvg round
    asgd, asgd_sent = _run(stock, AsyncGradAccum(update="delta", local_lr=0.1, eval_every=NODES),
                           ROUNDS * NODES, config)
    print(f"best accuracy: FedAvg {fedavg:.3f}, MA {ma:.3f}, ASGD-GA delta {asgd:.3f}")
    assert fedavg > 0.6  # the task is learnable: chance is 0.25
    assert ma >= 0.9 * fedavg and asgd >= 0.9 * fedavg
    assert ma_sent == asgd_sent == {"train"}  # no region query a stock ClientApp cannot answer
    ours = [r for r in caplog.records if r.name == "cloudless_fl"]
    assert not [r for r in ours if r.levelno >= logging.WARNING]
    named = f"{NODES} nodes named node-<id> with equal data shares (not asked their region: query_regions=False)"
    assert [r.getMessage() for r in ours].count(named) == 2  # one INFO line per run


@pytest.mark.parametrize("mod", [False, True], ids=["stock", "stock+mod"])
def test_a_stock_app_under_mas_drift_correction_trains_plainly_as_without_it(stock, caplog, mod):
    """MA's default corrects drift after a warm-up; here from the first period. Without `steps` in its replies
    (the stock app) the server cannot scale a correction and never asks for one; with the Mod (which reports
    `steps`) every job after the first names the job to correct from, and the app, which never answers
    `drift-corrected`, trains plainly. Either way it learns as well as without the correction, with no warning."""
    caplog.set_level(logging.INFO, logger="cloudless_fl")
    client_app, task = stock
    app = with_mod(client_app) if mod else client_app.app
    config = ConfigRecord({"lr": 0.1})
    plain, _ = _run((SimpleNamespace(app=app), task), ModelAveraging(lr=0.1), ROUNDS, config)
    received = []

    def recording(msg, ctx):
        received.append(dict(msg.content["config"]))
        return app(msg, ctx)

    asked, _ = _run((SimpleNamespace(app=recording), task),
                    ModelAveraging(lr=0.1, drift_correction=True, drift_warmup=0.0), ROUNDS, config)
    print(f"best accuracy: MA {plain:.3f}, MA with drift correction {asked:.3f}")
    corrections_asked = sum("drift-from-job" in c for c in received)
    assert corrections_asked == ((ROUNDS - 1) * NODES if mod else 0)
    assert asked >= 0.9 * plain
    assert not [r for r in caplog.records if r.name == "cloudless_fl" and r.levelno >= logging.WARNING]


def test_a_stock_app_under_asgd_gas_drift_correction_is_sent_it_once_and_trains_plainly(stock, caplog):
    """ASGD-GA's correction goes out with each job once every node has answered one; the stock app ignores the
    extra record and never answers `drift-corrected`, so each node is sent one and no more (no download wasted)
    and the run learns as without it, with no warning."""
    caplog.set_level(logging.INFO, logger="cloudless_fl")
    client_app, task = stock
    config = ConfigRecord({"lr": 0.1})
    settings = dict(update="delta", local_lr=0.1, eval_every=NODES)
    plain, _ = _run(stock, AsyncGradAccum(**settings), ROUNDS * NODES, config)
    received = []

    def recording(msg, ctx):
        received.append("drift-correction" in msg.content)
        return client_app.app(msg, ctx)

    asked, _ = _run((SimpleNamespace(app=recording), task), AsyncGradAccum(drift_correction=True, **settings),
                    ROUNDS * NODES, config)
    print(f"best accuracy: ASGD-GA delta {plain:.3f}, with drift correction {asked:.3f}")
    assert sum(received) == NODES and len(received) > 2 * NODES
    assert asked >= 0.9 * plain
    assert not [r for r in caplog.records if r.name == "cloudless_fl" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("preset, update", [("asgd_ga_delta", "delta"), ("asgd_ga", "gradient")])
def test_a_drop_in_asgd_ga_serves_the_model_a_configured_run_serves(preset, update):
    """A Flower user constructing the class gets the served average the Hydra preset has (deltas: an average of
    versions, which swing; gradients: the last version), and an explicit choice is kept."""
    from cloudless_fl.config import compose

    assert AsyncGradAccum(update=update).average_decay == compose([f"strategy={preset}"]).strategy.average_decay
    assert AsyncGradAccum(update=update, average_decay=None).average_decay is None
    assert AsyncGradAccum(update=update, average_decay=0.5).average_decay == 0.5


@pytest.mark.parametrize("preset", ["ma", "asgd_ga", "asgd_ga_delta"])
def test_a_drop_in_strategy_waits_looks_and_replans_as_a_configured_run_does(preset):
    """The run-level settings a Flower user constructing the class does not think of (how long a silent node is
    waited for, how often nodes that (re)join are looked for, how often a scheduler re-plans) default to the
    Hydra presets' values: the same run drop-in or configured; an explicit choice is kept."""
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.scheduler import Scheduler, Workload

    cfg = compose([f"strategy={preset}", "scheduler=elastic"])
    cls, update = {"ma": (ModelAveraging, None), "asgd_ga": (AsyncGradAccum, "gradient"),
                   "asgd_ga_delta": (AsyncGradAccum, "delta")}[preset]
    kwargs = {} if update is None else {"update": update}
    strategy = cls(scheduler=Scheduler(topology_of(cfg), Workload({}, 0)), **kwargs)
    assert strategy.jobs.reply_timeout == cfg.strategy.reply_timeout_s
    assert strategy.rejoin_every == cfg.strategy.rejoin_every
    assert strategy.plan.replan_every == cfg.scheduler.replan_every
    chosen = cls(scheduler=Scheduler(topology_of(cfg), Workload({}, 0)), reply_timeout=5.0, rejoin_every=1,
                 replan_every=1, **kwargs)
    assert (chosen.jobs.reply_timeout, chosen.rejoin_every, chosen.plan.replan_every) == (5.0, 1, 1)


def test_a_stock_app_asked_who_it_is_takes_part_under_its_node_id(stock):
    """Asked its region (`query_regions=True`, as cloudless-fl's own ServerApp asks), a stock ClientApp without a
    query function errs ("No query function registered"): that is no failure, the node is `node-<id>`."""
    ma = ModelAveraging(lr=0.1, query_regions=True)
    _, sent = _run(stock, ma, 2, ConfigRecord({"lr": 0.1}))
    assert sent == {"query", "train"}
    assert sorted((info.node_id, info.name) for info in ma.roster.live.values()) == [
        (n, f"node-{n}") for n in range(1, NODES + 1)]
    assert not ma.roster.refused and ma.step == 2


def test_a_stock_replys_new_weights_are_taken_against_the_model_its_job_was_sent(stock, monkeypatch):
    """ASGD-GA delta with the stock app, which replies new weights: by the time a reply comes the model has
    moved on (other regions' updates were applied), so its change is taken from the model the job carried."""
    from cloudless_fl.strategy.base import GeoStrategy
    from cloudless_fl.training import protocol

    seen, complete = [], GeoStrategy._complete

    def recording(self, flight, reply, mode):
        now = {k: v.clone() for k, v in self.optimizer.state.items()}
        tensors, metrics = complete(self, flight, reply, mode)
        seen.append((flight.arrays.to_torch_state_dict(), protocol.reply_arrays(reply).to_torch_state_dict(),
                     tensors, now))
        return tensors, metrics

    monkeypatch.setattr(GeoStrategy, "_complete", recording)
    _result(stock, AsyncGradAccum(update="delta", local_lr=0.1), 12, ConfigRecord({"lr": 0.1}))
    moved = 0
    for sent, new, change, now in seen:
        assert change is not None and all(torch.equal(change[k], sent[k] - new[k]) for k in change)
        moved += any(not torch.equal(sent[k], now[k]) for k in change)
    assert moved >= len(seen) // 2  # most replies came after the model had moved: the two bases differ


def test_gradient_mode_refuses_a_stock_reply_with_what_to_do(stock):
    with pytest.raises(ConfigError, match=r"asked region node-\d+ for gradient updates .* stock Flower reply.*"
                                          r"update='delta'"):
        _run(stock, AsyncGradAccum(update="gradient"), 5, ConfigRecord({"lr": 0.1}))


def with_mod(client_app) -> ClientApp:
    """The stock app with the one line a user adds: `ClientApp(mods=[cloudless_mod])`."""
    app = ClientApp(mods=[cloudless_mod])
    app.train()(client_app.train)
    return app


def test_the_stock_app_with_the_mod_added_learns_in_gradient_mode(stock):
    client_app, task = stock
    fedavg, _ = _run(stock, FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES), ROUNDS, ConfigRecord({"lr": 0.1}))
    modded = (SimpleNamespace(app=with_mod(client_app)), task)
    gradient, _ = _run(modded, AsyncGradAccum(update="gradient", lr=0.5, eval_every=6), 60, ConfigRecord({"lr": 0.1}))
    print(f"best accuracy: FedAvg {fedavg:.3f}, ASGD-GA gradient (stock app + Mod) {gradient:.3f}")
    assert gradient >= 0.9 * fedavg


@pytest.mark.parametrize("codec", [Int8(256), TopK(0.1)], ids=["int8", "topk"])
def test_the_stock_app_with_the_mod_added_learns_over_compressed_traffic(stock, tmp_path, codec):
    """The Mod rebuilds each compressed download before the app sees it and sends the app's change compressed."""
    client_app, task = stock
    modded = (SimpleNamespace(app=with_mod(client_app)), task)
    runs = {}
    for name, compression in (("plain", None), ("compressed", codec)):
        for strategy in (ModelAveraging(lr=0.1, compression=compression),
                         AsyncGradAccum(update="delta", local_lr=0.1, eval_every=NODES, compression=compression)):
            best, _ = _run(modded, strategy, ROUNDS if isinstance(strategy, ModelAveraging) else ROUNDS * NODES,
                           ConfigRecord({"lr": 0.1, "state-dir": str(tmp_path / name)}))
            runs[name, type(strategy).__name__] = best, strategy.meter.wan_bytes_unpriced, strategy.history.counters
    for kind in ("ModelAveraging", "AsyncGradAccum"):
        (plain, plain_bytes, _), (compressed, compressed_bytes, counters) = runs["plain", kind], runs["compressed", kind]
        assert compressed >= plain - 0.05, kind
        # measured 0.50 (int8) and 0.51 (topk 0.1): a tiny model, where each array's ~128-byte npy header
        # weighs and topk's first download per node is whole
        assert compressed_bytes < 0.6 * plain_bytes, kind
        assert not counters.get("rejected_updates"), kind  # every compressed reply decoded and passed
    assert list((tmp_path / "compressed").glob("node-*/job-*.pt"))  # the Mod kept its snapshots


def test_the_mod_makes_the_stock_app_do_mas_planned_local_steps(stock):
    client_app, task = stock
    grid = InProcessGrid(with_mod(client_app), NODES)
    pull = grid.pull_messages
    steps = []
    grid.pull_messages = lambda ids: [steps.append(r.content["metrics"]["steps"]) or r for r in pull(ids)]
    torch.manual_seed(0)
    ModelAveraging(lr=0.1, local_steps=7).start(grid=grid, initial_arrays=ArrayRecord(task.make_model().state_dict()),
                                                num_rounds=2, train_config=ConfigRecord({"lr": 0.1}))
    assert steps == [7] * (2 * NODES)  # not the app's own epoch (~37 steps)


def test_ma_without_reported_steps_is_a_plain_num_examples_weighted_average(stock, monkeypatch):
    """With no `steps` in the replies FedNova has nothing to normalise by: MA must equal Flower's FedAvg."""
    client_app, task = stock
    results = []
    for strategy in (ModelAveraging(lr=0.1), FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES)):
        grid = InProcessGrid(client_app.app, NODES)
        torch.manual_seed(0)
        initial = ArrayRecord(task.make_model().state_dict())
        monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.arange(n))  # same batches both runs
        results.append(strategy.start(grid=grid, initial_arrays=initial, num_rounds=2,
                                      train_config=ConfigRecord({"lr": 0.1})).arrays.to_torch_state_dict())
    for name, tensor in results[1].items():
        assert torch.allclose(results[0][name], tensor, atol=1e-6), name


def _local_superlink_processes(flwr_home: Path) -> list[int]:
    """Pids of the managed local SuperLink `flwr run` started for `flwr_home` (its database lies there)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(flwr_home).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


@pytest.mark.integration
def test_flwr_run_trains_the_stock_app_on_the_simulation_engine(tmp_path):
    """`flwr run` itself on Flower's managed local SuperLink, the app's environment as it is (no per-run install):
    FedAvg, MA and ASGD-GA delta with the same work, and with the Mod added ASGD-GA's gradient mode; each within
    90 % of FedAvg's best accuracy."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    try:
        httpx.get("http://127.0.0.1:39091/health", timeout=1)
        pytest.fail("a local Flower SuperLink already runs on 127.0.0.1:39091; stop it (this test starts its own)")
    except httpx.HTTPError:
        pass
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    modded = tmp_path / "stock_app_with_mod"  # the same app plus the one line a user adds
    shutil.copytree(STOCK, modded, ignore=shutil.ignore_patterns("__pycache__"))
    source = (modded / "client_app.py").read_text()
    assert "app = ClientApp()" in source
    (modded / "client_app.py").write_text(source.replace(
        "app = ClientApp()", "from cloudless_fl.training.mod import cloudless_mod\napp = ClientApp(mods=[cloudless_mod])"))
    best, logs = {}, {}
    try:
        for app, strategy, rounds in ((STOCK, "fedavg", ROUNDS), (STOCK, "ma", ROUNDS),
                                      (STOCK, "asgd_ga_delta", ROUNDS * NODES), (modded, "asgd_ga_gradient", 60)):
            done = subprocess.run([str(bin_dir / "flwr"), "run", ".", "--federation-config", f"num-supernodes={NODES}",
                                   "--stream", "--run-config", f"strategy='{strategy}' num-server-rounds={rounds}"],
                                  cwd=app, env=env, capture_output=True, text=True, timeout=300)
            logs[strategy] = log = done.stdout + done.stderr
            assert done.returncode == 0, log[-3000:]
            assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
            best[strategy] = float(log.split("best accuracy ")[1].split(",")[0])
    finally:
        for pid in _local_superlink_processes(tmp_path / "flwr"):
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _local_superlink_processes(tmp_path / "flwr") and time.monotonic() < deadline:
            time.sleep(0.2)
    print(f"flwr run, best accuracy: {best}")
    assert best["fedavg"] > 0.6
    assert all(best[s] >= 0.9 * best["fedavg"] for s in ("ma", "asgd_ga_delta", "asgd_ga_gradient")), best
    assert not _local_superlink_processes(tmp_path / "flwr")
