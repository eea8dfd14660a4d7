"""The run's Prometheus metrics, one list for every process that records them.

Inside Ray (train workers, the pairing service) they go through `ray.util.metrics` to each node's
metrics agent, which serves them on the node's metrics export port (8080 under KubeRay) with Ray's
`ray_` prefix; the PodMonitor in k8s/ strips that prefix, so dashboards see the `guidedmix_*` names
below wherever the code ran. Outside Ray a `prometheus_client` endpoint serves the same names
(`train.metrics_port`). Values are recorded as they happen; nothing here reads them back.

Every series holds from the run's start to its end, so that a dashboard and the alert rules
(k8s/base/prometheusrule.yaml) never see a gap in a healthy run:
- counters and histograms are declared at zero for every label set the run will use (`declare`), so a clean
  run exports `corrupt_samples_total 0` and `increase()` counts the first increment. Ray's API has no empty
  histogram: on Ray a histogram appears at its first observation.
- Ray's OpenTelemetry recorder drops a gauge that was not recorded again within about two report intervals
  (`RAY_metrics_report_interval_ms`, 10 s by default): a thread records every gauge's last value again twice
  an interval, through evaluations, checkpoints and any other long pause of the training loop.
"""
from __future__ import annotations

import os
import time
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client.exposition import ThreadingWSGIServer
from ray.util import metrics as ray_metrics

from shards.errors import BadInput

PREFIX = "guidedmix_"
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SLOW_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple = ()
    buckets: tuple = ()


# name (without the prefix) -> what it is; counters carry `_total` here, as Prometheus shows them. Every
# series of a training worker carries its rank and the run's name (the alert rules group by run).
WORKER = ("rank", "run")
SPECS = {
    "run_info": Spec("gauge", "1 for the running run; labels name it and the hash of its resolved config",
                     ("run", "config_hash")),
    "step": Spec("gauge", "The last completed training step", WORKER),
    "steps_target": Spec("gauge", "The step the run trains to (train.steps)", WORKER),
    "progress_timestamp_seconds": Spec("gauge", "Unix time of the worker's last progress: a training step, an "
                                       "evaluation batch, a checkpoint written, a resume", WORKER),
    "step_duration_seconds": Spec("histogram", "Wall time of one training step (data wait excluded)",
                                  WORKER, STEP_BUCKETS),
    "samples_total": Spec("counter", "Samples consumed by training, by split", (*WORKER, "split")),
    "loss": Spec("gauge", "Latest loss by part: sup, unsup, mix, and total", (*WORKER, "part")),
    "learning_rate": Spec("gauge", "Current learning rate", WORKER),
    "data_wait_seconds": Spec("histogram", "Time a step waited for its batches", WORKER, FAST_BUCKETS),
    "corrupt_samples_total": Spec("counter", "Samples skipped as corrupt or undecodable", WORKER),
    "checkpoint_duration_seconds": Spec("histogram", "Time from a checkpoint's start to its commit, written in "
                                        "the background (rank 0; other ranks: to their part written)",
                                        WORKER, SLOW_BUCKETS),
    "checkpoint_stall_seconds": Spec("histogram", "Time a checkpoint held the step up (this rank): its state "
                                     "handed over, what the next forward changes copied to host memory", WORKER,
                                     SLOW_BUCKETS),
    "checkpoint_last_step": Spec("gauge", "Step of the last committed checkpoint (0: none yet)", WORKER),
    "checkpoint_every_steps": Spec("gauge", "Steps between checkpoints (train.ckpt_every)", WORKER),
    "eval_miou": Spec("gauge", "Validation mIoU (0-1) at the last evaluation", WORKER),
    "eval_miou_best": Spec("gauge", "Best validation mIoU (0-1) of the run so far, its resumes included", WORKER),
    "pseudo_mask_coverage": Spec("gauge", "Share of unlabeled pixels given a pseudo label over the last log interval",
                                 WORKER),
    "pseudo_mask_accuracy": Spec("gauge", "Share of pseudo-labelled pixels that match the withheld true mask "
                                 "(shard sets built with --withhold-masks) over the last log interval", WORKER),
    "pseudo_class_share": Spec("gauge", "Share of the pseudo-labelled pixels that each class claims over the last "
                               "log interval", (*WORKER, "class")),
    "true_class_share": Spec("gauge", "Share of each class in the withheld true masks of the same unlabeled pixels "
                             "(--withhold-masks shard sets)", (*WORKER, "class")),
    "pairing_query_seconds": Spec("histogram", "Round trip of a worker's query to the pairing service",
                                  WORKER, FAST_BUCKETS),
    "pairing_fallbacks_total": Spec("counter", "Steps that paired in-batch because the service was late or failed",
                                    WORKER),
    "pairing_bank_size": Spec("gauge", "Labeled samples in the pairing bank (the service's or the worker's)", ("run",)),
    "pairing_staleness_steps": Spec("gauge", "Mean steps since insert of the bank entries in the service's last answer "
                                    "(a worker bank: in its answers since the last log step)",
                                    ("run",)),
    "pairing_class_iou": Spec("gauge", "Running IoU (0-1) of each class on the labeled batches the workers report "
                              "to the pairing bank: what `pairing.similarity: need` pairs by", ("run", "class")),
}


