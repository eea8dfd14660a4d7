"""Operations: the Prometheus metrics scraped for real over HTTP during training (through a Ray node's
metrics agent, and from the endpoint a run outside Ray serves), a real Prometheus server scraping a run with the
PodMonitor's relabelling (every dashboard query has data, the alert rules stay quiet on a healthy run and page on
a stalled one), the Grafana dashboard against those
names, and the Kubernetes manifests validated strictly, plain and as kustomize renders them."""
import copy
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import kubernetes_validate
import psutil
import pytest
import yaml
from jsonschema import Draft7Validator

from conftest import (REPO, SMALL, VENV_BIN, PrometheusServer, RayHead, free_port, prometheus_binary,
                      rewrite_tar, rule_groups, run_cli, scrape, stop_tree, total, train_cmd, train_workers, wait_for,
                      write_rules)
from launch.cli import build_parser
from trainer.config import load_config
from trainer.metrics import PREFIX, SPECS

K8S = os.path.join(REPO, "k8s")
OVERLAYS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(K8S, "overlays", "*")))
CRD = os.path.join(REPO, "tests", "schemas", "ray.io_rayjobs.yaml")  # KubeRay commit feeaf72


# -- metrics ------------------------------------------------------------------------------------------

def corrupted_copy(url, tmp_path):
    """The shard set with one labeled image replaced by bytes no decoder reads."""
    copy_url = str(tmp_path / "data")
    shutil.copytree(url, copy_url)
    shard = sorted(glob.glob(f"{copy_url}/labeled-*.tar"))[0]
    with tarfile.open(shard) as tar:
        victim = next(n for n in tar.getnames() if n.endswith(".png") and ".mask." not in n)
    rewrite_tar(shard, lambda name, data: b"not an image" if name == victim else data)
    return copy_url


def scrape_during(proc, url, rename=lambda name: name, timeout=600):
    """Scrape every second until the process ends; the scrapes that held any of our metrics, renamed."""
    scrapes, deadline = [], time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        got = scrape(url)
        if got:
            samples = {rename(k): v for k, v in got[0].items() if rename(k).startswith(PREFIX)}
            if samples:
                scrapes.append((samples, {rename(k): v for k, v in got[1].items()}))
        time.sleep(1)
    return scrapes


def expected_sample_names():
    names = set()
    for name, spec in SPECS.items():
        full = PREFIX + name
        names |= {full + "_bucket", full + "_count", full + "_sum"} if spec.kind == "histogram" else {full}
    return names


def check_scrapes(scrapes):
    """Every metric of SPECS appears with its type, and the counting ones move during the run."""
    assert len(scrapes) >= 3, f"only {len(scrapes)} scrapes held guidedmix metrics"
    seen = set().union(*(s for s, _ in scrapes))
    missing = expected_sample_names() - seen
    assert not missing, f"never exported: {sorted(missing)}"
    types = {}
    for _, t in scrapes:
        types.update(t)
    for name, spec in SPECS.items():
        family = PREFIX + (name[:-len("_total")] if spec.kind == "counter" else name)
        assert types[family] == spec.kind, (family, types[family])
    with_samples = [s for s, _ in scrapes if PREFIX + "samples_total" in s]
    first, last = with_samples[0], with_samples[-1]
    assert total(last, PREFIX + "samples_total", split="labeled") > total(first, PREFIX + "samples_total", split="labeled")
    assert total(last, PREFIX + "step_duration_seconds_count") > total(first, PREFIX + "step_duration_seconds_count")
    assert total(last, PREFIX + "corrupt_samples_total") >= 1  # the one image that does not decode
    mious = [v for s, _ in scrapes for _, v in s.get(PREFIX + "eval_miou", [])]
    assert mious and all(0 <= v <= 1 for v in mious)
    check_gauges_hold(scrapes)
    return seen


