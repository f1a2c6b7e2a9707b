"""Whole runs (in-process engine): results.json contract, determinism, fail-fast input checks."""

import json
import re

import pytest

from cloudless_fl.config import compose
from cloudless_fl.errors import ConfigError, DataError
from cloudless_fl.run import run
from conftest import small_run_overrides

CONTRACT_SUMMARY = {"target_accuracy", "final_accuracy", "time_to_target_s", "cost_to_target_usd",
                    "wan_bytes_to_target", "total_time_s", "total_cost_usd", "wan_bytes", "utilization",
                    "rejected_updates", "dropped_stale"}
CONTRACT_ENTRY = {"version", "time_s", "cost_usd", "wan_bytes", "accuracy", "loss"}


def test_results_json_is_complete(two_region_topology, tmp_path):
    cfg = compose(small_run_overrides(two_region_topology, target_accuracy=0.5))
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["strategy"] == "fedavg" and results["seed"] == 1
    assert results["config"]["strategy"]["num_rounds"] == 3
    assert [e["version"] for e in results["history"]] == [0, 1, 2, 3]
    for entry in results["history"]:
        assert CONTRACT_ENTRY <= set(entry)
        assert set(entry["cost_usd"]) == {"instance", "serverless"}
    summary = results["summary"]
    assert CONTRACT_SUMMARY <= set(summary)
    assert summary["final_accuracy"] > results["history"][0]["accuracy"]
    assert set(summary["utilization"]) == {"fast", "slow"}
    assert summary["total_time_s"] > 0 and summary["wan_bytes"] > 0
    assert summary["ended_by"] == "strategy.num_rounds (3 rounds) done"
    assert not list(tmp_path.glob(".results.json.*"))  # no temp file left behind


def test_a_run_that_misses_its_target_says_which_budget_ended_it(two_region_topology, tmp_path, capsys):
    from cloudless_fl.run import print_summary

    cfg = compose(small_run_overrides(two_region_topology, target_accuracy=0.999) + ["strategy.stop.max_time_s=1"])
    payload = run(cfg, tmp_path)
    assert payload["summary"]["ended_by"] == "time budget 1 s reached"
    assert payload["summary"]["total_time_s"] >= 1 and len(payload["history"]) < 4  # before num_rounds
    print_summary(payload)
    assert "time-to-99.9 %: not reached (run ended: time budget 1 s reached)" in capsys.readouterr().out


def test_same_seed_same_figures(two_region_topology, tmp_path):
    runs = []
    for name in ("one", "two"):
        cfg = compose(small_run_overrides(two_region_topology))
        run(cfg, tmp_path / name)
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[0]["history"] == runs[1]["history"]
    cfg = compose(small_run_overrides(two_region_topology, seed=2))
    run(cfg, tmp_path / "three")
    other = json.loads((tmp_path / "three" / "results.json").read_text())
    assert other["history"] != runs[0]["history"]


def test_unknown_strategy_fails_before_training(two_region_topology, tmp_path):
    cfg = compose(small_run_overrides(two_region_topology, **{"strategy.name": "fedsgd"}))
    with pytest.raises(ConfigError, match="strategy='fedsgd' is not allowed; choose one of fedavg"):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_presplit_folder_must_match_regions(two_region_topology, tmp_path):
    (tmp_path / "data" / "fast").mkdir(parents=True)
    cfg = compose(small_run_overrides(two_region_topology, dataset="npz", **{"dataset.root": tmp_path / "data"}))
    with pytest.raises(DataError, match="no folder for region"):
        run(cfg, tmp_path / "run")


def test_presplit_npz_folder_runs(two_region_topology, tmp_path):
    from cloudless_fl.training.data import load_source, split_dataset

    split_dataset(load_source("digits"), {"fast": 0.3, "slow": 0.7}, tmp_path / "data")
    cfg = compose(small_run_overrides(two_region_topology, dataset="npz", **{"dataset.root": tmp_path / "data"}))
    payload = run(cfg, tmp_path / "run")
    assert payload["summary"]["final_accuracy"] > 0.3