def family_name(name: str) -> str:
    """The metric family's exported name: counters are declared with `_total`, which both Ray and
    prometheus_client append themselves."""
    return PREFIX + (name[:-len("_total")] if SPECS[name].kind == "counter" else name)


class Metrics:
    """Record by name: `metrics.inc("samples_total", 8, split="labeled")`. Default labels (rank, run) are
    added to every metric that declares them."""

    def __init__(self, backend: str = "none", port: int = 0, host: str = "127.0.0.1", **default_labels):
        self.backend, self.defaults, self._instruments = backend, default_labels, {}
        self.registry = None
        self._gauges: dict[tuple, float] = {}  # (name, tags) -> last value, recorded again by the keeper
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if backend == "prometheus":
            self.registry = prometheus_client.CollectorRegistry()  # this run's, not the process-global one
            self.server = _serve_metrics_only(self.registry, port, host)
        elif backend == "ray":
            threading.Thread(target=self._keep_gauges, args=(ray_report_interval_s() / 2,), daemon=True,
                             name="metrics-gauges").start()
        elif backend != "none":
            raise ValueError(f"metrics backend: {backend}")

    def _instrument(self, name: str):
        if name not in self._instruments:
            spec = SPECS[name]
            self._instruments[name] = (self._make_ray if self.backend == "ray" else self._make_prometheus)(name, spec)
        return self._instruments[name]

    @staticmethod
    def _make_ray(name, spec):
        full = family_name(name)
        if spec.kind == "histogram":
            return ray_metrics.Histogram(full, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels)
        kind = ray_metrics.Counter if spec.kind == "counter" else ray_metrics.Gauge
        return kind(full, spec.help, tag_keys=spec.labels)

    def _make_prometheus(self, name, spec):
        pc, full = prometheus_client, family_name(name)
        if spec.kind == "histogram":
            return pc.Histogram(full, spec.help, spec.labels, registry=self.registry, buckets=spec.buckets)
        kind = pc.Counter if spec.kind == "counter" else pc.Gauge
        return kind(full, spec.help, spec.labels, registry=self.registry)

    def __reduce__(self):
        """Ray's metrics travel to an actor as their backend and labels (the actor records through its own
        process); a served registry stays in its process."""
        if self.backend == "prometheus":
            raise TypeError("a Metrics that serves /metrics cannot leave its process")
        return _rebuilt, (self.backend, self.defaults)

    def _tags(self, name: str, labels: dict) -> dict:
        keys = SPECS[name].labels
        return {k: str(v) for k, v in {**self.defaults, **labels}.items() if k in keys}

    def _record(self, name: str, method: str, value: float, tags: dict) -> None:
        instrument = self._instrument(name)
        if self.backend == "ray":
            getattr(instrument, method)(value, tags=tags or None)
        else:
            target = instrument.labels(**tags) if SPECS[name].labels else instrument
            getattr(target, method)(value)

    def declare(self, name: str, **labels) -> None:
        """A counter's or histogram's series at zero from now on, before its first increment or observation
        (on Ray, counters only: its API has no empty histogram)."""
        if self.backend == "none":
            return
        tags, instrument = self._tags(name, labels), self._instrument(name)
        if self.backend == "prometheus":
            if SPECS[name].labels:
                instrument.labels(**tags)  # a labelled child exists, at zero, once named
        elif SPECS[name].kind == "counter":
            instrument._record(0.0, tags)  # Counter.inc refuses 0; the recorder exports the series at 0

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        if value > 0 and self.backend != "none":
            self._record(name, "inc", value, self._tags(name, labels))

    def set(self, name: str, value: float, **labels) -> None:
        if self.backend == "none":
            return
        tags = self._tags(name, labels)
        with self._lock:  # recorded under the lock: the keeper never records an older value after this one
            self._gauges[(name, tuple(sorted(tags.items())))] = value
            self._record(name, "set", value, tags)

    def observe(self, name: str, value: float, **labels) -> None:
        if self.backend != "none":
            self._record(name, "observe", value, self._tags(name, labels))

    def _keep_gauges(self, period_s: float) -> None:
        while not self._closed.wait(period_s):
            with self._lock:
                for (name, tags), value in self._gauges.items():
                    self._record(name, "set", value, dict(tags))

    def close(self) -> None:
        self._closed.set()
        if self.registry is not None:
            self.server.shutdown()
            self.server.server_close()