def check_gauges_hold(scrapes):
    """Once exported, every gauge series is in every later scrape while its process trains (up to the last scrape
    holding that process's `step`, set at every step; the run's last for a process without steps, the pairing
    service): a gauge set once, at an evaluation or a checkpoint, must not vanish. A worker that has finished
    leaves the export whole, its `step` with it, and that is not a vanished gauge."""
    def gauges(samples):
        return {(name, tuple(sorted(labels.items()))) for name, spec in SPECS.items() if spec.kind == "gauge"
                for labels, _ in samples.get(PREFIX + name, [])}

    def process(series):
        return dict(series[1]).get("WorkerId")  # Ray's label for the process; None outside Ray

    last_step = {labels.get("WorkerId"): i for i, (s, _) in enumerate(scrapes) for labels, _ in s.get(PREFIX + "step", [])}
    run_last = max(last_step.values())
    seen = set()
    for i, (samples, _) in enumerate(scrapes[:run_last + 1]):
        now = gauges(samples)
        gone = {g for g in seen - now if i <= last_step.get(process(g), run_last)}
        assert not gone, f"gauges gone from the export at scrape {i}: {sorted(gone)[:5]}"
        seen |= now
    assert {n for n, _ in seen} >= {"eval_miou", "checkpoint_last_step", "run_info"}


def podmonitor_rename():
    """The PodMonitor's relabelling rule, applied as Prometheus would: what the dashboard gets to see."""
    monitor = yaml.safe_load(open(os.path.join(K8S, "base", "podmonitor.yaml")))
    rule = monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"][0]
    pattern = re.compile(rule["regex"])  # Prometheus anchors the regex at both ends
    replacement = rule["replacement"].replace("$1", r"\1")
    return lambda name: pattern.sub(replacement, name) if pattern.fullmatch(name) else name


def dashboard_metric_names():
    dashboard = json.load(open(os.path.join(K8S, "base", "grafana-dashboard.json")))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\b(guidedmix_[a-z_]+)", e)}


