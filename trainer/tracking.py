"""Experiment tracking by rank 0 with the tools researchers already read: TensorBoard event files under
`<out>/tensorboard/` (`train.tensorboard`), and MLflow when MLFLOW_TRACKING_URI is set (MLflow's own
variables choose the experiment and any credentials).

Where --out is an object store, events are written to a local folder and copied there at every checkpoint
and at the end. A resumed run starts a new event file from the resumed step (TensorBoard's `purge_step`
drops what the earlier attempt logged past it) and continues the same MLflow run (found by its out tag).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from shards.storage import join, local_path

from .config import Config

OUT_TAG = "guidedmix.out"


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    """Scalars at each log step, evaluations (mIoU, per-class IoU, overlays) at each eval."""

    def __init__(self, cfg: Config, classes: list[str], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.classes = cfg, classes
        self.url = join(cfg.out, "tensorboard")
        self.remote = local_path(self.url) is None
        self.local = tempfile.mkdtemp(prefix="guidedmix-tb-") if self.remote else local_path(self.url)
        # from the step after the checkpoint on, events of an earlier attempt are superseded
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(self.local, purge_step=purge) if cfg.train.tensorboard else None
        self.mlflow = None
        if os.environ.get("MLFLOW_TRACKING_URI"):
            self._start_mlflow()

    def _start_mlflow(self) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "guidedmix"))
        earlier = mlflow.search_runs(filter_string=f"tags.`{OUT_TAG}` = '{self.cfg.out}'", max_results=1,
                                     output_format="list")
        if earlier:
            mlflow.start_run(run_id=earlier[0].info.run_id)
            return
        mlflow.start_run(run_name=self.cfg.out.rstrip("/").rsplit("/", 1)[-1], tags={OUT_TAG: self.cfg.out})
        mlflow.log_params(_flat(self.cfg.public_dict()))

    def scalars(self, step: int, record: dict) -> None:
        values = {name: record[key] for name, key in (
            ("loss/total", "loss"), ("loss/sup", "sup"), ("loss/unsup", "unsup"), ("loss/mix", "mix"),
            ("lr", "lr"), ("data_wait_s", "data_wait_s"), ("pseudo/coverage", "pseudo_coverage"),
            ("pseudo/accuracy", "pseudo_accuracy")) if key in record}
        self._log(step, values)

    def evaluation(self, step: int, miou: float, per_class: list[float], overlays: list) -> None:
        self._log(step, {"eval/miou": miou, **{f"eval/iou/{c}": v for c, v in zip(self.classes, per_class)}})
        for i, picture in enumerate(overlays):
            if self.writer is not None:
                self.writer.add_image(f"eval/overlay-{i}", np.asarray(picture), step, dataformats="HWC")
            if self.mlflow is not None:
                self.mlflow.log_image(picture, key=f"overlay-{i}", step=step)

    def _log(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.mlflow is not None:  # MLflow's metric names take no '/'
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def sync(self) -> None:
        """Event files to --out: flushed in place, or copied to the object store."""
        if self.writer is None:
            return
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    self.cfg.storage(self.url).at(name).write(f.read())

    def close(self) -> None:
        self.sync()
        if self.writer is not None:
            self.writer.close()
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)
        if self.mlflow is not None:
            self.mlflow.end_run()
