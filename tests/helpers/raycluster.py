"""A real multi-process Ray cluster on 127.0.0.1 for tests: ``ray start --head`` plus worker nodes.

Usage::

    with LocalRayCluster(head_cpus=1, workers=[{"num_cpus": 1, "resources": {"side": 1}}], env=env) as c:
        c.gcs_address      # "127.0.0.1:PORT" (ray.init(address=...), RAY_ADDRESS for drivers)
        c.dashboard_url    # "http://127.0.0.1:PORT" (ray job submit --address ...)
        c.nodes()          # alive nodes as the state API lists them

Every node runs ``ray start ... --block`` as a child of this process, in its own process group,
with every port chosen free on 127.0.0.1 (two nodes on one machine must not share the default
agent ports) and a short temporary ``--temp-dir`` (Unix socket paths are limited to 107 bytes).
:meth:`LocalRayCluster.stop` sends SIGTERM to each ``ray start --block`` (which stops its node's
processes), then SIGKILLs, by PID, every process it saw under them that is still alive. It never
runs ``ray stop``: that kills every Ray process on the machine, including other people's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
#: Ray turns 127.0.0.1 into the machine's outward address; 127.0.0.2 is loopback too and kept as is.
NODE_IP = "127.0.0.2"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """Head node plus worker nodes, each a ``ray start --block`` child process on 127.0.0.1.

    Args:
        head_cpus: ``--num-cpus`` of the head node.
        workers: one dict per worker node: ``num_cpus`` (int), optional ``resources``
            (custom resources, ``{"name": amount}``).
        env: extra environment for every Ray process (and so for every worker and job driver);
            ``RAY_AUTH_MODE=disabled`` and ``RAY_USAGE_STATS_ENABLED=0`` are always set;
            ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` defaults to 2 s (Ray's 30 s drain wait on
            SIGTERM only slows teardown here).
        object_store_mb: object store size per node, MiB.
    """

    def __init__(self, head_cpus: int = 1, workers: list[dict] | None = None, env: dict[str, str] | None = None,
                 object_store_mb: int = 150):
        self.head_cpus = head_cpus
        self.workers = workers if workers is not None else [{"num_cpus": 1}]
        # a test cluster has nothing to drain on SIGTERM: don't wait Ray's default 30 s for idle nodes
        self.env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2", **os.environ, **(env or {}),
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.object_store_bytes = object_store_mb << 20
        self.temp_dir = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")
        self.port = free_port()
        self.dashboard_port = free_port()
        self.gcs_address = f"{NODE_IP}:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self._procs: list[subprocess.Popen] = []
        self._seen: dict[int, float] = {}  # pid -> create_time of every process seen under our nodes
        self.log_dir = Path(self.temp_dir) / "start-logs"
        self.log_dir.mkdir()

    # -- lifecycle ---------------------------------------------------------------------------
    def _node_ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0"]

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([RAY, "start", *args, "--block", "--disable-usage-stats", "--log-style", "record",
                              "--object-store-memory", str(self.object_store_bytes)],
                             env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        p._capfilt_log = log  # type: ignore[attr-defined]
        self._procs.append(p)
        return p

    def start(self, timeout: float = 240.0) -> "LocalRayCluster":
        """Start the head, wait for its dashboard, start the workers, wait until all nodes are alive.

        Raises:
            RuntimeError: a node did not come up within ``timeout`` seconds (message has its log).
        """
        deadline = time.time() + timeout
        self._spawn(["--head", "--node-ip-address", NODE_IP, "--port", str(self.port),
                     "--num-cpus", str(self.head_cpus), "--num-gpus", "0", "--temp-dir", self.temp_dir,
                     "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                     *self._node_ports()], "head")
        self._wait(lambda: self._get("/api/version") is not None, deadline, "head node dashboard")
        for i, w in enumerate(self.workers):
            self._start_worker(i, w, deadline)
        self._remember()
        return self

    def _start_worker(self, i: int, w: dict, deadline: float, tries: int = 3) -> None:
        """Start worker node ``i`` and wait until it is alive.

        Ray gives a new raylet a fixed 30 s to register with the GCS; on a loaded 2-core machine
        that can pass, and ``ray start`` then exits ("timed out during startup") after stopping
        what it started. That attempt is retried with fresh ports, up to ``tries`` times.
        """
        want = 2 + i
        for attempt in range(tries):
            args = ["--address", self.gcs_address, "--node-ip-address", NODE_IP,
                    "--num-cpus", str(w["num_cpus"]), "--num-gpus", "0", *self._node_ports()]
            if w.get("resources"):
                args += ["--resources", json.dumps(w["resources"])]
            p = self._spawn(args, f"worker{i}-{attempt}")
            try:
                self._wait(lambda: len(self.nodes()) >= want, deadline, f"{want} alive nodes")
                return
            except RuntimeError:
                log = (self.log_dir / f"worker{i}-{attempt}.log").read_text(errors="replace")
                if p.poll() is None or attempt == tries - 1 or "timed out during startup" not in log:
                    raise
                self._procs.remove(p)
                p._capfilt_log.close()  # type: ignore[attr-defined]

    def _wait(self, ok, deadline: float, what: str) -> None:
        while time.time() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode} while waiting for {what}:\n"
                                       + self.logs())
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"timed out waiting for {what}:\n" + self.logs())

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.dashboard_url + path, timeout=5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def nodes(self) -> list[dict]:
        """Alive nodes (state API ``/api/v0/nodes``): dicts with ``node_id``, ``resources_total``, ..."""
        return [n for n in self.state("nodes", limit=100) if n.get("state") == "ALIVE"]

    def state(self, kind: str, limit: int = 10000) -> list[dict]:
        """Rows of the state API (``/api/v0/<kind>``: ``tasks``, ``actors``, ``workers``, ...)."""
        data = self._get(f"/api/v0/{kind}?limit={limit}&detail=true")
        if not data or not data.get("result"):
            return []
        return data["data"]["result"]["result"]

    def _remember(self) -> None:
        """Record every process under our ``ray start`` commands (PID + start time) for :meth:`stop`."""
        for p in self._procs:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    self._seen[q.pid] = q.create_time()
            except psutil.NoSuchProcess:
                pass

    def processes(self) -> list[psutil.Process]:
        """Live processes under our ``ray start`` commands (raylets, GCS, agents, workers, drivers' parents)."""
        out = []
        for p in self._procs:
            try:
                root = psutil.Process(p.pid)
                out += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self, grace: float = 30.0) -> None:
        """Stop every node we started and make sure none of their processes is left.

        SIGTERM to each ``ray start --block`` (it kills its node's processes), workers first; after
        ``grace`` seconds, SIGKILL by PID whatever we saw under them and is still alive (PIDs are
        checked against their start time so a reused PID is never hit).
        """
        self._remember()
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        for p in reversed(self._procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            p._capfilt_log.close()  # type: ignore[attr-defined]
        for pid, created in self._seen.items():
            try:
                q = psutil.Process(pid)
                if q.create_time() == created:
                    q.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """PIDs seen under our nodes that are still alive (empty after :meth:`stop`)."""
        alive = []
        for pid, created in self._seen.items():
            try:
                q = psutil.Process(pid)
                if q.create_time() == created and q.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def logs(self, tail: int = 4000) -> str:
        """The tail of each ``ray start`` log (for failure messages)."""
        out = []
        for f in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-tail:])
        return "\n".join(out)

    def __enter__(self) -> "LocalRayCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
