"""Fixtures that start real servers on 127.0.0.1 (moto_server for S3, a Ray head) and stop them by PID."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

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


def wait_port(port: int, timeout: float = 60, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop_tree(pid: int, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
    """End a process and all its descendants, by PID (never by name); SIGKILL for a crash."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


class LocalServer:
    """A server process on a loopback port, its output in a log file, started and stopped (by PID) at will."""

    def __init__(self, port: int, log_path: str):
        self.port, self.log_path, self.proc = port, log_path, None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        self.proc = subprocess.Popen(self.command(), stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self):
        if self.proc:
            stop_tree(self.proc.pid)
            self.proc = None


class S3Server(LocalServer):
    def __init__(self, port: int, log_path: str):
        super().__init__(port, log_path)
        self.endpoint = f"http://127.0.0.1:{port}"

    def command(self):
        return [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]


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


class TcpFront(LocalServer):
    """bench/tcp_proxy.py on a fixed loopback port in front of a server: `stop()` is an outage of that
    server as its clients see it (connections refused), `start()` the same endpoint back with its data."""

    def __init__(self, target_port: int, log_path: str, latency_ms: float = 0.0, bandwidth_mbps: float = 0.0):
        super().__init__(free_port(), log_path)
        self.target_port, self.latency_ms, self.bandwidth_mbps = target_port, latency_ms, bandwidth_mbps

    def command(self):
        return [sys.executable, os.path.join(REPO, "bench", "tcp_proxy.py"), str(self.port), str(self.target_port),
                "--latency-ms", str(self.latency_ms), "--bandwidth-mbps", str(self.bandwidth_mbps)]


def prometheus_binary(name: str = "prometheus") -> str:
    """Debian's `prometheus` package (the server and promtool). In CI it must be there (.ci/run installs it):
    the test fails; elsewhere the test is skipped with the one line that says how to get it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install prometheus (Debian) brings the server and promtool"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def rule_groups() -> list[dict]:
    """The groups of the PrometheusRule that k8s/base ships."""
    return yaml.safe_load(open(os.path.join(REPO, "k8s", "base", "prometheusrule.yaml")))["spec"]["groups"]


def alert_rules(groups=None) -> list[dict]:
    return [r for g in (groups or rule_groups()) for r in g["rules"] if "alert" in r]


def write_rules(path, groups) -> None:
    """Rule groups as the plain rule file that the Prometheus Operator hands its server."""
    with open(path, "w") as f:
        yaml.safe_dump({"groups": groups}, f)


class PrometheusServer(LocalServer):
    """A real Prometheus on a loopback port: `config` is its prometheus.yml as a dict (written beside its data)."""

    def __init__(self, tmp: str, config: dict):
        super().__init__(free_port(), os.path.join(tmp, "prometheus.log"))
        self.config_path, self.data = os.path.join(tmp, "prometheus.yml"), os.path.join(tmp, "prometheus-data")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self):
        return [prometheus_binary(), f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def api(self, path: str, **params) -> dict:
        from urllib.parse import urlencode

        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urlencode(params)}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]


# A multi-node cluster on one machine lives on 127.0.0.2: still loopback, but not an address Ray rewrites to
# the machine's interface address once multi-node clusters are enabled (which `ray start` needs to join).
CLUSTER_IP = "127.0.0.2"
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "GLOO_SOCKET_IFNAME": "lo"}


def agent_ports() -> list[str]:
    """Free ports for a node's dashboard agent and runtime-env agent: with Ray's fixed defaults, a second node
    on this machine (another test's head, a joining node) cannot start its agent, and its head then refuses
    job submissions ("No available agent")."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port())]


# a Ray node's gcs_server and raylet take about 30 s to leave on SIGTERM; a test's cluster has its own ports and
# temp dir and nothing of it outlives the test, so after a few seconds its processes are killed
RAY_STOP_GRACE_S = 5


class RayHead:
    def __init__(self, tmp: str, num_cpus: int = 2, ip: str = "127.0.0.1", env: dict | None = None):
        self.port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        # a short temp dir: Ray's socket paths must stay under the 107-byte limit
        self.temp_dir = f"/tmp/gm-ray-{self.port}"
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--node-ip-address", ip,
             "--port", str(self.port), "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--metrics-export-port", str(self.metrics_port), "--temp-dir", self.temp_dir, "--disable-usage-stats",
             *agent_ports()],
            # metrics reach the node's endpoint within a second or two instead of ten
            env={**os.environ, "RAY_metrics_report_interval_ms": "1000", **(env or {})},
            stdout=open(os.path.join(tmp, "ray-head.log"), "ab"), stderr=subprocess.STDOUT)
        wait_port(self.port, host=ip)
        wait_port(self.dashboard_port, 90)
        self.address = f"{ip}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def alive_nodes(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes", timeout=5) as r:
                nodes = json.load(r)["data"]["result"]["result"]
        except OSError:
            return 0
        return sum(1 for n in nodes if n["state"] == "ALIVE")

    def wait_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray cluster did not reach {count} alive nodes")
            time.sleep(0.5)

    def stop(self):
        stop_tree(self.proc.pid, timeout=RAY_STOP_GRACE_S)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayNode:
    """A second Ray node joining a head started with CLUSTER_IP and CLUSTER_ENV: ending its process tree is a
    node failure."""

    def __init__(self, head: RayHead, tmp: str, num_cpus: int = 1):
        self.head, self.metrics_port = head, free_port()
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "ray"), "start", "--address", head.address, "--block", "--node-ip-address",
             CLUSTER_IP, "--num-cpus", str(num_cpus), "--num-gpus", "0",
             "--metrics-export-port", str(self.metrics_port),
             "--disable-usage-stats", *agent_ports()],
            env={**os.environ, "RAY_metrics_report_interval_ms": "1000", **CLUSTER_ENV},
            stdout=open(os.path.join(tmp, "ray-node.log"), "ab"), stderr=subprocess.STDOUT)

    def crash(self):
        """The node dies at once, as a machine does: every process of its tree killed."""
        stop_tree(self.proc.pid, sig=signal.SIGKILL)

    def stop(self):
        stop_tree(self.proc.pid, timeout=RAY_STOP_GRACE_S)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(str(tmp_path_factory.mktemp("ray")))
    yield head
    head.stop()


