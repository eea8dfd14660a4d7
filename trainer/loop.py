"""The per-worker training loop: streams -> model -> engine -> GuidedMix steps, eval, checkpoints.

The same function runs inside a Ray Train worker (rank/world from Ray, DeepSpeed engine) and in a single
process (`train.engine: plain`, used by the studies and benchmarks). It resumes from the latest committed
checkpoint under --out whenever there is one: after a worker failure, a node failure or a rerun.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import torch
import torch.distributed as dist

from shards import BadInput, ShardStream, StreamSpec
from shards.manifest import read_manifest

from . import checkpoint, evaluate, guidedmix, outputs, pairing
from .metrics import for_this_process
from .config import Config
from .engine import DeepSpeedEngine, PlainEngine
from .model import build_model, load_backbone_weights

log = logging.getLogger("guidedmix.train")


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict], None] = lambda metrics: None  # Ray Train's report, or nothing


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def average_buffers(module) -> None:
    """Average batch-norm running statistics across ranks, so every rank (and the checkpoint, which holds
    rank 0's copy) carries the same model. SyncBN keeps them equal on GPU; on CPU they drift apart."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


def stream_spec(cfg: Config, split: str, ctx: WorkerContext, batch_size: int) -> StreamSpec:
    d = cfg.data
    return StreamSpec(d.url, split, batch_size, cfg.train.seed, ctx.rank, ctx.world_size,
                      d.loader_workers if split != "val" else 0, d.crop_size, d.scale_min, d.scale_max,
                      d.flip, d.photometric, d.shuffle_buffer, dict(d.storage_options), d.allow_pipe, d.retries)


def load_model(cfg: Config, num_classes: int):
    model = build_model(cfg.model, num_classes, cfg.guidedmix.mitrans.reduction)
    if cfg.model.pretrained:
        try:
            with fsspec.open(cfg.model.pretrained, "rb") as f:
                load_backbone_weights(model, torch.load(f, map_location="cpu", weights_only=True))
        except FileNotFoundError:
            raise BadInput(f"model.pretrained: {cfg.model.pretrained} not found") from None
        except ValueError as e:
            raise BadInput(f"model.pretrained: {e}") from None
    return model


def evaluate_model(module, cfg: Config, ctx: WorkerContext, manifest: dict, dtype,
                   keep: int = 0) -> tuple[float, list[float], list]:
    """mIoU over the whole val split: each rank its share, confusion matrices all-reduced."""
    num_classes = len(manifest["classes"])
    stream = ShardStream(stream_spec(cfg, "val", ctx, cfg.data.val_batch_size), manifest)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    kept = []
    was_training = module.training
    module.eval()
    for i, batch in enumerate(stream):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        images = batch["image"].to(ctx.device, dtype)
        probs = evaluate.predict(module, images, num_classes, cfg.eval.mode, cfg.eval.window,
                                 cfg.eval.stride, cfg.eval.flip)
        pred = probs.argmax(1).cpu()
        confusion += evaluate.confusion_matrix(pred, batch["mask"], num_classes)
        for j in range(len(batch["keys"])):
            if len(kept) < keep:
                kept.append(outputs.overlay(outputs.denormalize(batch["image"][j]), pred[j].numpy().astype("uint8"),
                                            batch["mask"][j].numpy().astype("uint8")))
    module.train(was_training)
    _all_reduce(confusion)
    miou, per_class = evaluate.iou(confusion)
    return miou, per_class, kept


class _Progress:
    def __init__(self, total: int, start: int, images_per_step: int):
        self.total, self.start, self.images = total, start, images_per_step
        self.t0 = time.monotonic()

    def line(self, step: int, parts: dict, lr: float) -> str:
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        rate = done * self.images / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / max(done, 1)
        losses = " ".join(f"{k} {parts[k]:.3f}" for k in ("sup", "unsup", "mix") if k in parts)
        pseudo = f"pseudo {parts['pseudo_coverage']:.0%} px" if "pseudo_coverage" in parts else ""
        if "pseudo_accuracy" in parts:
            pseudo += f", {parts['pseudo_accuracy']:.0%} right"
        return (f"step {step}/{self.total} | loss {parts['loss']:.3f} ({losses}) | {pseudo + ' | ' if pseudo else ''}"
                f"lr {lr:.2e} | {rate:.1f} img/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def record_step(metrics, out, seconds: float, data_wait: float, lr: float, batch_l, batch_u) -> None:
    metrics.observe("step_duration_seconds", seconds)
    metrics.observe("data_wait_seconds", data_wait)
    metrics.set("learning_rate", lr)
    metrics.set("loss", out.loss.item(), part="total")
    for part in ("sup", "unsup", "mix"):
        if part in out.parts:
            metrics.set("loss", out.parts[part], part=part)
    for split, batch in (("labeled", batch_l), ("unlabeled", batch_u)):
        if batch is not None:
            metrics.inc("samples_total", len(batch["keys"]), split=split)


def train(cfg: Config, ctx: WorkerContext) -> Optional[dict]:
    """Train to cfg.train.steps (resuming if a checkpoint exists); returns the summary on rank 0."""
    started = time.monotonic()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    manifest = read_manifest(cfg.data.url, cfg.data.storage_options, cfg.data.retries)
    classes = manifest["classes"]
    gm = cfg.guidedmix
    semi = cfg.train.method == "guidedmix"
    labeled = ShardStream(stream_spec(cfg, "labeled", ctx, cfg.data.labeled_batch_size), manifest)
    unlabeled = ShardStream(stream_spec(cfg, "unlabeled", ctx, cfg.data.unlabeled_batch_size), manifest) if semi else None
    streams = {"labeled": labeled, **({"unlabeled": unlabeled} if semi else {})}

    model = load_model(cfg, len(classes))
    use_gpu = ctx.device.type == "cuda"
    if cfg.model.sync_bn and ctx.world_size > 1:
        if use_gpu:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.rank == 0:
            log.info("model.sync_bn: torch syncs batch norm on GPUs only; CPU workers keep per-worker statistics")
    teacher = copy.deepcopy(model).to(ctx.device).eval() if semi and gm.teacher == "ema" else None
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_gpu)
    if cfg.train.engine == "deepspeed":
        engine = DeepSpeedEngine(model, cfg, ctx.device, bf16)
    else:
        engine = PlainEngine(model, cfg, ctx.device)
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank)
    metrics = for_this_process(cfg.train.metrics_port if ctx.rank == 0 else 0, cfg.train.metrics_host, rank=ctx.rank)
    metrics.set("run_info", 1, run=cfg.out.rstrip("/").rsplit("/", 1)[-1], config_hash=cfg.digest())
    service = None
    if semi and gm.pairing.mode == "service":
        service = pairing.PairingClient(gm.pairing, cfg.out, ctx.rank, cfg.train.seed, metrics)

    store = checkpoint.CheckpointStore(cfg.out, cfg.data.storage_options, retries=cfg.data.retries)
    step, history, ledger, elapsed_before = 0, [], {s: [] for s in streams}, 0.0
    resumed_from = store.latest()
    if resumed_from:
        local = store.download(resumed_from)
        try:
            client = engine.load(local)
            state = checkpoint.read_rank_state(local, ctx.rank)
            if teacher is not None:
                teacher.load_state_dict(torch.load(f"{local}/teacher.pt", weights_only=True))
        finally:
            checkpoint.remove_local(local)
        step, history, elapsed_before = client["step"], client["history"], client["elapsed"]
        for name, stream in streams.items():
            stream.load_state_dict(state["streams"][name])
        ledger = state.get("ledger", ledger)
        if ctx.rank == 0:
            log.info("resumed from %s at step %d", resumed_from, step)

    def save_checkpoint():
        t0 = time.monotonic()
        average_buffers(module)

        def write_files(local):
            engine.save(local, {"step": step, "history": history,
                                "elapsed": elapsed_before + time.monotonic() - started})
            rank_state = {"streams": {n: s.state_dict() for n, s in streams.items()}}
            if cfg.train.ledger:
                rank_state["ledger"] = ledger
            checkpoint.write_rank_state(local, ctx.rank, rank_state)
            if ctx.rank == 0:
                outputs.write_json(f"{local}/config.json", {"config": cfg.public_dict(drop_secrets=True),
                                                            "classes": classes})
                if teacher is not None:
                    torch.save(teacher.state_dict(), f"{local}/teacher.pt")

        store.save(checkpoint.step_name(step), ctx.rank, write_files)
        metrics.observe("checkpoint_duration_seconds", time.monotonic() - t0)
        metrics.set("checkpoint_last_step", step)

    images_per_step = ctx.world_size * (cfg.data.labeled_batch_size + (cfg.data.unlabeled_batch_size if semi else 0))
    progress = _Progress(cfg.train.steps, step, images_per_step)
    pseudo_score = evaluate.PseudoMaskScore(len(classes))  # watches for collapse between log lines
    module = engine.module
    module.train()
    counted_skipped = sum(s.skipped for s in streams.values())
    while step < cfg.train.steps:
        t_data = time.monotonic()
        batch_l = next(labeled)
        batch_u = next(unlabeled) if semi else None
        t_step = time.monotonic()
        data_wait = t_step - t_data
        x_l = batch_l["image"].to(ctx.device, engine.dtype)
        y_l = batch_l["mask"].to(ctx.device)
        if semi:
            x_u = batch_u["image"].to(ctx.device, engine.dtype)
            find = functools.partial(service.query, step=step, device=ctx.device, dtype=engine.dtype) if service else None
            out = guidedmix.guidedmix_loss(module, x_l, y_l, x_u, step, gm, len(classes), teacher, find, generator)
            if service is not None:
                service.push(out.labeled_embeddings, x_l, y_l, step)
        else:
            out = guidedmix.supervised_loss(module, x_l, y_l)
        if out.pseudo is not None:
            pseudo_score.add(out.pseudo.detach(), batch_u.get("withheld_mask"))
        engine.step(out.loss)
        if teacher is not None:
            guidedmix.ema_update(teacher, module, gm.ema_decay)
        step += 1
        record_step(metrics, out, time.monotonic() - t_step, data_wait, engine.lr(), batch_l, batch_u)
        skipped = sum(s.skipped for s in streams.values())
        metrics.inc("corrupt_samples_total", skipped - counted_skipped)
        counted_skipped = skipped
        if cfg.train.ledger:
            for name, batch in (("labeled", batch_l), ("unlabeled", batch_u)):
                if batch is not None:
                    ledger[name] += [[batch["epoch"], k] for k in batch["keys"]]
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = {"step": step, "loss": out.loss.item(), **out.parts, "lr": engine.lr(), "data_wait_s": data_wait,
                      "seconds": round(elapsed_before + time.monotonic() - started, 3)}
            if service is not None:
                record.update({f"pairing_{k}": v for k, v in service.stats().items()})
            record.update(pseudo_score.summary())
            pseudo_score.reset()
            for name in ("coverage", "accuracy"):
                if f"pseudo_{name}" in record:
                    metrics.set(f"pseudo_mask_{name}", record[f"pseudo_{name}"])
            history.append(record)
            ctx.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
            if ctx.rank == 0:
                log.info(progress.line(step, record, engine.lr()))
        if step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            average_buffers(module)
            miou, _, _ = evaluate_model(module, cfg, ctx, manifest, engine.dtype)
            history.append({"step": step, "miou": miou})
            metrics.set("eval_miou", miou)
            if ctx.rank == 0:
                log.info("step %d | val mIoU %.4f", step, miou)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            save_checkpoint()

    miou, per_class, overlays = evaluate_model(module, cfg, ctx, manifest, engine.dtype,
                                               keep=cfg.train.overlays if ctx.rank == 0 else 0)
    metrics.set("eval_miou", miou)
    skipped = _all_reduce(torch.tensor([sum(s.skipped for s in streams.values())]))
    if cfg.train.ledger:
        outputs.write_json(f"{cfg.out.rstrip('/')}/ledger/rank-{ctx.rank}.json", ledger, cfg.data.storage_options)
    metrics.close()
    if ctx.rank != 0:
        return None
    if not history or "miou" not in history[-1] or history[-1]["step"] != step:
        history.append({"step": step, "miou": miou})
    summary = {
        "method": cfg.train.method, "miou": miou,
        "per_class_iou": dict(zip(classes, per_class)), "steps": step,
        "samples_seen": step * images_per_step, "skipped_samples": int(skipped.item()),
        "wall_seconds": round(elapsed_before + time.monotonic() - started, 2),
        "workers": ctx.world_size, "engine": cfg.train.engine, "resumed_from": resumed_from,
        "config_hash": cfg.digest(), "config": cfg.public_dict(),
    }
    if service is not None:  # rank 0's view since its last (re)start
        summary["pairing"] = service.stats()
    last_log = [h for h in history if "pseudo_coverage" in h]
    if last_log:  # rank 0's pseudo masks over the last log interval
        summary["pseudo_masks"] = {k: v for k, v in last_log[-1].items() if "pseudo" in k or k == "true_class_freq"}
    outputs.write_outputs(cfg.out, summary, history, overlays, cfg.data.storage_options)
    log.info("done: %d steps, val mIoU %.4f, outputs under %s", step, miou, cfg.out)
    return summary
