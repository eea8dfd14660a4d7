"""The run's Prometheus metrics, one list for every process that records them.

Inside Ray (train workers, the pairing service) they go through `ray.util.metrics` to each node's
metrics agent, which serves them on the node's metrics export port (8080 under KubeRay) with Ray's
`ray_` prefix; the PodMonitor in k8s/ strips that prefix, so dashboards see the `guidedmix_*` names
below wherever the code ran. Outside Ray a `prometheus_client` endpoint serves the same names
(`train.metrics_port`). Values are recorded as they happen; nothing here reads them back.
"""
from __future__ import annotations

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


# name (without the prefix) -> what it is; counters carry `_total` here, as Prometheus shows them
SPECS = {
    "run_info": Spec("gauge", "1 for the running run; labels name it and the hash of its resolved config",
                     ("run", "config_hash")),
    "step_duration_seconds": Spec("histogram", "Wall time of one training step (data wait excluded)",
                                  ("rank",), STEP_BUCKETS),
    "samples_total": Spec("counter", "Samples consumed by training, by split", ("rank", "split")),
    "loss": Spec("gauge", "Latest loss by part: sup, unsup, mix, and total", ("rank", "part")),
    "learning_rate": Spec("gauge", "Current learning rate", ("rank",)),
    "data_wait_seconds": Spec("histogram", "Time a step waited for its batches", ("rank",), FAST_BUCKETS),
    "corrupt_samples_total": Spec("counter", "Samples skipped as corrupt or undecodable", ("rank",)),
    "checkpoint_duration_seconds": Spec("histogram", "Time to write and commit one checkpoint (this rank)",
                                        ("rank",), SLOW_BUCKETS),
    "checkpoint_last_step": Spec("gauge", "Step of the last committed checkpoint", ("rank",)),
    "eval_miou": Spec("gauge", "Validation mIoU (0-1) at the last evaluation", ("rank",)),
    "pseudo_mask_coverage": Spec("gauge", "Share of unlabeled pixels given a pseudo label over the last log interval",
                                 ("rank",)),
    "pseudo_mask_accuracy": Spec("gauge", "Share of pseudo-labelled pixels that match the withheld true mask "
                                 "(shard sets built with --withhold-masks) over the last log interval", ("rank",)),
    "pairing_query_seconds": Spec("histogram", "Round trip of a worker's query to the pairing service",
                                  ("rank",), FAST_BUCKETS),
    "pairing_fallbacks_total": Spec("counter", "Steps that paired in-batch because the service was late or failed",
                                    ("rank",)),
    "pairing_bank_size": Spec("gauge", "Labeled samples in the pairing service's bank"),
    "pairing_staleness_steps": Spec("gauge", "Mean steps since insert of the bank entries in the last answer"),
    "pairing_class_iou": Spec("gauge", "Running IoU (0-1) of each class on the labeled batches the workers report "
                              "to the pairing service: what `pairing.similarity: need` pairs by", ("class",)),
}


def family_name(name: str) -> str:
    """The metric family's exported name: counters are declared with `_total`, which both Ray and
    prometheus_client append themselves."""
    return PREFIX + (name[:-len("_total")] if SPECS[name].kind == "counter" else name)


class Metrics:
    """Record by name: `metrics.inc("samples_total", 8, split="labeled")`. Default labels (rank) are
    added to every metric that declares them."""

    def __init__(self, backend: str = "none", port: int = 0, host: str = "127.0.0.1", **default_labels):
        self.backend, self.defaults, self._instruments = backend, default_labels, {}
        self.registry = None
        if backend == "prometheus":
            self.registry = prometheus_client.CollectorRegistry()  # this run's, not the process-global one
            self.server = _serve_metrics_only(self.registry, port, host)
        elif backend not in ("ray", "none"):
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

    def _record(self, name: str, method: str, value: float, labels: dict) -> None:
        if self.backend == "none":
            return
        spec = SPECS[name]
        tags = {k: str(v) for k, v in {**self.defaults, **labels}.items() if k in spec.labels}
        instrument = self._instrument(name)
        if self.backend == "ray":
            getattr(instrument, {"inc": "inc", "set": "set", "observe": "observe"}[method])(value, tags=tags or None)
        else:
            target = instrument.labels(**tags) if spec.labels else instrument
            getattr(target, method)(value)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        if value > 0:
            self._record(name, "inc", value, labels)

    def set(self, name: str, value: float, **labels) -> None:
        self._record(name, "set", value, labels)

    def observe(self, name: str, value: float, **labels) -> None:
        self._record(name, "observe", value, labels)

    def close(self) -> None:
        if self.registry is not None:
            self.server.shutdown()
            self.server.server_close()


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
