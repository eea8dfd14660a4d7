"""The CLI and config contracts without Ray: bad input is one line and exit 2; eval and predict work on
a checkpoint from a short single-process run."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import check_ledgers, ledger_report, read_json, run_cli
from shards.errors import BadInput
from shards.storage import Storage
from trainer.config import Config, load_config
from trainer.loop import WorkerContext, train


@pytest.mark.parametrize("overrides,field", [
    (["model.bogus=1"], "model.bogus"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["guidedmix.lam_max=1.5"], "guidedmix.lam_max"),
    (["model.output_stride=4"], "model.output_stride"),
    (["data.scale_min=3"], "scale_min"),
    (["data.node_cache=s3://bucket/cache"], "data.node_cache"),
    (["data.node_cache=cache"], "data.node_cache"),
    (["guidedmix.teacher=ema", "train.zero_stage=3"], "zero_stage"),
    (["nodot"], "dotted.key=value"),
])
def test_bad_config_names_the_key(overrides, field):
    with pytest.raises(BadInput, match=field.replace(".", r"\.")):
        load_config("configs/cpu-small.yaml", overrides)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    with pytest.raises(BadInput, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(BadInput, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_secrets_stay_out_of_the_public_config():
    options = {"secret": "S1", "endpoint_url": "http://127.0.0.1:1",
               "client_kwargs": {"aws_secret_access_key": "S2", "region_name": "eu-west-1"},
               "config_kwargs": {"s3": [{"sas_token": "S3"}]}}
    cfg = Config.model_validate({"data": {"storage_options": options}})
    masked = cfg.public_dict()["data"]["storage_options"]
    assert masked == {"secret": "***", "endpoint_url": "http://127.0.0.1:1",
                      "client_kwargs": {"aws_secret_access_key": "***", "region_name": "eu-west-1"},
                      "config_kwargs": {"s3": [{"sas_token": "***"}]}}
    assert cfg.public_dict(drop_secrets=True)["data"]["storage_options"] == {
        "endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"s3": [{}]}}
    assert cfg.secret_keys() == ["data.storage_options.secret",
                                 "data.storage_options.client_kwargs.aws_secret_access_key",
                                 "data.storage_options.config_kwargs.s3.0.sas_token"]
    with pytest.raises(BadInput, match="storage_options.key: a command line") as refused:
        load_config("configs/cpu-small.yaml", ["data.storage_options.key=S4"])
    assert "S4" not in str(refused.value)


def test_cli_bad_arguments_exit_2():
    for args in (["train", "--steps", "x"], ["nonsense"], ["train", "--config", "missing.yaml"]):
        r = run_cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_train_without_ray_asked_for_a_gpu_it_lacks_is_refused_in_one_line(synthetic_url, tmp_path):
    """`train --no-ray` trains on this machine's GPU where there is one; `train.use_gpu: true` without one is bad
    input, not a CPU run in disguise."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = run_cli("train", "--no-ray", "--config", "configs/cpu-small.yaml", "--data", synthetic_url,
                "--out", str(tmp_path / "out"), "--set", "train.use_gpu=true")
    assert r.returncode == 2
    assert r.stderr.strip() == "guidedmix: error: train.use_gpu: true, but this machine has no CUDA device"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained_run(synthetic_url, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    cfg = load_config("configs/cpu-small.yaml", [f"data.url={synthetic_url}", f"out={out}", "train.engine=plain", "train.workers=1",
                                                 "train.steps=6", "train.ckpt_every=3", "data.crop_size=32",
                                                 "guidedmix.tau=0"])  # tau 0: an untrained model's pseudo masks count
    return out, train(cfg, WorkerContext())


def test_eval_of_a_checkpoint_matches_the_run(trained_run, synthetic_url):
    out, summary = trained_run
    r = run_cli("eval", "--checkpoint", out, "--data", synthetic_url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["miou"] == pytest.approx(summary["miou"], abs=1e-9)
    # an older checkpoint by its folder, and a path with no checkpoint
    assert run_cli("eval", "--checkpoint", f"{out}/checkpoints/step-00000003", "--data", synthetic_url).returncode == 0
    r = run_cli("eval", "--checkpoint", os.path.dirname(out), "--data", synthetic_url)
    assert r.returncode == 2 and "no committed checkpoint" in r.stderr


def test_predict_writes_masks_and_overlays(trained_run, tmp_path):
    out, summary = trained_run
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 100, 50, 200)).save(tmp_path / f"img{i}.png")
    r = run_cli("predict", "--checkpoint", out, "--images", str(tmp_path / "*.png"), "--out", str(tmp_path / "pred"))
    assert r.returncode == 0, r.stderr
    mask = Image.open(tmp_path / "pred" / "img0.png")
    assert mask.size == (40, 30) and max(mask.getextrema()) < 7
    assert Image.open(tmp_path / "pred" / "img1-overlay.png").size == (80, 30)
    r = run_cli("predict", "--checkpoint", out, "--images", str(tmp_path / "none-*.png"), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "matches no file" in r.stderr
    r = run_cli("predict", "--checkpoint", out, "--images", "ftp://host/*.png", "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "unsupported URL scheme" in r.stderr and "Traceback" not in r.stderr


def test_outputs_of_a_run(trained_run):
    out, summary = trained_run
    for key in ("method", "miou", "per_class_iou", "steps", "samples_seen", "wall_seconds", "config"):
        assert key in summary
    assert summary["steps"] == 6 and summary["samples_seen"] == 6 * 16
    assert json.load(open(f"{out}/summary.json"))["miou"] == summary["miou"]
    assert Image.open(f"{out}/curves.png").size[0] > 500
    assert len(os.listdir(f"{out}/overlays")) == 4
    # the synthetic set withholds the unlabeled masks: the run scores what it taught against them
    pseudo = summary["pseudo_masks"]
    assert 0 < pseudo["pseudo_coverage"] <= 1 and 0 <= pseudo["pseudo_accuracy"] <= 1
    assert len(pseudo["pseudo_class_freq"]) == len(pseudo["true_class_freq"]) == 7
    assert sum(pseudo["true_class_freq"]) == pytest.approx(1, abs=1e-3)


def test_the_ledger_check_sees_a_lost_a_repeated_and_an_unplanned_sample(short_epochs_url, tmp_path):
    """The ledger check can fail: from a real run's ledger, a sample dropped from a complete epoch or from the
    last partial one is reported lost, one consumed twice repeated, one of another epoch unplanned, and a
    summary that counts other than the ledgers is caught."""
    out = str(tmp_path / "run")
    cfg = load_config("configs/cpu-small.yaml", [f"data.url={short_epochs_url}", f"out={out}", "train.engine=plain", "train.workers=1",
                                                 "train.steps=20", "train.ckpt_every=1000", "data.crop_size=32",
                                                 "train.ledger=true", "train.overlays=0"])
    train(cfg, WorkerContext())
    clean = check_ledgers(out)  # 20 steps of 8 + 8, 6 labeled and 18 unlabeled steps an epoch
    assert clean["labeled"]["epochs_checked"] == 4 and clean["unlabeled"]["epochs_checked"] == 2
    assert clean["labeled"]["samples"] == clean["unlabeled"]["samples"] == 20 * 8
    assert read_json(f"{out}/summary.json")["samples_seen"] == 2 * 20 * 8
    path = f"{out}/ledger/rank-0.json"
    original = json.load(open(path))

    def planted(fault):
        ledger = json.loads(json.dumps(original))
        fault(ledger)
        json.dump(ledger, open(path, "w"))
        report = ledger_report(out)
        with pytest.raises(AssertionError):
            check_ledgers(out)
        return report

    assert planted(lambda ledger: ledger["unlabeled"].pop(0))["unlabeled"]["lost"] == 1
    assert planted(lambda ledger: ledger["labeled"].pop())["labeled"]["lost"] == 1  # the last, partial epoch
    assert planted(lambda ledger: ledger["labeled"].append(ledger["labeled"][0]))["labeled"]["repeated"] == 1
    swapped = planted(lambda ledger: ledger["labeled"][0].__setitem__(1, "not-in-the-plan"))["labeled"]
    assert swapped["unplanned"] == 1 and swapped["lost"] == 1
    summary = read_json(f"{out}/summary.json")
    json.dump(original, open(path, "w"))
    summary["samples_by_split"]["labeled"] += 1
    json.dump(summary, open(f"{out}/summary.json", "w"))
    with pytest.raises(AssertionError):
        check_ledgers(out)


def test_results_are_written_through_a_flaky_store(monkeypatch):
    """summary.json and the other results retry transient storage errors like every other read and write."""
    from fsspec.implementations.memory import MemoryFileSystem

    from shards import storage
    from shards.errors import StorageFailure
    from trainer import outputs

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    real, failures = MemoryFileSystem.pipe_file, {"left": 2}

    def flaky(self, path, value, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("reset by peer")
        return real(self, path, value, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", flaky)
    outputs.write_json(Storage("memory://flaky/summary.json", retries=2), {"steps": 3})
    assert json.loads(MemoryFileSystem().cat_file("/flaky/summary.json")) == {"steps": 3}
    failures["left"] = 3
    with pytest.raises(StorageFailure, match="memory://flaky/summary.json"):
        outputs.write_json(Storage("memory://flaky/summary.json", retries=2), {"steps": 4})
