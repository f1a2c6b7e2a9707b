"""The Deployment Engine for real: SuperLink + 3 SuperNodes behind shaped proxies, on loopback."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cloudless_fl.config import compose
from cloudless_fl.launch import launch

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
            if any(k in line for k in ("flower-super", "flwr-serverapp", "flwr-clientapp"))
            and not line.split()[1].startswith("Z")}


def results_of(run_dir: Path) -> dict:
    [path] = run_dir.glob("*/results.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("strategy, rounds, tls", [("fedavg", 2, False), ("asgd_ga_delta", 8, True)])
def test_a_real_federation_trains_and_leaves_no_process(three_regions, tmp_path, strategy, rounds, tls):
    before = flower_processes()
    log = io.StringIO()
    code = launch(str(three_regions), strategy, rounds, tmp_path / "run", time_scale=20.0, tls=tls,
                  overrides=["progress=false", "strategy.eval_every=1"], app_dir=ROOT, stream_to=log)
    assert code == 0, log.getvalue()[-3000:]
    results = results_of(tmp_path / "run")
    evaluated = [e for e in results["history"] if e["accuracy"] is not None]
    assert results["clock"] == "wall" and results["history"][-1]["version"] == rounds
    # it learned: a few asynchronous versions in wall-clock arrival order wobble, so judge the run, not its last step
    assert max(e["accuracy"] for e in evaluated[1:]) > evaluated[0]["accuracy"] + 0.1
    assert evaluated[-1]["loss"] < 10 * evaluated[0]["loss"]
    assert set(results["regions"]) == {"ap-shanghai", "ap-guangzhou", "ap-chengdu"}
    assert results["summary"]["total_cost_usd"]["instance"] > 0  # the cost model on measured time
    assert all(results["regions"][r]["jobs"] >= 1 for r in results["regions"])
    if tls:
        assert (tmp_path / "run" / "certs" / "ca.crt").is_file()
        assert "insecure" not in (tmp_path / "run" / "flwr-home" / "config.toml").read_text()
    assert flower_processes() <= before  # every process it started is gone