@pytest.mark.slow
def test_metrics_through_ray_scraped_over_http_during_training(ray_head, synthetic_url, tmp_path):
    data = corrupted_copy(synthetic_url, tmp_path)
    out = str(tmp_path / "run")
    cmd = [os.path.join(VENV_BIN, "guidedmix"), "train", *SMALL, "--data", data, "--out", out, "--workers", "2",
           "--steps", "150", "--address", ray_head.address, "--set", "guidedmix.pairing.mode=service",
           "--set", "train.eval_every=30", "--set", "train.ckpt_every=30"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    try:
        scrapes = scrape_during(proc, f"http://127.0.0.1:{ray_head.metrics_port}/metrics", podmonitor_rename())
        assert proc.wait(timeout=60) == 0, open(tmp_path / "driver.log").read()[-3000:]
    finally:
        stop_tree(proc.pid)
    seen = check_scrapes(scrapes)
    # both workers report, each under its rank; the service reports its bank
    assert {labels["rank"] for labels, _ in scrapes[-1][0][PREFIX + "samples_total"]} == {"0", "1"}
    assert max(v for s, _ in scrapes for _, v in s.get(PREFIX + "pairing_bank_size", [])) > 0
    # and the running per-class IoU that the workers report with their pushes, one gauge per class
    with_iou = [s[PREFIX + "pairing_class_iou"] for s, _ in scrapes if PREFIX + "pairing_class_iou" in s]
    assert with_iou, "no scrape shows the pairing service's per-class IoU"
    class_iou = {labels["class"]: v for labels, v in with_iou[-1]}
    assert set(class_iou) == {str(c) for c in range(7)} and all(0 <= v <= 1 for v in class_iou.values())
    assert max(class_iou.values()) > 0
    # the dashboard asks only for what a real cluster exports (after the PodMonitor's relabelling)
    unknown = dashboard_metric_names() - seen
    assert not unknown, f"dashboard queries metrics nobody exports: {sorted(unknown)}"


@pytest.mark.slow
def test_metrics_endpoint_outside_ray(synthetic_url, tmp_path):
    data = corrupted_copy(synthetic_url, tmp_path)
    port = free_port()
    cmd = [os.path.join(VENV_BIN, "guidedmix"), "train", "--no-ray", *SMALL, "--data", data,
           "--out", str(tmp_path / "run"), "--steps", "60", "--set", f"train.metrics_port={port}",
           "--set", "guidedmix.pairing.mode=service", "--set", "train.eval_every=20", "--set", "train.ckpt_every=20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT)
    try:
        scrapes = scrape_during(proc, f"http://127.0.0.1:{port}/metrics")
        assert proc.wait(timeout=60) == 0, open(tmp_path / "run.log").read()[-3000:]
    finally:
        stop_tree(proc.pid)
    seen = check_scrapes(scrapes)
    assert dashboard_metric_names() <= seen
    info = scrapes[-1][0][PREFIX + "run_info"][0][0]
    assert info["run"] == "run" and len(info["config_hash"]) == 12


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.load(open(os.path.join(K8S, "base", "grafana-dashboard.json")))
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def scrape_config(metrics_port: int) -> dict:
    """The PodMonitor's scrape as a plain Prometheus job: its relabelling, at a 1 s interval (15 s there)."""
    monitor = yaml.safe_load(open(os.path.join(K8S, "base", "podmonitor.yaml")))
    relabel = [{"source_labels": r["sourceLabels"], "regex": r["regex"], "target_label": r["targetLabel"],
                "replacement": r["replacement"]} for r in monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]]
    return {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            "metric_relabel_configs": relabel}


def coverage(prom: PrometheusServer, query: str, start: float, end: float, step: float = 2.0) -> float:
    """Share of the instants in [start, end] at which the query returns a value (NaN is no value)."""
    result = prom.api("query_range", query=query, start=start, end=end, step=step)["result"]
    instants = {round(float(t), 3) for series in result for t, v in series["values"] if v.lower() != "nan"}
    return len(instants) / (int((end - start) // step) + 1)


def firing(prom: PrometheusServer) -> set:
    return {(a["labels"]["alertname"], a["labels"].get("run")) for a in prom.api("alerts")["alerts"]
            if a["state"] == "firing"}


def signal_all(processes, sig) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


STALL_RUN_STEPS = 100_000  # more than the test waits for: it stops the run once the stall has cleared
HEALTHY_AFTER_S = 30  # training watched after the alert cleared


@pytest.mark.slow
def test_a_real_prometheus_charts_every_panel_and_pages_on_a_stall(ray_head, synthetic_url, tmp_path):
    write_rules(tmp_path / "rules.yaml", rule_groups())
    prom = PrometheusServer(str(tmp_path), {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")], "scrape_configs": [scrape_config(ray_head.metrics_port)]})
    prom.start()
    try:
        assert len(prom.api("rules")["groups"][0]["rules"]) == len(rule_groups()[0]["rules"])  # the rules loaded
        out = str(tmp_path / "run")
        submitted = time.time()
        proc = subprocess.Popen(
            train_cmd(ray_head.address, out, synthetic_url, STALL_RUN_STEPS, "--set", "train.eval_every=50",
                      "--set", "train.ckpt_every=50", "--set", "train.log_every=10"),
            cwd=REPO, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
        paused = []
        try:
            def evaluated_and_100_s_in():
                assert proc.poll() is None, open(tmp_path / "driver.log").read()[-3000:]
                steps = prom.api("query", query="max(guidedmix_step)")["result"]
                return time.time() > submitted + 100 and steps and float(steps[0]["value"][1]) >= 100

            wait_for(evaluated_and_100_s_in, 600, "the run did not reach step 100")
            healthy_until = time.time()
            workers = train_workers([ray_head.proc.pid], proc.pid)
            assert len(workers) == 2
            paused = [q for w in workers for q in [w, *w.children(recursive=True)]]
            signal_all(paused, signal.SIGSTOP)
            wait_for(lambda: ("GuidedMixTrainingStalled", "run") in firing(prom), 240, "the stall did not page")
            stall_s = time.time() - healthy_until
            signal_all(paused, signal.SIGCONT)
            continued = time.time()
            wait_for(lambda: not firing(prom), 60, "the stall alert did not clear")
            cleared_s = time.time() - continued
            time.sleep(HEALTHY_AFTER_S)
            assert proc.poll() is None, open(tmp_path / "driver.log").read()[-3000:]
            finished = time.time()
        finally:
            signal_all(paused, signal.SIGCONT)
            stop_tree(proc.pid)  # the driver: Ray ends its workers
        figures = {"stall_paged_after_s": round(stall_s, 1), "cleared_after_s": round(cleared_s, 1)}
        # every dashboard query has data at 90% or more of the instants of the healthy run: before the pause,
        # and after it (from 10 s on: the rates' windows span the pause) until the test stopped the run
        for title, query in dashboard_queries():
            before = coverage(prom, query, submitted + 70, healthy_until)
            after = coverage(prom, query, continued + 10, finished)
            figures[f"{title}: {query}"] = [round(before, 3), round(after, 3)]
            assert before >= 0.9 and after >= 0.9, (title, query, before, after)
        # what each alert compares (the rules' recorded series), at its worst over the healthy stretch: the
        # margin its threshold leaves
        window = int(healthy_until - submitted - 70)
        for rule in rule_groups()[0]["rules"]:
            if "record" in rule:
                worst = prom.api("query", query=f"max(max_over_time({rule['record']}[{window}s]))",
                                 time=healthy_until)["result"]
                figures[rule["record"]] = round(float(worst[0]["value"][1]), 4) if worst else None
        staleness = [prom.api("query", query=f"{f}_over_time(max(guidedmix_pairing_staleness_steps)[{window}s:1s])",
                              time=healthy_until)["result"] for f in ("min", "max")]
        figures["pairing staleness, steps (min, max)"] = [round(float(s[0]["value"][1]), 1) for s in staleness]
        # nothing else fired, and nothing fired on the healthy stretches
        fired = prom.api("query_range", query='ALERTS{alertstate="firing"}', start=submitted, end=finished,
                         step=1)["result"]
        assert {s["metric"]["alertname"] for s in fired} <= {"GuidedMixTrainingStalled"}, fired
        during = [float(t) for s in fired for t, _ in s["values"]]
        assert during and min(during) > healthy_until and max(during) < continued + cleared_s + 2
        print(json.dumps(figures, indent=1))
    finally:
        prom.stop()


def test_the_metrics_endpoint_serves_metrics_only():
    from trainer.metrics import Metrics

    port = free_port()
    metrics = Metrics("prometheus", port, rank=0, run="r")
    try:
        metrics.declare("corrupt_samples_total")
        metrics.inc("samples_total", 8, split="labeled")
        samples = scrape(f"http://127.0.0.1:{port}/metrics")[0]
        assert samples[PREFIX + "samples_total"] == [({"rank": "0", "run": "r", "split": "labeled"}, 8.0)]
        assert samples[PREFIX + "corrupt_samples_total"] == [({"rank": "0", "run": "r"}, 0.0)]  # declared at zero
        refused = []
        for path, method in (("/", "GET"), ("/favicon.ico", "GET"), ("/metrics/../x", "GET"), ("/metrics", "POST"),
                             ("/metrics", "PUT")):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"x" if method != "GET" else None,
                                             method=method)
            try:
                urllib.request.urlopen(request, timeout=5)
            except urllib.error.HTTPError as e:
                refused.append(e.code)
        assert refused == [404] * 5
    finally:
        metrics.close()


def test_metrics_port_in_use_is_one_line(tmp_path, synthetic_url):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = subprocess.run([os.path.join(VENV_BIN, "guidedmix"), "train", "--no-ray", *SMALL, "--data", synthetic_url,
                            "--out", str(tmp_path / "run"), "--steps", "2",
                            "--set", f"train.metrics_port={busy.getsockname()[1]}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "train.metrics_port" in r.stderr and "Traceback" not in r.stderr


# -- Kubernetes manifests -----------------------------------------------------------------------------

def strict(schema):
    """The CRD's schema with unknown fields refused wherever it lists properties (as the API server's
    structural pruning would silently drop them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayjob_validator():
    crd = yaml.safe_load(open(CRD))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def validate(doc, rayjob_validator):
    if doc["kind"] == "RayJob":
        errors = sorted(rayjob_validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{doc['metadata']['name']}: {errors[0].json_path}: {errors[0].message}"
    elif doc["kind"] == "PodMonitor":  # no schema offline: check that it selects the run's pods
        assert doc["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    elif doc["kind"] == "PrometheusRule":  # the Prometheus Operator's group format, checked by promtool
        assert doc["apiVersion"] == "monitoring.coreos.com/v1" and set(doc["spec"]) == {"groups"}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump({"groups": doc["spec"]["groups"]}, f)
            r = subprocess.run([prometheus_binary("promtool"), "check", "rules", f.name], capture_output=True,
                               text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        kubernetes_validate.validate(doc, "1.31", strict=True)


def rendered(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: rendered overlays cannot be checked here")
    r = subprocess.run([kubectl, "kustomize", os.path.join(K8S, "overlays", overlay)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return list(yaml.safe_load_all(r.stdout))


def test_plain_manifests_validate_strictly(rayjob_validator):
    docs = [d for path in glob.glob(os.path.join(K8S, "base", "*.yaml"))
            for d in yaml.safe_load_all(open(path)) if d and d.get("kind") != "Kustomization"]
    assert {d["kind"] for d in docs} == {"RayJob", "PodMonitor", "PrometheusRule"}
    for doc in docs:
        validate(doc, rayjob_validator)


def test_strict_validation_catches_a_misspelt_field(rayjob_validator):
    doc = yaml.safe_load(open(os.path.join(K8S, "base", "rayjob.yaml")))
    doc["spec"]["shutdownAfterJobFinishs"] = doc["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(AssertionError, match="shutdownAfterJobFinishs"):
        validate(doc, rayjob_validator)
    doc = yaml.safe_load(open(os.path.join(K8S, "base", "rayjob.yaml")))
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(AssertionError, match="resource"):
        validate(doc, rayjob_validator)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_and_its_entrypoint_parses(overlay, rayjob_validator):
    docs = rendered(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PodMonitor", "PrometheusRule", "RayJob"]
    for doc in docs:
        validate(doc, rayjob_validator)
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # Ray's secure default stays on
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + \
        [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        labels = pod["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        for c in pod["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"name": "metrics", "containerPort": 8080} in c["ports"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
            secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
            assert secret_env["AWS_SECRET_ACCESS_KEY"]["name"] == "guidedmix-s3"
            assert not any("value" in e and "SECRET" in e["name"] for e in c["env"])  # no inline secrets
    gpus = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    worker_group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    if overlay == "cpu-demo":
        assert gpus == [0] and "tolerations" not in worker_group["template"]["spec"]
    else:
        assert gpus == [1] and worker_group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # the entrypoint is a real `guidedmix train` command line
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["guidedmix", "train"]
    args = build_parser().parse_args(argv[1:])
    config = args.config.replace("/app/", REPO + "/")
    cfg = load_config(config, [f"train.workers={args.workers}", f"data.url={args.data}", f"out={args.out}"])
    per_pod = max(gpus[0], 1)
    assert cfg.train.worker_range == (worker_group["minReplicas"] * per_pod, worker_group["maxReplicas"] * per_pod), \
        "--workers MIN:MAX must match the worker group's minReplicas and maxReplicas"
    assert worker_group["replicas"] == worker_group["maxReplicas"]  # asks for all, goes on with fewer
    if overlay != "cpu-demo":
        assert cfg.train.elastic  # a GPU run a node short goes on
    assert cfg.data.url.startswith("s3://") and cfg.out.startswith("s3://")
    if overlay != "cpu-demo":  # the README's sizing (What a GPU node needs): a core per loader worker, two more
        cpu = int(worker_group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
        assert cpu >= 2 * cfg.data.loader_workers + 2, (overlay, cpu, cfg.data.loader_workers)
        # the node cache lies on a volume of the worker pod large enough for its limit
        pod = worker_group["template"]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"]
                     if cfg.data.node_cache.startswith(m["mountPath"].rstrip("/") + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "medium" not in volume["emptyDir"]  # disk, not the pod's memory
        assert int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= cfg.data.node_cache_gb


def test_dockerfile_runs_as_non_root_and_installs_what_the_manifests_name():
    text = open(os.path.join(REPO, "Dockerfile")).read()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] == "1000:1000" and re.search(r"useradd --uid 1000 --gid 1000", text)
    # every pod of the manifests runs as that user, non-root
    rayjob = open(os.path.join(K8S, "base", "rayjob.yaml")).read()
    assert set(re.findall(r"runAsUser: (\d+)", rayjob)) == {"1000"} and rayjob.count("runAsNonRoot: true") == 3
    assert "COPY configs configs" in text and "WORKDIR /app" in text  # entrypoints name /app/configs/...
    images = {c["image"] for d in yaml.safe_load_all(open(os.path.join(K8S, "base", "rayjob.yaml")))
              for c in [d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]]}
    assert images == {re.search(r"docker build -t (\S+)", text).group(1)}


# -- secrets ------------------------------------------------------------------------------------------

def _readable_files(root):
    """Every plain file under root, hidden files and folders included."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


@pytest.mark.slow
def test_a_planted_secret_reaches_nothing_a_cluster_keeps(s3, synthetic_url, tmp_path):
    """A run submitted with `ray job submit` to a head whose Ray Train state tracking and export API are on
    (what a cluster keeps is most there): the storage secret lives in the nodes' environment, as a Kubernetes
    Secret puts it, and a second one nested in a config file's storage options (where s3fs takes keys) is
    refused. Neither appears in the Jobs API, the Train state API, Ray's session directory (logs, export
    events), anything under --out of the run or of the refused one, the run's MLflow records (the workers
    track to MLflow), a sweep's folder with Ray Tune's records, the metrics or the console; hidden files too."""
    import fsspec

    # made here: the job's working directory (this repository, this file too) is uploaded to the cluster
    secret, nested = (f"PLANTED-{uuid.uuid4().hex}" for _ in range(2))
    fs = fsspec.filesystem("s3")
    fs.put(synthetic_url + "/", "test/data/", recursive=True)
    mlruns = tmp_path / "mlruns"
    head = RayHead(str(tmp_path), env={"AWS_SECRET_ACCESS_KEY": secret, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                                       "RAY_enable_export_api_write": "1", "MLFLOW_TRACKING_URI": mlruns.as_uri(),
                                       "MLFLOW_ALLOW_FILE_STORE": "true"})
    try:
        submit = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
                  "--", sys.executable, "-m", "launch", "train", *SMALL, "--data", "s3://test/data",
                  "--workers", "2", "--steps", "8", "--set", "train.ckpt_every=4"]
        for _ in range(30):  # a new head's job agent starts seconds after its dashboard answers
            good = subprocess.Popen([*submit, "--out", "s3://test/run"], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            scrapes = scrape_during(good, f"http://127.0.0.1:{head.metrics_port}/metrics", podmonitor_rename())
            console = good.communicate(timeout=600)[0]
            if "No available agent to submit job" not in console:
                break
            time.sleep(2)
        assert good.returncode == 0, console[-3000:]
        config = tmp_path / "with-key.yaml"
        config.write_text(f"data:\n  storage_options:\n    client_kwargs: {{aws_secret_access_key: {nested}}}\n")
        refused = subprocess.run([*submit, "--out", "s3://test/refused", "--config", str(config)], cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        console += refused.stdout + refused.stderr
        assert refused.returncode != 0
        # ray job submit echoes the job's log, and again once the job failed
        errors = {line for line in refused.stdout.splitlines() if line.startswith("guidedmix: error:")}
        assert len(errors) == 1 and "data.storage_options.client_kwargs.aws_secret_access_key" in errors.pop(), refused.stdout
        grid, sweep_out = tmp_path / "grid.yaml", tmp_path / "sweep"
        grid.write_text("default: []\n")
        swept = subprocess.run([*submit[:submit.index("train")], "sweep", *SMALL, "--data", "s3://test/data",
                                "--grid", str(grid), "--seeds", "0", "--steps", "2", "--out", str(sweep_out)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
        console += swept.stdout + swept.stderr
        assert glob.glob(f"{sweep_out}/tune/sweep/*/result.json") and glob.glob(f"{sweep_out}/trials/*/summary.json")
        assert glob.glob(f"{mlruns}/*/*/metrics/*")  # rank 0 tracked the run to MLflow
        runs = _get(f"{head.dashboard}/api/train/v2/runs/v1")
        assert "guidedmix-" in runs and "storage_options" in runs  # state tracking is on: runs and configs served
        places = {"console": console, "jobs API": _get(f"{head.dashboard}/api/jobs/"), "train state API": runs,
                  "metrics": json.dumps(scrapes)}
        session = os.path.join(head.temp_dir, "session_latest")
        assert glob.glob(os.path.join(session, "logs", "export_events", "*"))  # the export API wrote events
        for path in [*_readable_files(session), *_readable_files(str(mlruns)), *_readable_files(str(sweep_out))]:
            places[path] = open(path, "rb").read().decode("latin-1")
        written = fs.find("test/run")
        assert any(p.endswith("summary.json") for p in written) and any("checkpoints" in p for p in written)
        for path in written + fs.find("test/refused"):
            places[f"s3://{path}"] = fs.cat_file(path).decode("latin-1")
        for where, text in places.items():
            assert secret not in text and nested not in text, where
    finally:
        head.stop()


def test_secrets_at_any_depth_stay_out_of_a_runs_files(synthetic_url, tmp_path):
    """A run in one process may read keys from its config file; whatever it writes masks them (summary) or
    drops them (a checkpoint's config), however deep they sit."""
    nested = "PLANTED-nested-secret-91c2"
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  storage_options:\n    client_kwargs: {{aws_secret_access_key: {nested}}}\n"
                      f"    token: {nested}\n")
    out = tmp_path / "run"
    r = run_cli("train", "--no-ray", "--config", str(config), *SMALL[2:], "--data", synthetic_url, "--out", str(out),
                "--steps", "2", "--set", "train.ckpt_every=2", "--set", "train.overlays=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert nested not in r.stdout + r.stderr
    files = list(_readable_files(str(out)))
    assert any(p.endswith("config.json") for p in files)
    for path in files:
        assert nested.encode() not in open(path, "rb").read(), path
    options = json.load(open(out / "summary.json"))["config"]["data"]["storage_options"]
    assert options == {"client_kwargs": {"aws_secret_access_key": "***"}, "token": "***"}


@pytest.mark.parametrize("where", ["--set", "config"])
def test_credentials_never_travel_through_ray_or_a_command_line(synthetic_url, tmp_path, where):
    """A secret-looking key on a command line (visible to the cluster's dashboard) or in the config of a run
    on Ray (kept by Ray Train) is one line naming the key and where credentials go, without the value."""
    value = "PLANTED-3e8a"
    key = "data.storage_options.client_kwargs.aws_session_token"
    args = ["train", *SMALL, "--data", synthetic_url, "--out", str(tmp_path / "run"), "--steps", "2"]
    if where == "--set":
        args += ["--set", f"{key}={value}"]
    else:
        (tmp_path / "c.yaml").write_text(f"data: {{storage_options: {{client_kwargs: {{aws_session_token: {value}}}}}}}\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert key in r.stderr and "AWS_SECRET_ACCESS_KEY" in r.stderr and value not in r.stderr


@pytest.mark.slow
def test_the_readme_cluster_route_with_token_authentication(synthetic_url, tmp_path):
    """Ray's token authentication on, as the README's cluster route sets it up (the other tests' heads run
    without it: they are loopback-only and start many clusters). The head's and the client's homes are
    apart, so the client holds the token only through the variables the README names."""
    head_home, client_home = tmp_path / "head-home", tmp_path / "client-home"
    client_home.mkdir()
    ray = os.path.join(VENV_BIN, "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(head_home)}, check=True,
                   capture_output=True, timeout=60)
    token = (head_home / ".ray" / "auth_token").read_text().strip()
    # the head's `python` has the dependencies, as a cluster image's does
    head = RayHead(str(tmp_path), env={"RAY_AUTH_MODE": "token", "HOME": str(head_home),
                                       "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    try:
        def client(*args, **env):
            base = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
            return subprocess.run([ray, "job", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                                  env={**base, "HOME": str(client_home), **env})

        submit = ["submit", "--address", head.dashboard, "--submission-id", "gm-auth", "--working-dir", ".", "--",
                  "python", "-m", "launch", "train", *SMALL, "--data", synthetic_url, "--out", str(tmp_path / "run"),
                  "--workers", "2", "--steps", "4"]
        refused = client(*submit)
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr
        with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        r = client(*submit, **with_token)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "step 4/4" in r.stdout and "full log" in r.stdout  # the driver's quiet console, through Ray's job log
        status = client("status", "--address", head.dashboard, "gm-auth", **with_token)
        assert status.returncode == 0 and "Job 'gm-auth' succeeded" in status.stdout
        assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 4
    finally:
        head.stop()
