"""`cloudless-fl report`: table values equal the JSON's, every plot is written, broken runs are skipped."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cloudless_fl.config import compose
from cloudless_fl.reporting.plots import PLOTS
from cloudless_fl.reporting.report import rows, write_report
from cloudless_fl.reporting.results import load_runs
from cloudless_fl.run import run
from conftest import small_run_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory):
    """Small real runs: FedAvg and MA (elastic) on two seeds, ASGD-GA on one, on a two-region topology."""
    import yaml

    from conftest import TWO_REGIONS

    root = tmp_path_factory.mktemp("report")
    topology = root / "two.yaml"
    fluctuating = {**TWO_REGIONS, "fluctuation": {"window_s": 5, "sigma": 0.3}}
    topology.write_text(yaml.safe_dump(fluctuating))
    base = small_run_overrides(topology) + ["target_accuracy=0.6", "strategy.num_rounds=4"]
    for seed in (1, 2):
        run(compose(base + ["strategy=fedavg", f"seed={seed}"]), root / f"fedavg-{seed}")
        run(compose(base + ["strategy=ma", "scheduler=elastic", f"seed={seed}"]), root / f"ma-{seed}")
    run(compose(base + ["strategy=asgd_ga_delta", "strategy.num_rounds=30", "seed=1"]), root / "async-1")
    return root


def test_table_values_equal_those_recomputed_from_the_json(runs_folder):
    text = write_report(runs_folder)
    table = {row["label"]: row for row in rows(load_runs(runs_folder)[0])}
    assert set(table) == {"fedavg", "ma+elastic", "asgd_ga_delta"}
    data = {p.parent.name: json.loads(p.read_text()) for p in runs_folder.rglob("results.json")}
    finals = [data[f"ma-{s}"]["summary"]["final_accuracy"] for s in (1, 2)]
    assert table["ma+elastic"]["final"] == finals
    expected_final = f"{statistics.fmean(finals):.3g} ± {statistics.stdev(finals):.2g}"
    line = next(l for l in text.splitlines() if "| ma+elastic |" in l)
    assert expected_final in line
    compared = 0
    for seed in (1, 2):
        fed, ma = data[f"fedavg-{seed}"]["summary"], data[f"ma-{seed}"]["summary"]
        i = table["ma+elastic"]["seeds"].index(seed)
        if fed["time_to_target_s"] and ma["time_to_target_s"]:
            compared += 1
            assert table["ma+elastic"]["speedup"][i] == pytest.approx(fed["time_to_target_s"] / ma["time_to_target_s"])
            reduction = 1 - ma["cost_to_target_usd"]["instance"] / fed["cost_to_target_usd"]["instance"]
            assert table["ma+elastic"]["red_i"][i] == pytest.approx(reduction)
    assert compared >= 1  # the ratios were checked for at least one seed
    assert (runs_folder / "report.md").read_text().startswith("| topology | run | seeds |")
    header = text.splitlines()[0]
    assert "time-to-60 % (s)" in header and "WAN GB to 60 %" in header and "95" not in header


def test_runs_at_other_targets_get_their_own_rows_and_a_target_column(runs_folder, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(runs_folder / "fedavg-1", folder / "at-60")
    other = json.loads((runs_folder / "fedavg-1" / "results.json").read_text())
    other["summary"]["target_accuracy"] = 0.5
    (folder / "at-50").mkdir()
    (folder / "at-50" / "results.json").write_text(json.dumps(other))
    lines = write_report(folder).splitlines()
    assert lines[0].startswith("| topology | run | seeds | target | time-to-target (s) |")
    assert {line.split(" | ")[3] for line in lines[2:4]} == {"50 %", "60 %"}


def test_every_plot_is_written(runs_folder):
    write_report(runs_folder)
    for name in PLOTS:
        png = runs_folder / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_broken_results_are_skipped_with_their_path(runs_folder, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(runs_folder / "fedavg-1", folder / "good")
    (folder / "corrupt").mkdir()
    (folder / "corrupt" / "results.json").write_text('{"strategy": "ma", "seed": ')
    (folder / "partial").mkdir()
    (folder / "partial" / "results.json").write_text('{"strategy": "ma", "seed": 1}')
    text = write_report(folder)
    assert f"skipped {folder / 'corrupt' / 'results.json'}" in text
    assert f"skipped {folder / 'partial' / 'results.json'}: missing keys" in text
    assert "| two | fedavg | 1 |" in text


@pytest.mark.suite
def test_quick_reproduction_suite_has_every_row(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "experiments"))
    from reproduce import studies

    expected = {(study, label) for study, spec in studies().items() for label in spec["quick"]["runs"]}
    report = (out / "report.md").read_text()
    for _, label in expected:
        assert f"| {label} |" in report, label
    assert all((out / "plots" / f"{name}.png").is_file() for name in PLOTS)
    assert "skipped" not in report


def test_runs_on_another_dataset_get_their_own_rows_and_ideal(runs_folder, tmp_path):
    """A run on another dataset is neither merged with, nor compared against, the first dataset's runs."""
    import shutil

    folder = tmp_path / "datasets"
    for name in ("fedavg-1", "ma-1"):
        shutil.copytree(runs_folder / name, folder / name)
    other = json.loads((runs_folder / "ma-1" / "results.json").read_text())
    other["config"]["dataset"]["name"] = "tabular"
    (folder / "ma-tabular").mkdir()
    (folder / "ma-tabular" / "results.json").write_text(json.dumps(other))
    ideal = json.loads((runs_folder / "fedavg-1" / "results.json").read_text())
    ideal["topology"]["name"] = "lan"
    (folder / "ideal-digits").mkdir()
    (folder / "ideal-digits" / "results.json").write_text(json.dumps(ideal))
    found = rows(load_runs(folder)[0])
    assert sorted((row["topology"] == "lan", row["dataset"], row["label"]) for row in found) == [
        (False, "digits", "fedavg"), (False, "digits", "ma+elastic"), (False, "tabular", "ma+elastic"),
        (True, "digits", "fedavg")]
    table = {(row["dataset"], row["label"]): row for row in found if row["topology"] != "lan"}
    assert table["digits", "ma+elastic"]["acc_gap"] != [None]  # digits' Ideal is digits'
    assert table["tabular", "ma+elastic"]["acc_gap"] == [None] and table["tabular", "ma+elastic"]["speedup"] == [None]
    lines = write_report(folder).splitlines()
    assert lines[0].startswith("| topology | dataset | run | seeds |")
    assert any("| tabular | ma+elastic |" in line for line in lines)