@pytest.mark.parametrize("override, message", [
    ("strategy.lr=-0.1", "strategy.lr=-0.1 is out of range; allowed: > 0"),
    ("strategy.num_rounds=0", "strategy.num_rounds=0 is out of range; allowed: ≥ 1"),
    ("strategy.batch_size=2.5", "strategy.batch_size=2.5 must be an integer"),
    ("validation.on_norm=ignore", "validation.on_norm='ignore' is not allowed; choose one of reject, clip"),
    ("scheduler=elastic scheduler.smoothing=0", "scheduler.smoothing=0 is out of range; allowed: > 0 and ≤ 1"),
    ("strategy=ma strategy.local_steps={a:0}", "strategy.local_steps.a=0 is out of range"),
    ("strategy=ma strategy.local_steps={fast:10}", "strategy.local_steps must give a value for every region of the "
                                                   "topology (missing: slow) or one number for all"),
    ("strategy=asgd_ga strategy.accumulation_steps={fast:2,slow:3,mars:4}", "(unknown: mars)"),
    ("strategy=asgd_ga strategy.update=sideways", "strategy.update='sideways' is not allowed"),
    ("target_accuracy=1.5", "target_accuracy=1.5 is out of range"),
])
def test_bad_config_values_name_the_key_and_the_allowed_range(two_region_topology, tmp_path, override, message):
    cfg = compose(small_run_overrides(two_region_topology) + override.split())
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_progress_prints_plain_lines_off_a_terminal_and_a_live_bar_on_one(capsys):
    from cloudless_fl.reporting.progress import Progress

    entry = {"version": 2, "time_s": 1.5, "cost_usd": {"instance": 0.01}, "wan_bytes": 2e6, "accuracy": 0.5}
    plain = Progress("ma", total=4, unit="period", live=False)
    plain(entry)
    plain({**entry, "version": 3, "accuracy": None})  # not evaluated: no line
    plain.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["[ma] period    2  t=    1.50s  acc=0.5000  cost=$0.0100  wan=     2.0 MB"]
    live = Progress("asgd_ga", total=4, unit="version", live=True)
    live(entry)
    live.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "acc=0.5000" in captured.err and "2/4" in captured.err
    timed = Progress("asgd_ga", total=100_000, unit="version", time_budget_s=lambda: 3.0, live=True)  # fills with time
    timed(entry)
    timed.close()
    err = capsys.readouterr().err
    assert "1.5/3.0" in err and "version 2 " in err and "/100000" not in err
    budgets = [None, 9.0]  # the wall clock's `auto`: set once the run has measured it
    later = Progress("ma", total=1000, unit="period", time_budget_s=lambda: budgets[0], live=True)
    later(entry)
    assert "2/1000" in capsys.readouterr().err
    budgets.pop(0)
    later({**entry, "version": 3, "time_s": 4.5})
    later.close()
    err = capsys.readouterr().err
    assert "4.5/9.0" in err and "period 3 " in err


@pytest.mark.parametrize("strategy", ["ma", "fedavg"])
def test_clipped_updates_are_counted_in_results_json(two_region_topology, tmp_path, strategy):
    overrides = small_run_overrides(two_region_topology, **{"strategy": strategy, "validation.max_norm": 1e-3,
                                                             "validation.on_norm": "clip"})
    payload = run(compose(overrides), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    assert saved["clipped_updates"] == {"fast": 3, "slow": 3}  # 3 rounds/periods, every update over the bound
    assert saved["rejected_updates"] == 0 and payload["summary"]["clipped_updates"] == saved["clipped_updates"]


def test_a_dataset_file_outside_conf_is_used(two_region_topology, tmp_path):
    from cloudless_fl.training.data import load_source, split_dataset

    split_dataset(load_source("digits"), {"fast": 0.3, "slow": 0.7}, tmp_path / "data")
    spec = tmp_path / "mine.yaml"
    spec.write_text(f"name: mine\nsource: presplit\nroot: {tmp_path / 'data'}\nformat: auto\nnum_classes: null\n")
    payload = run(compose(small_run_overrides(two_region_topology, dataset_file=spec)), tmp_path / "run")
    assert payload["config"]["dataset_file"] == str(spec)
    assert sum(payload["regions"][r]["bytes_up"] > 0 for r in ("fast", "slow")) == 2
    with pytest.raises(ConfigError, match="dataset_file .*missing.yaml does not exist"):
        run(compose(small_run_overrides(two_region_topology, dataset_file=tmp_path / "missing.yaml")),
            tmp_path / "run2")


def test_a_finished_run_extended_by_more_rounds_equals_the_longer_run(two_region_topology, tmp_path):
    ma = ["strategy=ma", "strategy.local_steps=3"]
    longer = run(compose(small_run_overrides(two_region_topology, **{"strategy.num_rounds": 5}) + ma),
                 tmp_path / "whole")
    run(compose(small_run_overrides(two_region_topology, **{"strategy.num_rounds": 3}) + ma), tmp_path / "short")
    extended = run(compose(small_run_overrides(two_region_topology, **{"strategy.num_rounds": 5}) + ma
                           + [f"resume={tmp_path / 'short'}"]), tmp_path / "short")
    assert [e["version"] for e in extended["history"]] == [0, 1, 2, 3, 4, 5]
    assert extended["history"] == longer["history"] and extended["summary"] == longer["summary"]
