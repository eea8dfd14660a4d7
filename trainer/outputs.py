"""What a run leaves under --out: summary.json, prediction overlays, training curves (rank 0 only)."""
from __future__ import annotations

import io
import json

import matplotlib
import numpy as np
import torch
from PIL import Image

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from shards.augment import MEAN, STD
from shards.storage import Storage

SUMMARY = "summary.json"  # written last: its presence means the run is done

_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                     [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                     [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]], np.uint8)


# class ids past the named colours get fixed random ones; 255 (ignore) is white
_LUT = np.vstack([_PALETTE, np.random.default_rng(0).integers(0, 255, (256 - len(_PALETTE), 3))]).astype(np.uint8)
_LUT[255] = 255


def colorize(mask: np.ndarray) -> np.ndarray:
    return _LUT[mask]


def denormalize(image: torch.Tensor) -> np.ndarray:
    return np.clip(image.float().cpu().numpy().transpose(1, 2, 0) * STD + MEAN, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> Image.Image:
    """[image | image blended with prediction | truth], side by side."""
    blend = (0.5 * image + 0.5 * colorize(pred)).astype(np.uint8)
    panels = [image, blend] + ([colorize(truth)] if truth is not None else [])
    return Image.fromarray(np.concatenate(panels, axis=1))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_json(storage: Storage, data: dict) -> None:
    storage.write(json.dumps(data, indent=1).encode())


def curves_png(history: list[dict]) -> bytes:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [h["step"] for h in history if "sup" in h]
    for part in ("sup", "unsup", "mix"):
        values = [h.get(part) for h in history if "sup" in h]
        if any(v for v in values):
            axes[0].plot(steps, values, label=part)
    axes[0].set_title("losses")
    axes[0].legend()
    axes[1].plot(steps, [h["lr"] for h in history if "sup" in h])
    axes[1].set_title("learning rate")
    evals = [h for h in history if "miou" in h]
    axes[2].plot([h["step"] for h in evals], [h["miou"] for h in evals], marker="o")
    axes[2].set_title("val mIoU")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out: Storage, summary: dict, history: list[dict], overlays: list[Image.Image]) -> None:
    """Every output of a run under `out`, transient storage errors retried as every read and write is."""
    for i, image in enumerate(overlays):
        out.at("overlays", f"val-{i}.png").write(png_bytes(image))
    out.at("curves.png").write(curves_png(history))
    write_json(out.at("history.json"), {"history": history})
    write_json(out.at(SUMMARY), summary)  # last
