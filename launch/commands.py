"""Run commands of the CLI: train, eval, predict, demo."""
from __future__ import annotations

import glob as globlib
import io
import json
import logging
import os

import fsspec
import numpy as np
import torch
from PIL import Image

from shards.errors import BadInput
from shards.storage import check_url, join

log = logging.getLogger("guidedmix")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(args, extra: list[str] = ()):
    from trainer.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("data", "data.url"), ("out", "out"), ("workers", "train.workers"),
                      ("steps", "train.steps"), ("method", "train.method")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, [*overrides, *extra])
    check_url(cfg.data.url, cfg.data.allow_pipe)
    check_url(cfg.out)
    return cfg


def _train(args) -> int:
    if args.no_ray:  # one process, plain PyTorch: debugging and small studies (metrics on train.metrics_port)
        from trainer.loop import WorkerContext, train

        summary = train(_config(args, ["train.engine=plain", "train.workers=1"]), WorkerContext())
    else:
        from .driver import run

        summary = run(_config(args), args.address)
    print(json.dumps({k: summary[k] for k in ("method", "miou", "steps", "samples_seen", "wall_seconds")}))
    return 0


def _load_checkpoint(url: str, storage_options=None):
    """(config, model) from a run folder or one of its checkpoints (plain or DeepSpeed ZeRO 0-3)."""
    from trainer.checkpoint import CheckpointStore, remove_local
    from trainer.config import Config
    from trainer.model import build_model

    url = url.rstrip("/")
    run, _, name = url.rpartition("/checkpoints/")
    if not run:
        run, name = url, None
    store = CheckpointStore(run, storage_options)
    name = name or store.latest()
    if not name:
        raise BadInput(f"{url}: no committed checkpoint")
    local = store.download(name)
    try:
        if not os.path.exists(os.path.join(local, "config.json")):
            raise BadInput(f"{url}: not a guidedmix checkpoint (no config.json)")
        with open(os.path.join(local, "config.json")) as f:
            saved = json.load(f)
        cfg, classes = Config.model_validate(saved["config"]), saved["classes"]
        model = build_model(cfg.model, len(classes), cfg.guidedmix.mitrans.reduction)
        model.load_state_dict(_model_state(local))
    finally:
        remove_local(local)
    return cfg, classes, model.eval()


def _model_state(local: str) -> dict:
    plain = os.path.join(local, "plain.pt")
    if os.path.exists(plain):
        return torch.load(plain, map_location="cpu", weights_only=False)["model"]
    engine_dir = os.path.join(local, "engine")
    states = sorted(globlib.glob(os.path.join(engine_dir, "*model_states.pt")))
    if any("zero_pp_rank" in s for s in states):  # ZeRO-3: parameters live in the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(local, tag="engine")
    if not states:
        raise BadInput(f"{local}: checkpoint holds no model weights")
    state = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def _eval(args) -> int:
    from shards.manifest import read_manifest
    from trainer.config import Config, apply_overrides
    from trainer.loop import WorkerContext, evaluate_model

    cfg, classes, model = _load_checkpoint(args.checkpoint)
    cfg = Config.model_validate(apply_overrides(cfg.model_dump(), [f"data.url={args.data}", *args.overrides]))
    manifest = read_manifest(cfg.data.url, cfg.data.storage_options)
    if manifest["classes"] != classes:
        raise BadInput(f"--data {args.data}: its classes differ from the checkpoint's")
    miou, per_class, _ = evaluate_model(model, cfg, WorkerContext(), manifest, torch.float32)
    print(json.dumps({"miou": miou, "per_class_iou": dict(zip(classes, per_class))}))
    return 0


def _predict(args) -> int:
    from shards.augment import to_tensor
    from trainer import evaluate, outputs

    check_url(args.images)
    check_url(args.out)
    cfg, classes, model = _load_checkpoint(args.checkpoint)
    fs, pattern = fsspec.core.url_to_fs(args.images)
    paths = sorted(fs.glob(pattern))
    if not paths:
        raise BadInput(f"--images {args.images}: matches no file")
    for path in paths:
        try:
            image = np.asarray(Image.open(io.BytesIO(fs.cat_file(path))).convert("RGB"))
        except Exception:
            raise BadInput(f"{path}: unreadable image") from None
        probs = evaluate.predict(model, to_tensor(image)[None], len(classes), cfg.eval.mode, cfg.eval.window,
                                 cfg.eval.stride, cfg.eval.flip)
        pred = probs.argmax(1)[0].numpy().astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        outputs.write_bytes(join(args.out, f"{stem}.png"), outputs.png_bytes(Image.fromarray(pred)))
        outputs.write_bytes(join(args.out, f"{stem}-overlay.png"), outputs.png_bytes(outputs.overlay(image, pred)))
    print(json.dumps({"images": len(paths), "out": args.out}))
    return 0


def _demo(args) -> int:
    from shards import build, sources

    from .driver import run

    data = os.path.join(ROOT, "data", "demo")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        log.info("building synthetic shards under %s", data)
        build.build(sources.synthetic_source(1200, 240, 64, 0), data, build.parse_labeled("1/16"), seed=0,
                    withhold_masks=True)  # so the log shows how right the pseudo masks are
    args.config = args.config or os.path.join(ROOT, "configs", "cpu-small.yaml")
    args.data = data
    cfg = _config(args)
    summary = run(cfg, None)
    print(f"GuidedMix demo: val mIoU {100 * summary['miou']:.1f} after {summary['steps']} steps on "
          f"{summary['workers']} CPU DeepSpeed workers ({summary['wall_seconds']:.0f}s)")
    pseudo = summary.get("pseudo_masks", {})
    if "pseudo_accuracy" in pseudo:
        print(f"pseudo masks (last {cfg.train.log_every} steps): {pseudo['pseudo_coverage']:.0%} of unlabeled "
              f"pixels taught, {pseudo['pseudo_accuracy']:.0%} of them right against the withheld masks")
    print(f"summary: {join(cfg.out, 'summary.json')}\npictures: {join(cfg.out, 'overlays')}/, "
          f"{join(cfg.out, 'curves.png')}")
    return 0


def add_commands(sub, add_run_args):
    t = sub.add_parser("train", help="train on a Ray cluster (or a local Ray started for the run)")
    add_run_args(t)
    t.add_argument("--out", help="run folder URL: checkpoints, summary.json, pictures (overrides out)")
    t.add_argument("--workers", type=int, help="training workers (overrides train.workers)")
    t.add_argument("--steps", type=int, help="training steps (overrides train.steps)")
    t.add_argument("--method", choices=["guidedmix", "supervised"], help="overrides train.method")
    t.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")
    t.add_argument("--no-ray", action="store_true",
                   help="train in this process without Ray or DeepSpeed (one worker; for debugging)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="mIoU of a checkpoint on a shard set's val split, as JSON")
    e.add_argument("--checkpoint", required=True, help="run folder or run/checkpoints/step-N URL")
    e.add_argument("--data", required=True, help="shard set URL")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="class-id PNG masks and overlays for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="glob of images (any fsspec URL)")
    p.add_argument("--out", required=True, help="folder URL for the masks and overlays")
    p.set_defaults(func=_predict)

    d = sub.add_parser("demo", help="synthetic shards -> GuidedMix on 2 CPU DeepSpeed workers -> results")
    d.add_argument("--config", help="defaults to configs/cpu-small.yaml")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--steps", type=int)
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(func=_demo)
