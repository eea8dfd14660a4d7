"""Run commands of the CLI: train, eval, predict, demo."""
from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from shards import build, sources
from shards.augment import to_tensor
from shards.errors import BadInput
from shards.manifest import read_manifest
from shards.storage import check_url, join
from trainer import evaluate, outputs
from trainer.checkpoint import load_trained
from trainer.config import Config, apply_overrides, load_config
from trainer.loop import WorkerContext, evaluate_model, train

from . import console, driver

log = logging.getLogger("guidedmix")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_set_arg(parser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set guidedmix.tau=0.95 (repeatable)")


def add_config_args(parser, reads_storage_only: bool = False) -> None:
    what = ("a run config whose data.storage_options and data.retries reach every read" if reads_storage_only
            else "YAML run config (see configs/)")
    parser.add_argument("--config", help=what)
    add_set_arg(parser)


def storage_config(args) -> Config:
    """The config of a command that reads storage (eval, predict, shards inspect): its `data.storage_options`
    and `data.retries` reach every read, as in training."""
    return load_config(args.config, args.overrides)


def _config(args, extra: list[str] = ()):
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


def _on_ray(cfg: Config, args) -> dict:
    """driver.run behind the quiet console (launch/console.py)."""
    with console.quiet(cfg.storage(cfg.out), args.verbose):
        return driver.run(cfg, getattr(args, "address", None))


def _local_device(cfg: Config) -> torch.device:
    """train --no-ray: this machine's GPU where it has one, as a Ray worker would get it (`train.use_gpu`)."""
    use_gpu = cfg.train.use_gpu
    if use_gpu and not torch.cuda.is_available():
        raise BadInput("train.use_gpu: true, but this machine has no CUDA device")
    return torch.device("cuda" if use_gpu or (use_gpu is None and torch.cuda.is_available()) else "cpu")


def _train(args) -> int:
    if args.no_ray:  # one process, plain PyTorch: debugging and small studies (metrics on train.metrics_port)
        cfg = _config(args, ["train.engine=plain", "train.workers=1"])
        summary = train(cfg, WorkerContext(device=_local_device(cfg)))
    else:
        summary = _on_ray(_config(args), args)
    print(json.dumps({k: summary[k] for k in ("method", "miou", "steps", "samples_seen", "wall_seconds")}))
    return 0


def _eval(args) -> int:
    check_url(args.data)
    storage = storage_config(args)
    cfg, classes, model = load_trained(storage.storage(args.checkpoint))
    raw = apply_overrides(cfg.model_dump(), args.overrides)
    raw["data"].update(url=args.data, storage_options=storage.data.storage_options, retries=storage.data.retries)
    cfg = Config.model_validate(raw)
    manifest = read_manifest(cfg.storage())
    if manifest["classes"] != classes:
        raise BadInput(f"--data {args.data}: its classes differ from the checkpoint's")
    miou, per_class, _ = evaluate_model(model, cfg, WorkerContext(), manifest)
    print(json.dumps({"miou": miou, "per_class_iou": dict(zip(classes, per_class))}))
    return 0


def _predict(args) -> int:
    check_url(args.images)
    check_url(args.out)
    storage = storage_config(args)
    cfg, classes, model = load_trained(storage.storage(args.checkpoint))
    fs, pattern = storage.storage(args.images).filesystem()
    paths = sorted(fs.glob(pattern))
    if not paths:
        raise BadInput(f"--images {args.images}: matches no file")
    for path in paths:
        try:
            image = np.asarray(Image.open(io.BytesIO(fs.cat_file(path))).convert("RGB"))
        except Exception:  # anything PIL cannot read is the user's file, not our fault
            raise BadInput(f"{path}: unreadable image") from None
        probs = evaluate.predict(model, to_tensor(image)[None], len(classes), cfg.eval.mode, cfg.eval.window,
                                 cfg.eval.stride, cfg.eval.flip)
        pred = probs.argmax(1)[0].numpy().astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        out = storage.storage(args.out)
        out.at(f"{stem}.png").write(outputs.png_bytes(Image.fromarray(pred)))
        out.at(f"{stem}-overlay.png").write(outputs.png_bytes(outputs.overlay(image, pred)))
    print(json.dumps({"images": len(paths), "out": args.out}))
    return 0


def _demo(args) -> int:
    data = os.path.join(ROOT, "data", "demo")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        log.info("building synthetic shards under %s", data)
        build.build(sources.synthetic_source(1200, 240, 64, 0), data, build.parse_labeled("1/16"), seed=0,
                    withhold_masks=True)  # so the log shows how right the pseudo masks are
    args.config = args.config or os.path.join(ROOT, "configs", "cpu-small.yaml")
    args.data = data
    cfg = _config(args)
    summary = _on_ray(cfg, args)
    print(f"GuidedMix demo: val mIoU {100 * summary['miou']:.1f} after {summary['steps']} steps on "
          f"{summary['workers']} CPU DeepSpeed workers ({summary['wall_seconds']:.0f}s)")
    pseudo = summary.get("pseudo_masks", {})
    if "pseudo_accuracy" in pseudo:
        print(f"pseudo masks (last {min(cfg.train.log_every, summary['steps'])} steps): {pseudo['pseudo_coverage']:.0%} of unlabeled "
              f"pixels taught, {pseudo['pseudo_accuracy']:.0%} of them right against the withheld masks")
    print(f"summary: {join(cfg.out, outputs.SUMMARY)}\npictures: {join(cfg.out, 'overlays')}/, "
          f"{join(cfg.out, 'curves.png')}")
    return 0


def add_commands(sub):
    t = sub.add_parser("train", help="train on a Ray cluster (or a local Ray started for the run)")
    add_config_args(t)
    t.add_argument("--data", help="shard set URL (overrides data.url)")
    t.add_argument("--out", help="run folder URL: checkpoints, summary.json, pictures (overrides out)")
    t.add_argument("--workers", help="training workers, N or MIN:MAX (elastic; overrides train.workers)")
    t.add_argument("--steps", type=int, help="training steps (overrides train.steps)")
    t.add_argument("--method", choices=["guidedmix", "unimatch", "supervised"], help="overrides train.method")
    t.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")
    t.add_argument("--no-ray", action="store_true",
                   help="train in this process without Ray or DeepSpeed (one worker; for debugging)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="mIoU of a checkpoint on a shard set's val split, as JSON")
    e.add_argument("--checkpoint", required=True, help="run folder or run/checkpoints/step-N URL")
    e.add_argument("--data", required=True, help="shard set URL")
    add_config_args(e, reads_storage_only=True)
    e.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="class-id PNG masks and overlays for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="glob of images (any fsspec URL)")
    p.add_argument("--out", required=True, help="folder URL for the masks and overlays")
    add_config_args(p, reads_storage_only=True)
    p.set_defaults(func=_predict)

    d = sub.add_parser("demo", help="synthetic shards -> GuidedMix on 2 CPU DeepSpeed workers -> results")
    d.add_argument("--config", help="defaults to configs/cpu-small.yaml")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--steps", type=int)
    add_set_arg(d)
    d.set_defaults(func=_demo)
