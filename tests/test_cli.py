"""The `cloudless-fl` command: usage, errors, `plan`, `data split`, `launch`'s data check (the entry point itself,
installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudless_fl.cli import main
from cloudless_fl.config import compose
from cloudless_fl.reporting.plan_table import plans_for


def test_no_command_prints_the_usage(capsys):
    main([])
    assert "commands:" in capsys.readouterr().out


def test_an_unknown_command_names_itself_and_the_usage():
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        main(["train"])


def test_plan_prints_the_elastic_plan_beside_the_static_one(capsys):
    main(["plan", "topology=geo4", "strategy=ma"])
    lines = capsys.readouterr().out.splitlines()
    elastic, static = plans_for(compose(["scheduler=elastic", "topology=geo4", "strategy=ma"]))
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert set(rows) == set(elastic.regions)
    for name, row in rows.items():  # workers and local steps as planned, then the static plan's
        assert [int(row[1]), int(row[2])] == [elastic.regions[name].workers, elastic.regions[name].local_steps]
        assert [int(row[5]), int(row[6])] == [static.regions[name].workers, static.regions[name].local_steps]
    saving = 1 - elastic.total_usd / static.total_usd
    assert lines[-1].startswith(f"elastic vs static: {saving:+.1%} cost saved")
    assert elastic.regions["ap-chengdu"].workers > static.regions["ap-chengdu"].workers


def test_plan_with_a_bad_override_exits_with_the_error():
    with pytest.raises(SystemExit, match="error: invalid config override.*strategy/fedprox"):
        main(["plan", "strategy=fedprox"])
    with pytest.raises(SystemExit, match="error: strategy.lr=-1 is out of range"):
        main(["plan", "strategy.lr=-1"])


def test_data_split_writes_one_shard_per_region_and_the_test_set(tmp_path, capsys):
    main(["data", "split", "--out", str(tmp_path), "--topology", "geo4", "--seed", "3"])
    out = capsys.readouterr().out
    regions = ["ap-beijing", "ap-shanghai", "ap-guangzhou", "ap-chengdu"]
    sizes = {r: len(np.load(tmp_path / r / "train.npz")["y"]) for r in regions}
    test = len(np.load(tmp_path / "test.npz")["y"])
    assert sum(sizes.values()) + test == 1797  # every bundled digit, once
    assert sizes["ap-chengdu"] > sizes["ap-beijing"]  # shares 0.4 and 0.1
    assert f"ap-chengdu: {sizes['ap-chengdu']} samples" in out


def test_data_split_of_an_unknown_topology_exits_with_the_error(tmp_path):
    with pytest.raises(SystemExit, match="error:"):
        main(["data", "split", "--out", str(tmp_path), "--topology", "nowhere"])


def test_launch_refuses_a_data_folder_that_is_no_split_for_its_regions(tmp_path):
    """Before any process starts (the ServerApp's own check, `config.check_presplit`): a folder with no test
    set, and a split written for other regions, each named with the fix (`data split` for this topology)."""
    empty, world5 = tmp_path / "empty", tmp_path / "world5"
    empty.mkdir()
    main(["data", "split", "--out", str(world5), "--topology", "world5"])
    for region in ("ap-beijing", "ap-shanghai", "ap-guangzhou", "ap-chengdu"):
        (empty / region).mkdir()
    with pytest.raises(SystemExit, match=r"error: .*empty has no test.npz for central evaluation; write one "
                                         r"\(x, y\), or split with `cloudless-fl data split`"):
        main(["launch", "--data", str(empty), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=r"error: .*world5 has no folder for region\(s\) ap-beijing, ap-shanghai, "
                                         r"ap-guangzhou, ap-chengdu; .* write them with `cloudless-fl data split "
                                         r"--topology <this topology>"):
        main(["launch", "--topology", "geo4", "--data", str(world5), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # no federation was started


@pytest.mark.subprocess
def test_the_installed_command_runs():
    exe = Path(sys.executable).parent / "cloudless-fl"
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "report FOLDER" in done.stdout
