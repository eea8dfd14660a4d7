"""Pretrain a backbone for the studies on data disjoint from every study set: exemplar classes cut from
histology, retina, MRI, terrain and photographs (shards/exemplars.py). The field never segments from random
weights; this is the CPU studies' stand-in for ImageNet. Two tasks:
- `classify` (the default): the backbone plus a linear classifier tell the classes' views apart;
- `segment`: the whole segmenter (configs/cpu-small.yaml's head) labels every pixel of scenes laid out as the
  study sets lay theirs, views of one class over another's (exemplar_scene), with its exemplar class.
Writes a torchvision-format state dict of the backbone (`classify` adds its classifier as `fc.*`, which
`model.pretrained` drops) to data/pretrained/<backbone>-<key>.pt, the key hashing the code and the
arguments: a second call with the same ones returns the file at once. Prints JSON on its last line
(the path, held-out views' or held-out scene pixels' accuracy, seconds).

    OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain_backbone.py [--task classify] [--backbone tiny]
        [--classes 512 (segment: 64)] [--views 100] [--size 64] [--steps 6000] [--batch 64 (segment: 16)]
        [--output-stride 8] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import ROOT, publish  # noqa: E402
from shards.augment import to_tensor  # noqa: E402
from shards.exemplars import exemplar_scene, exemplar_set  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model import BACKBONES, ResNet, build_model  # noqa: E402

HELD_OUT_VIEWS = 2  # per class, never trained on: the accuracy the record reports
WARM_UP = 0.05  # of the steps, the one-cycle schedule's rise
MIN_STEPS = int(1 / WARM_UP) + 1  # fewer and the rise is under a step: OneCycleLR divides by zero
SEGMENTER = "configs/cpu-small.yaml"  # the head the studies train, so pretraining shapes the backbone for it
CODE = ("shards/exemplars.py", "shards/augment.py", "trainer/model.py", "shards/textures.py", "bench/pretrain_backbone.py",
        SEGMENTER)


def parser() -> argparse.ArgumentParser:
    # named, as `bench/ssl_suite.py --pretrained=ARGS` parses through it too and its errors should say whose
    p = argparse.ArgumentParser(prog="pretrain_backbone.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="classify", choices=["classify", "segment"])
    p.add_argument("--backbone", default="tiny", choices=sorted(BACKBONES))
    # segment: a 512-way map at every pixel of a 64-image batch is 0.5 GB of logits; 64 classes cost a tenth
    p.add_argument("--classes", type=int, default=None, help="exemplar classes (classify: 512, segment: 64)")
    # many views, each seen a few times: with 20 the backbone learnt the views by heart (train loss 0.13,
    # held-out views 38% right) and started the segmenter worse than random weights on textures 1/16
    p.add_argument("--views", type=int, default=100, help="samples per class, the held-out ones included")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=None, help="images a step (classify: 64, segment: 16)")
    # 8: configs/cpu-small.yaml's, so the segmenter's dilated stages see the strides they were trained with
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    return p


def weights_path(args) -> str:
    digest = hashlib.sha256(repr(sorted(vars(args).items())).encode())
    for name in CODE:
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    return os.path.join(ROOT, "data", "pretrained", f"{args.backbone}-{digest.hexdigest()[:12]}.pt")


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments, or a one-line usage error (exit 2) naming the one that cannot work."""
    p = parser()
    args = p.parse_args(argv)
    segment = args.task == "segment"
    args.classes = args.classes if args.classes is not None else 64 if segment else 512
    args.batch = args.batch if args.batch is not None else 16 if segment else 64
    for name, value, low in (("--classes", args.classes, 1), ("--views", args.views, HELD_OUT_VIEWS + 1),
                             ("--size", args.size, 8), ("--steps", args.steps, MIN_STEPS), ("--batch", args.batch, 1)):
        if value < low:
            p.error(f"{name} must be at least {low} (got {value})")
    if args.batch > args.classes * (args.views - HELD_OUT_VIEWS):
        p.error(f"--batch {args.batch} is more than the {args.classes * (args.views - HELD_OUT_VIEWS)} training views")
    return args


def pretrained_backbone(argv: list[str] = ()) -> str:
    """The weights of these arguments, pretrained here first if no file holds them yet (one thread)."""
    args = parse(list(argv))
    path = weights_path(args)
    if not os.path.exists(path):
        pretrain(args, path)
    return path


def segmenter_config(args):
    """The studies' model section with this pretraining's backbone and output stride."""
    model = load_config(os.path.join(ROOT, SEGMENTER)).model
    return model.model_copy(update={"backbone": args.backbone, "output_stride": args.output_stride})


class Classifier(nn.Module):
    def __init__(self, backbone: str, classes: int, output_stride: int):
        super().__init__()
        self.backbone = ResNet(backbone, output_stride)
        self.fc = nn.Linear(self.backbone.high_channels, classes)

    def forward(self, x):
        return self.fc(self.backbone(x)[1].mean(dim=(2, 3)))


def split_views(args) -> dict:
    """The exemplar set's views, split: the last HELD_OUT_VIEWS of each class are never trained on."""
    images, labels = exemplar_set(args.classes, args.views, args.size, args.seed)
    held_out = (np.arange(len(labels)) % args.views) >= args.views - HELD_OUT_VIEWS
    return {"train": (images[~held_out], labels[~held_out]), "held_out": (images[held_out], labels[held_out])}


def tensors(images, targets):  # normalised as the segmenter's loader normalises
    return torch.stack([to_tensor(image) for image in images]), torch.from_numpy(np.asarray(targets))


def classify_batch(views, count, rng):
    index = rng.choice(len(views[1]), count, replace=False)
    return tensors(views[0][index], views[1][index])


def scene_batch(views, count, rng):
    scenes = [exemplar_scene(*views, rng) for _ in range(count)]
    return tensors([image for image, _ in scenes], [mask for _, mask in scenes])


def pretrain(args, path: str) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    views = split_views(args)
    if args.task == "segment":  # the CPU studies' segmenter, its classifier over exemplar classes
        model, batch = build_model(segmenter_config(args), args.classes), scene_batch
        scene_rng = np.random.default_rng(args.seed + 1)  # the same held-out scenes whatever was trained
        held_out = [scene_batch(views["held_out"], 16, scene_rng) for _ in range(16)]
    else:
        model, batch = Classifier(args.backbone, args.classes, args.output_stride), classify_batch
        held_out = [tensors(*views["held_out"])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=WARM_UP)
    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(views["train"], args.batch, rng)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps:
            rate = step / (time.time() - start)
            print(f"pretrain step {step}/{args.steps} loss {loss.item():.3f} {rate:.1f} steps/s "
                  f"ETA {(args.steps - step) / rate:.0f} s", file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():  # held-out views (classify) or held-out scenes' pixels (segment) labelled right
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in held_out)
        total = sum(y.numel() for _, y in held_out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = model.backbone.state_dict()
    if args.task == "classify":
        state.update({f"fc.{k}": v for k, v in model.fc.state_dict().items()})
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a killed run leaves no half file that a later call would trust
    return {"task": args.task, "weights": os.path.relpath(path, ROOT), "held_out_accuracy": round(correct / total, 4),
            "chance": round(1 / args.classes, 4), "seconds": round(time.time() - start, 1)}


def main():
    args = parse(sys.argv[1:])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = weights_path(args)
    if os.path.exists(path):
        print(f"weights already made: {os.path.relpath(path, ROOT)}", file=sys.stderr)
        return
    publish(pretrain(args, path))


if __name__ == "__main__":
    main()
