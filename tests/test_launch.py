"""What `cloudless-fl launch` tells the processes it starts (no process is started here)."""

from __future__ import annotations

from cloudless_fl.config import compose, topology_of
from cloudless_fl.deployment.launch import SUPEREXEC_POLL_ENV, THREADS_ENV, Federation


def _geo4(tmp_path, **kwargs) -> Federation:
    return Federation(topology_of(compose(["topology=geo4"])), tmp_path, **kwargs)


def test_each_supernode_is_paced_to_its_regions_profile(tmp_path):
    federation = _geo4(tmp_path, time_scale=10.0)
    # ap-chengdu: 500 samples/s per worker at efficiency 0.9, ten times faster
    assert federation._pace("ap-chengdu") == " pace-samples-per-s=4500.0"
    assert federation._pace("ap-beijing") == " pace-samples-per-s=36000.0"
    assert _geo4(tmp_path, pace=False)._pace("ap-chengdu") == ""


def test_superexec_polls_quickly_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    assert _geo4(tmp_path).env()[SUPEREXEC_POLL_ENV] == "0.1"
    monkeypatch.setenv(SUPEREXEC_POLL_ENV, "2.5")
    assert _geo4(tmp_path).env()[SUPEREXEC_POLL_ENV] == "2.5"


def test_the_regions_share_the_machines_cores_unless_told_otherwise(tmp_path, monkeypatch):
    """Each process's PyTorch gets its region's part of the cores: geo4's 4 regions on 8 cores, 2 threads each;
    on 2 cores, 1 each (never 0). A value the user set wins."""
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert _geo4(tmp_path).env()[THREADS_ENV] == "2"
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _geo4(tmp_path).env()[THREADS_ENV] == "1"
    monkeypatch.setenv(THREADS_ENV, "3")
    assert _geo4(tmp_path).env()[THREADS_ENV] == "3"
