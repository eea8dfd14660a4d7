"""Fixtures that start real servers on 127.0.0.1 (moto_server for S3, a Ray head) and stop them by PID."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

VENV_BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray swaps 127.0.0.1 for the machine's interface address unless told this is a one-machine cluster;
# the test cluster is loopback-only, so it also runs without Ray's token authentication.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/guidedmix/torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop_tree(pid: int, timeout: float = 20) -> None:
    """End a process and all its descendants, by PID (never by name)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


class S3Server:
    def __init__(self, port: int, log_path: str):
        self.port, self.log_path, self.proc = port, log_path, None
        self.endpoint = f"http://127.0.0.1:{port}"

    def start(self):
        self.proc = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self):
        if self.proc:
            stop_tree(self.proc.pid)
            self.proc = None


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3-compatible server on loopback, the AWS variables pointing at it, and a bucket `test`."""
    server = S3Server(free_port(), str(tmp_path / "moto.log"))
    server.start()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import fsspec
    import s3fs

    # s3fs caches filesystems without the endpoint in the key: one from an earlier server would be reused
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").mkdir("test")
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


class RayHead:
    def __init__(self, tmp: str, num_cpus: int = 2):
        self.port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        # a short temp dir: Ray's socket paths must stay under the 107-byte limit
        self.temp_dir = f"/tmp/gm-ray-{self.port}"
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.port), "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--metrics-export-port", str(self.metrics_port), "--temp-dir", self.temp_dir, "--disable-usage-stats"],
            # metrics reach the node's endpoint within a second or two instead of ten
            env={**os.environ, "RAY_metrics_report_interval_ms": "1000"},
            stdout=open(os.path.join(tmp, "ray-head.log"), "ab"), stderr=subprocess.STDOUT)
        wait_port(self.port)
        wait_port(self.dashboard_port, 90)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self):
        stop_tree(self.proc.pid, timeout=40)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(str(tmp_path_factory.mktemp("ray")))
    yield head
    head.stop()


def run_cli(*args, env=None, timeout=600, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(VENV_BIN, "guidedmix"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="session")
def synthetic_url(tmp_path_factory) -> str:
    """A small synthetic shard set (1/16 labeled) on local disk, shared by the tests that only read it."""
    from shards import build, sources

    url = str(tmp_path_factory.mktemp("shards") / "synthetic")
    build.build(sources.synthetic_source(480, 64, 32, 0), url, build.parse_labeled("1/8"), seed=0,
                samples_per_shard=64, progress=False)
    return url