# a short training that still exercises everything: small crops, frequent logs, a ledger of every sample
SMALL = ["--config", "configs/cpu-small.yaml", "--set", "data.crop_size=32", "--set", "train.log_every=4",
         "--set", "train.eval_every=1000", "--set", "train.ledger=true", "--set", "data.val_batch_size=8"]


def train_cmd(address: str, out: str, data: str, steps: int, *extra) -> list[str]:
    return [os.path.join(VENV_BIN, "guidedmix"), "train", *SMALL, "--data", data, "--out", out, "--workers", "2",
            "--steps", str(steps), "--address", address, *extra]


def train_workers(roots: list[int], driver_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes under these Ray nodes started for the driver's run (not the data
    loader processes they fork)."""
    started = psutil.Process(driver_pid).create_time()
    return [p for root in roots for p in psutil.Process(root).children(recursive=True)
            if p.name() == "ray::RayTrainWorker" and p.create_time() >= started
            and p.parent().name() != "ray::RayTrainWorker"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def read_json(url: str):
    import fsspec

    with fsspec.open(url, "r") as f:
        return json.load(f)


def shard_keys(url: str, infos, storage_options: dict) -> list[list[str]]:
    """Each shard's sample keys by index, read from its tar at the manifest's offsets; a sample that does not
    read (a truncated shard's tail) is named `shard#index`, so that it can only ever be planned, not consumed."""
    import fsspec

    from shards.tario import tar_samples

    fs = fsspec.core.url_to_fs(url, **storage_options)[0]
    keys = []
    for info in infos:
        data = fs.cat_file(f"{url.rstrip('/')}/{info.name}")
        names = []
        for i in range(info.samples):
            try:
                names.append(next(tar_samples(data[info.offsets[i]:info.offsets[i + 1]]))["__key__"])
            except Exception:  # noqa: BLE001 - whatever does not parse was never trained on
                names.append(f"{info.name}#{i}")
        keys.append(names)
    return keys


def ledger_report(out: str) -> dict:
    """Per split, every rank's ledger of a finished run (ranks come and go in an elastic run; each sample is in
    one of them) against the run's plan: each epoch's order from shards/order.py, the global batches of the
    steps the run reached, the last partial epoch included. `samples`: consumed; `repeated`: consumed again in
    the same epoch; `lost`/`lost_keys`: planned and consumed by no rank; `unplanned`: consumed where the plan
    has no such sample; `epochs_checked`: the epochs compared; `summary_samples`: what summary.json counts."""
    from collections import Counter

    import fsspec

    from shards.manifest import read_manifest
    from shards.stream import ShardStream
    from trainer.config import Config
    from trainer.loop import WorkerContext, stream_spec

    summary = read_json(f"{out}/summary.json")
    cfg, steps = Config.model_validate(summary["config"]), summary["steps"]
    manifest = read_manifest(cfg.storage())
    fs, path = fsspec.core.url_to_fs(f"{out}/ledger")
    ledgers = [read_json(f"{out}/ledger/{name.rsplit('/', 1)[-1]}") for name in sorted(fs.ls(path, detail=False))]
    report = {}
    for split in ledgers[0]:
        stream = ShardStream(stream_spec(cfg, split, WorkerContext()), manifest)
        keys = shard_keys(cfg.data.url, stream.infos, cfg.data.storage_options)
        per_epoch, batch = stream.plan.steps_per_epoch, stream.layout.global_batch
        consumed = Counter((epoch, key) for ledger in ledgers for epoch, key in ledger[split])
        lost, unplanned, epochs = [], 0, -(-steps // per_epoch)
        for epoch in range(epochs):
            reached = min(per_epoch, steps - epoch * per_epoch) * batch
            planned = {keys[shard][index] for shard, index in stream.plan.order(epoch)[:reached]}
            got = {key for e, key in consumed if e == epoch}
            lost += sorted(planned - got)
            unplanned += len(got - planned)
        unplanned += sum(1 for e, _ in consumed if not 0 <= e < epochs)
        report[split] = {"samples": sum(consumed.values()), "repeated": sum(consumed.values()) - len(consumed),
                         "lost": len(lost), "lost_keys": lost, "unplanned": unplanned, "epochs_checked": epochs,
                         "summary_samples": summary.get("samples_by_split", {}).get(split)}
    return report


def check_ledgers(out: str) -> dict:
    """Every split trained on exactly its plan up to the step reached: nothing lost, repeated or unplanned, and
    summary.json counts what the ledgers hold. Returns the report."""
    report = ledger_report(out)
    assert all(r["repeated"] == 0 and r["lost"] == 0 and r["unplanned"] == 0 for r in report.values()), report
    assert all(r["samples"] == r["summary_samples"] for r in report.values()), report
    return report


def fault_figures(fault: str, summary: dict, requested: int, recovery_s, ledger: dict | None = None, **more) -> dict:
    """One line of the chaos report, asserted as it is recorded: the run that met `fault` finished all the
    steps requested (lost/repeated: from its checked ledger, None where the run kept none)."""
    assert summary["steps"] == requested, (fault, summary["steps"], requested)
    if ledger:
        assert all(split["lost"] == 0 and split["repeated"] == 0 for split in ledger.values()), (fault, ledger)
    totals = {k: sum(split[k] for split in ledger.values()) if ledger else None
              for k in ("lost", "repeated", "unplanned", "epochs_checked")}
    return {"fault": fault, "finished": summary["steps"] == requested, "steps": summary["steps"],
            "requested": requested, **totals, "recovery_s": recovery_s, **more}


@pytest.fixture
def chaos_report():
    """record(fault=..., **figures): one JSON line per fault for bench/chaos.py, which sets
    GUIDEDMIX_CHAOS_REPORT; without it nothing is written."""
    path = os.environ.get("GUIDEDMIX_CHAOS_REPORT")

    def record(**figures):
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(figures) + "\n")

    return record


def scrape(url):
    """{sample name: [(labels, value)]} and {family name: type} of one scrape, or None if not up yet."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples, types


def total(samples, name, **match):
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def rewrite_tar(path: str, change) -> None:
    """Rewrite a shard in place, `change(member_name, data)` returning each member's new bytes, and its entry
    in the manifest beside it as a writer of these bytes would have (offsets, checksums): bad data as it was
    written, not storage corruption, which the checksums would catch first."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    _index_again(path)


def _index_again(path: str) -> None:
    """The manifest's sha256, per-sample offsets and checksums of one shard, from its bytes (an independent
    reading of what shards/build.py records while it writes)."""
    from shards.tario import payload_crc32

    data = open(path, "rb").read()
    offsets, crcs, key, fields, end = [], [], None, {}, 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            sample, field = member.name.split(".", 1)
            if sample != key:
                if key is not None:
                    crcs.append(payload_crc32(fields))
                offsets.append(member.offset)
                key, fields = sample, {}
            fields[field] = tar.extractfile(member).read()
            end = member.offset_data + -(-member.size // 512) * 512
    crcs.append(payload_crc32(fields))
    offsets.append(end)
    manifest_path = os.path.join(os.path.dirname(path), "manifest.json")
    manifest = json.load(open(manifest_path))
    shard = next(s for split in manifest["splits"].values() for s in split["shards"]
                 if s["name"] == os.path.basename(path))
    shard.update(sha256=hashlib.sha256(data).hexdigest(), offsets=offsets, crc32=crcs)
    json.dump(manifest, open(manifest_path, "w"))


def run_cli(*args, env=None, timeout=600, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(VENV_BIN, "guidedmix"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="session")
def synthetic_url(tmp_path_factory) -> str:
    """A small synthetic shard set (1/8 labeled, the unlabeled masks withheld to score pseudo masks) on
    local disk, shared by the tests that only read it."""
    from shards import build, sources

    url = str(tmp_path_factory.mktemp("shards") / "synthetic")
    build.build(sources.synthetic_source(480, 64, 32, 0), url, build.parse_labeled("1/8"), seed=0,
                samples_per_shard=64, progress=False, withhold_masks=True)
    return url


@pytest.fixture(scope="session")
def short_epochs_url(tmp_path_factory) -> str:
    """A synthetic set whose epochs are short (48 labeled, 144 unlabeled images): an 18-step run of two ranks
    with 8 + 8 per batch finishes both splits' epochs, so its sample ledger can show a lost sample."""
    from shards import build, sources

    url = str(tmp_path_factory.mktemp("shards") / "short-epochs")
    build.build(sources.synthetic_source(192, 32, 32, 2), url, build.parse_labeled("1/4"), seed=0,
                samples_per_shard=24, progress=False)
    return url
