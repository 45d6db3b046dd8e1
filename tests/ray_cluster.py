"""A two-node Ray cluster on this machine, on loopback, for the cluster tests (tests/test_cluster.py).

Both nodes live in a private temp dir, so `ray.init()` elsewhere on the machine never discovers this cluster
(Ray finds running clusters through <temp_dir>/ray_current_cluster), and every port is chosen free so it never
collides with another cluster. Each `ray start` runs in its own session (process group); `stop()` ends exactly
those groups, plus any process whose command line names our private temp dir (Ray daemonises a few), never
"all ray processes" like `ray stop` would.
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
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    def __init__(self, nodes: list[dict], num_cpus: int = 2):
        self.nodes, self.num_cpus = nodes, num_cpus
        # Short path: Ray's unix socket paths must stay under 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("RAY_ADDRESS", None)
        # DeepSpeed JIT-builds its CPU shm op at init_distributed; the shared cache is rebuilt whenever processes
        # with other build flags used it last. A private copy is built at most once per cluster.
        shared = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
        private = Path(self.temp_dir) / "torch_extensions"
        if shared.is_dir() and not any(shared.rglob("lock")):  # never copy a build in progress
            shutil.copytree(shared, private)
        self.env["TORCH_EXTENSIONS_DIR"] = str(private)

    def _start(self, args: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"start-{len(self.procs)}.log", "w")
        proc = subprocess.Popen([RAY, "start", "--disable-usage-stats", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start failed: {Path(log.name).read_text()[-3000:]}")

    def start(self, attempts: int = 4) -> "LocalCluster":
        # A loaded machine can time a node's start-up out (GCS "Deadline Exceeded"): stop what started, try again.
        for attempt in range(attempts):
            try:
                return self._start_nodes()
            except RuntimeError:
                self.stop()
                self.procs = []
                if attempt == attempts - 1:
                    raise
        return self

    def _start_nodes(self) -> "LocalCluster":
        gcs, dash, client = free_ports(3)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        for i, resources in enumerate(self.nodes):
            agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(6)
            ports = ["--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", agent_grpc,
                     "--metrics-export-port", metrics, "--runtime-env-agent-port", env_agent,
                     "--node-manager-port", node_mgr, "--object-manager-port", obj_mgr,
                     "--num-cpus", self.num_cpus, "--resources", json.dumps(resources),
                     "--object-store-memory", 500 * 2 ** 20]
            if i == 0:
                head = ["--head", "--port", gcs, "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir,
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", dash, "--include-dashboard", "true",
                        "--ray-client-server-port", client]
                self._start([str(a) for a in head + ports])
            else:
                self._start([str(a) for a in ["--address", self.gcs_address, "--node-ip-address", "127.0.0.1",
                                              *ports]])
        return self

    def node_ids(self) -> dict[str, str]:
        """Custom resource name -> node id, from the state API (over the dashboard, no ray.init here)."""
        from ray.util.state import list_nodes

        out = {}
        for node in list_nodes(address=self.dashboard_url):
            for name in node.resources_total:
                if name.startswith("node_"):
                    out[name] = node.node_id
        return out

    def stop(self) -> None:
        pgids = set()
        for proc in self.procs:
            pgids.add(proc.pid)  # start_new_session: the pid is the group id
        # Processes Ray daemonised out of those groups still carry our private temp dir on their command line.
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                cmd = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
                if self.temp_dir in cmd:
                    pgids.add(-int(pid_dir.name))  # negative: a single pid
            except OSError:
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for target in pgids:
                try:
                    os.killpg(target, sig) if target > 0 else os.kill(-target, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0)

    def remove(self) -> None:
        """Stop, then delete the private temp dir (logs, sessions, the torch extension copy)."""
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
