"""`cloudless-fl launch`: a real federation on this machine, one SuperNode per region behind its WAN.

Starts `flower-superlink`, one `WanProxy` per region shaped by the topology's
link, one warm trainer per region (`cloudless-fl trainer`, clients/warm_trainer.py;
restarted when it exits), one `flower-supernode` per region (connecting through
its proxy, told its region, data folder and trainer by `--node-config`), submits
the app with `flwr run` and streams its log. Everything lives in the run folder: `flwr-home/`
(`FLWR_HOME`, so the user's own Flower config is untouched), `data/` (the
split), `logs/` (one file per process) and the run's `results.json`. Ctrl-C
or the end of the run stops every process it started (whole process groups:
SuperNodes start children of their own).

By default every connection is over TLS and the SuperLink admits only
SuperNodes whose key it registered (Flower's SuperNode authentication): one
key pair per region under `keys/`, registered with `flwr supernode register`,
and the run is told which node id each region's key has (`region_nodes`), so a
node cannot speak for another region (strategy/membership.py).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clients.warm_trainer import NODE_KEY as NODE_TRAINER

from ..config import check_presplit, compose, topology_of
from ..training.data import load_source, split_dataset
from ..training.pacing import NODE_KEY as NODE_PACE
from ..training.workers import NODE_KEY as NODE_MAX_WORKERS
from ..errors import ConfigError
from ..control.topology import Topology
from .certs import write_certificates, write_node_key
from .wanproxy import WanProxy, link_shapes

CONNECTION = "cloudless-launch"
SECURITY = ("auth", "tls", "insecure")  # TLS + SuperNode authentication | TLS only | neither
STOP_GRACE_S = 10.0
SUPERVISE_EVERY_S = 0.5  # how often a region's trainer is checked for having exited
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # flwr/supercore/superexec/run_superexec.py
THREADS_ENV = "OMP_NUM_THREADS"  # PyTorch's intra-op threads in every process launch starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with code {process.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{log.stem} did not listen on port {port} within {timeout:.0f} s; see {log}")


@dataclass
class Federation:
    """SuperLink + shaped proxies + SuperNodes for a topology; a context manager that stops them all.

    Parameters
    ----------
    topology : Topology
    run_dir : Path
        Holds `flwr-home/`, `logs/`, and is where the data split is expected (`data/`).
    seed : int
        Seeds the links' bandwidth fluctuation, as in simulation.
    time_scale : float
        > 1 makes every link faster by that factor (and latency shorter), and paced compute too.
    pace : bool
        Each SuperNode computes at its region's profile speed (training/pacing.py): a job that is done
        sooner on this machine waits out the difference, so the federation has the topology's heterogeneity.
    security : str
        `auth` (default): throwaway certificates, every connection over TLS, and only SuperNodes with a
        registered key admitted, each region's key bound to its name; `tls`: TLS only; `insecure`: neither.
    max_workers : int | None
        The most data-parallel worker processes a region's SuperNode starts for one job (training/workers.py;
        each job gets the plan's count up to this). None (default): the region's `workers.max`; 1: every job
        computed in the SuperNode's ClientApp process alone.
    """

    topology: Topology
    run_dir: Path
    seed: int = 1
    time_scale: float = 1.0
    pace: bool = True
    security: str = "auth"
    max_workers: int | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    trainer_restarts: dict[str, int] = field(default_factory=dict)  # region → times its trainer was restarted
    proxies: dict[str, WanProxy] = field(default_factory=dict)
    superlink_port: int = 0
    node_ids: dict[str, int] = field(default_factory=dict)  # region → the node id its registered key has

    def __post_init__(self) -> None:
        if self.security not in SECURITY:
            raise ConfigError(f"security={self.security!r} is unknown; use one of {', '.join(SECURITY)}")
        if self.max_workers is not None and self.max_workers < 1:
            raise ConfigError(f"max workers per region must be at least 1, got {self.max_workers}")
        self._lock = threading.Lock()  # `processes`, shared with the trainers' supervisor
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._sockets: Path | None = None

    @property
    def tls(self) -> bool:
        return self.security != "insecure"

    @property
    def home(self) -> Path:
        return self.run_dir / "flwr-home"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def certs(self) -> Path:
        return self.run_dir / "certs"

    @property
    def keys(self) -> Path:
        return self.run_dir / "keys"

    def env(self) -> dict[str, str]:
        """The processes' environment: our FLWR_HOME, this venv first on PATH, SuperExec looking for new
        tasks every 0.1 s instead of Flower's default 1 s (each message is a task), and each process's
        PyTorch using its region's part of this machine's cores (unless either is set already)."""
        bin_dir = str(Path(sys.executable).parent)
        return {SUPEREXEC_POLL_ENV: "0.1", THREADS_ENV: str(self.threads_per_region), **os.environ,
                "FLWR_HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    @property
    def threads_per_region(self) -> int:
        """This machine's cores shared among the regions, at least one each. Every region's trainer would
        otherwise start a thread per core: on 2 cores, 4 regions ran 8 compute threads (see docs/deployment.md)."""
        return max(1, (os.cpu_count() or 1) // len(self.topology.regions))

    def _security(self, role: str) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if role == "superlink":
            return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"),
                    *(["--enable-supernode-auth"] if self.security == "auth" else [])]
        return ["--root-certificates", str(self.certs / "ca.crt")]

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it; a restart appends
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.run_dir, start_new_session=True)
        with self._lock:
            self.processes[name] = proc
        return proc

    def trainer_socket(self, region: str) -> Path:
        """Where the region's trainer answers: a private folder under the system's temp dir (a Unix socket's
        path must be short; the run folder's may not be)."""
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="cfl-trainers-"))
        return self._sockets / f"{region}.sock"

    def start_trainer(self, region: str, ready_timeout: float = 60.0) -> None:
        """The region's warm trainer; returns once it answers (its key and socket written), and from then on
        is restarted by the supervisor whenever it exits."""
        socket_path = self.trainer_socket(region)
        socket_path.unlink(missing_ok=True)
        proc = self._start(f"trainer-{region}", ["cloudless-fl", "trainer", "--socket", str(socket_path)])
        deadline = time.monotonic() + ready_timeout
        while not socket_path.exists() and not self._stopping.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the trainer of region {region} did not start; see {self.logs}/trainer-{region}.log")
            time.sleep(0.1)
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="trainer-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        """Restart every region's trainer that exited (a crash, a kill), until the federation stops."""
        while not self._stopping.wait(SUPERVISE_EVERY_S):
            with self._lock:
                exited = [name for name, proc in self.processes.items()
                          if name.startswith("trainer-") and proc.poll() is not None]
            for name in exited:
                if self._stopping.is_set():
                    return
                region = name.removeprefix("trainer-")
                self.trainer_restarts[region] = self.trainer_restarts.get(region, 0) + 1
                try:
                    self.start_trainer(region)
                except RuntimeError:
                    pass  # tried again on the next check; the region's jobs are computed cold meanwhile

    def start_superlink(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            write_certificates(self.certs)
        self.superlink_port = free_port()
        proc = self._start("superlink", ["flower-superlink", *self._security("superlink"),
                                         "--disable-runtime-dependency-installation",
                                         "--port", str(self.superlink_port)])
        wait_for_port(self.superlink_port, 60, proc, self.logs / "superlink.log")
        connection = [f'[superlink]\ndefault = "{CONNECTION}"\n', f"[superlink.{CONNECTION}]",
                      f'address = "127.0.0.1:{self.superlink_port}"']
        connection.append(f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(connection) + "\n")

    def start_region(self, region: str, data_dir: Path, app_config: str = "") -> None:
        """A region's proxy (if not already running) and its SuperNode, connecting through it. `app_config`:
        more node config for the app, space-separated `key=value` (e.g. a stock app's `partition-id=0`)."""
        if region not in self.proxies:
            up, down = link_shapes(self.topology, region, self.seed, self.time_scale)
            self.proxies[region] = WanProxy(("127.0.0.1", self.superlink_port), up, down)
            self.proxies[region].start()
        key = ["--auth-supernode-private-key", str(self.register(region))] if self.security == "auth" else []
        self._start(f"supernode-{region}", [
            "flower-supernode", *self._security("supernode"), *key,
            "--superlink", f"127.0.0.1:{self.proxies[region].port}", "--port", str(free_port()),
            "--node-config", f"region='{region}' data-dir='{data_dir}' state-dir='{self.run_dir / 'region-state'}'"
            f" {NODE_MAX_WORKERS}={self.max_workers or self.topology.region(region).workers_max}"
            + self._pace(region) + self._trainer(region) + (f" {app_config}" if app_config else "")])

    def register(self, region: str) -> Path:
        """The region's private key; the first time, a new key pair whose public key the SuperLink registers
        (`flwr supernode register`), its node id kept in `node_ids`. A restarted SuperNode reuses key and id."""
        private, public = write_node_key(self.keys, region)
        if region not in self.node_ids:
            done = subprocess.run(["flwr", "supernode", "register", str(public), CONNECTION, "--format", "json"],
                                  capture_output=True, text=True, env=self.env(), cwd=self.run_dir)
            try:
                self.node_ids[region] = int(json.loads(done.stdout)["node-id"])
            except (ValueError, KeyError, TypeError):
                raise RuntimeError(f"the SuperLink did not register region {region}'s key (exit {done.returncode}): "
                                   f"{(done.stdout + done.stderr).strip()[-1000:]}") from None
        return private

    def region_nodes(self) -> str:
        """The `region_nodes` override that binds each region to its key's node id (`auth` only)."""
        return "region_nodes={" + ",".join(f"{region}:{node}" for region, node in self.node_ids.items()) + "}"

    def _pace(self, region: str) -> str:
        """The node config that paces the region's compute to its profile (one worker's samples/s, efficiency
        and time scale applied; the work order says how many workers the job has)."""
        if not self.pace:
            return ""
        profile = self.topology.region(region)
        return f" {NODE_PACE}={profile.samples_per_s * profile.efficiency * self.time_scale!r}"

    def _trainer(self, region: str) -> str:
        """The node config that hands the region's messages to its warm trainer, if it has one."""
        with self._lock:
            warm = f"trainer-{region}" in self.processes
        return f" {NODE_TRAINER}='{self.trainer_socket(region)}'" if warm else ""

    def kill_trainer(self, region: str) -> None:
        """SIGKILL the region's trainer, as a crash would; the supervisor starts it again."""
        with self._lock:
            proc = self.processes[f"trainer-{region}"]
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def kill_region(self, region: str) -> None:
        """SIGKILL a region's SuperNode and everything it started, as a crash would (its proxy stays up);
        `start_region` starts it again: under a new node id, or with `auth` under its key's (which the
        SuperLink accepts once it has marked the old node offline: Flower's heartbeat, up to 60 s)."""
        proc = self.processes.pop(f"supernode-{region}")
        family = set(descendants(proc.pid))
        _signal_group(proc, signal.SIGKILL)
        _signal_pids(family, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Stop every process, its group and every descendant (SuperLinks start theirs in new sessions):
        SIGTERM, then SIGKILL after a grace period; then every proxy and the trainers' sockets."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        started = list(self.processes.values())
        family = {pid for proc in started for pid in descendants(proc.pid)}
        for proc in reversed(started):
            _signal_group(proc, signal.SIGTERM)
        _signal_pids(family, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in started:
            if not _group_gone(proc, deadline):
                _signal_group(proc, signal.SIGKILL)
                _group_gone(proc, time.monotonic() + STOP_GRACE_S)
            proc.wait()
        while family and time.monotonic() < deadline:
            family = {pid for pid in family if _alive(pid)}
            time.sleep(0.05)
        _signal_pids(family, signal.SIGKILL)
        self.processes.clear()
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
            self._sockets = None

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (`kill`, `timeout`, a service manager) unwinds like Ctrl-C, so every
    `Federation` on the way out is stopped instead of orphaning its processes."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _group_gone(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until no process of `proc`'s group is left (the leader reaped); False on timeout."""
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the SuperNode's own children (SuperExec, ClientApps) too
    except ProcessLookupError:
        pass


def submit(federation: Federation, app_dir: Path, run_config: dict[str, object], stream_to=sys.stdout) -> int:
    """`flwr run <app> <connection> --stream`; its output goes to `stream_to` and logs/flwr-run.log."""
    config = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
    argv = ["flwr", "run", str(app_dir), CONNECTION, "--stream", "--run-config", config]
    with open(federation.logs / "flwr-run.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=federation.env(),
                                cwd=app_dir, start_new_session=True)
        federation.processes["flwr-run"] = proc
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if stream_to is not None:
                stream_to.write(line.decode(errors="replace"))
                stream_to.flush()
        return proc.wait()


def _toml(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return str(value)


def prepare_split(topology: Topology, data_dir: Path, source: str = "digits", seed: int = 0) -> None:
    """Per-region folders for the launch (written once)."""
    if not (data_dir / "test.npz").is_file():
        split_dataset(load_source(source), topology.shares(), data_dir, alpha=0.5, seed=seed)


def launch(topology_name: str, strategy: str, num_rounds: int, run_dir: Path, *, seed: int = 1,
           time_scale: float = 1.0, pace: bool = True, security: str = "auth", max_workers: int | None = None,
           warm: bool = True, data: Path | None = None, overrides: list[str] = (), app_dir: Path | None = None,
           stream_to=sys.stdout) -> int:
    """Run `strategy` on a local federation shaped like `topology_name`; returns `flwr run`'s exit code.

    `warm` (default): each region gets a trainer kept warm between messages (clients/warm_trainer.py), so a
    message's ClientApp process imports no PyTorch; False: every job computed in its own ClientApp process,
    as in a plain Flower app. `data`: a folder `cloudless-fl data split` wrote for this topology, each region
    training on its shard; None: the bundled digits, split into `<run_dir>/data`."""
    from_file = topology_name.endswith((".yaml", ".yml"))
    if from_file:
        topology_name = str(Path(topology_name).resolve())
        overrides = [f"topology_file={topology_name}", *overrides]
    topology = topology_of(compose([f"topology_file={topology_name}" if from_file else f"topology={topology_name}"]))
    run_dir = run_dir.resolve()
    if data is None:
        data_dir = run_dir / "data"
        prepare_split(topology, data_dir)
    else:
        data_dir = Path(data).resolve()
        check_presplit(topology, data_dir)  # as the ServerApp would, but before any process starts
    app_dir = (app_dir or Path.cwd()).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"{app_dir} is not a Flower app folder (no pyproject.toml); run from the cloudless-fl "
                          "checkout or pass --app")
    hydra_overrides = ["dataset=npz", f"dataset.root={data_dir}", "clock=wall", *overrides]
    with Federation(topology, run_dir, seed=seed, time_scale=time_scale, pace=pace, security=security,
                    max_workers=max_workers) as federation:
        federation.start_superlink()
        for region in topology.region_names:
            if warm:
                federation.start_trainer(region)
            federation.start_region(region, data_dir / region)
        if federation.node_ids:
            hydra_overrides.append(federation.region_nodes())
        run_config = {"strategy": strategy, "num-rounds": num_rounds, "seed": seed,
                      **({} if from_file else {"topology": topology_name}),
                      "overrides": " ".join(shlex.quote(o) for o in hydra_overrides), "output-dir": str(run_dir)}
        return submit(federation, app_dir, run_config, stream_to)
