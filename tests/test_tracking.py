"""Experiment tracking read back with the tools' own readers: TensorBoard's event reader on the files a run
wrote to S3, MLflow's client on a local file store; across a resume, and without the run's secrets."""
import glob
import os

import fsspec
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from trainer.config import Config, load_config
from trainer.loop import WorkerContext, train
from trainer.tracking import OUT_TAG


def test_tensorboard_on_s3_and_mlflow_across_a_resume(s3, synthetic_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for local use
    planted = "planted-Secret-7f3a"
    out = "s3://test/tracked"

    def run(steps):
        cfg = load_config("configs/cpu-small.yaml", [
            f"data.url={synthetic_url}", f"out={out}", "train.engine=plain", "train.workers=1", f"train.steps={steps}",
            "train.log_every=2", "train.eval_every=3", "train.ckpt_every=3", "data.crop_size=32", "train.overlays=2"])
        raw = cfg.model_dump()
        raw["data"]["storage_options"] = {"key": "testing", "secret": planted}  # as a --no-ray config file has it
        return train(Config.model_validate(raw), WorkerContext())

    run(6)
    summary = run(8)  # resumes at step 6

    local = tmp_path / "tb"
    fsspec.filesystem("s3").get(f"{out}/tensorboard/", str(local), recursive=True)
    assert len(os.listdir(local)) == 2  # one event file per attempt
    events = EventAccumulator(str(local), size_guidance={IMAGES: 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval/miou")] == [3, 6, 8]
    assert events.Scalars("eval/miou")[-1].value == pytest.approx(summary["miou"], abs=1e-6)
    assert {f"eval/iou/{c}" for c in summary["per_class_iou"]} <= set(events.Tags()["scalars"])
    assert {"pseudo/coverage", "lr", "loss/sup"} <= set(events.Tags()["scalars"])
    overlay = events.Images("eval/overlay-0")
    assert [e.step for e in overlay] == [3, 6, 8] and overlay[-1].width > overlay[-1].height > 0

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("guidedmix").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[OUT_TAG] == out  # the resumed attempt continued the same run
    history = client.get_metric_history(runs[0].info.run_id, "loss.total")
    assert [m.step for m in history] == [2, 4, 6, 8]
    assert runs[0].data.metrics["eval.miou"] == pytest.approx(summary["miou"], abs=1e-6)
    assert runs[0].data.params["train.steps"] == "6" and runs[0].data.params["data.crop_size"] == "32"
    for path in [*glob.glob(f"{tmp_path}/mlruns/**/*", recursive=True), *glob.glob(f"{local}/*")]:
        if os.path.isfile(path):
            assert planted.encode() not in open(path, "rb").read(), path