def _rebuilt(backend: str, defaults: dict) -> Metrics:
    return Metrics(backend, **defaults)


def ray_report_interval_s() -> float:
    """How often a Ray node's metrics agent takes this process's values (Ray's own setting, inherited from
    `ray start`)."""
    return float(os.environ.get("RAY_metrics_report_interval_ms", 10000)) / 1000


def run_label(out: str) -> str:
    """The `run` label of a run's series: the last part of its output folder."""
    return out.rstrip("/").rsplit("/", 1)[-1]


def _serve_metrics_only(registry, port: int, host: str):
    """GET /metrics in Prometheus' text format; every other path and method is a 404 (prometheus_client's
    own server answers any path)."""
    metrics_app = prometheus_client.make_wsgi_app(registry)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/metrics" and environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"metrics are served at GET /metrics only\n"]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # no line per scrape in the training log
            pass

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    return server


def for_this_process(in_ray: bool, port: int = 0, host: str = "127.0.0.1", **default_labels) -> Metrics:
    """Ray's metrics inside a Ray worker or actor; else an endpoint on `port` (0: no metrics)."""
    if in_ray:
        return Metrics("ray", **default_labels)
    if not port:
        return Metrics("none", **default_labels)
    try:
        return Metrics("prometheus", port, host, **default_labels)
    except OSError as e:
        raise BadInput(f"train.metrics_port: cannot serve on {host}:{port}: {e.strerror}") from None


def declare_training_series(metrics: Metrics, cfg, splits) -> None:
    """Every series a training run records, from its start: what the alert rules compare against."""
    metrics.set("run_info", 1, config_hash=cfg.digest())
    metrics.set("steps_target", cfg.train.steps)
    metrics.set("checkpoint_every_steps", cfg.train.ckpt_every)
    for split in splits:
        metrics.declare("samples_total", split=split)
    for name in ("corrupt_samples_total", "step_duration_seconds", "data_wait_seconds",
                 "checkpoint_duration_seconds", "checkpoint_stall_seconds"):
        metrics.declare(name)
    metrics.set("progress_timestamp_seconds", time.time())
