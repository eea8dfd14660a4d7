"""One worker's training: a `Trainer` built from the config in one place, and the loop that drives it.

The same code runs inside a Ray Train worker (rank/world from Ray, DeepSpeed engine) and in a single process
(`train.engine: plain`, the studies and benchmarks). It resumes from the latest committed checkpoint under
--out whenever there is one: after a worker failure, a node failure or a rerun. Losses stay on the device
between log steps: the host reads them only when it writes a log line.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import numpy as np
import torch

from shards.errors import BadInput
from shards.manifest import read_manifest
from shards.stream import ShardStream, StreamSpec

from . import checkpoint, evaluate, outputs
from .collectives import all_reduce, average_buffers
from .config import Config
from .engine import build_engine
from .methods import METHODS, build_method
from .metrics import for_this_process, run_label
from .model import build_model, load_backbone_weights
from .ssl import StepOutput
from .tracking import Tracker

log = logging.getLogger("guidedmix.train")


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    in_ray: bool = False  # metrics through Ray's agent, pairing through the service actor
    report: Callable[[dict], None] = lambda metrics: None  # Ray Train's report, or nothing


def stream_spec(cfg: Config, split: str, ctx: WorkerContext) -> StreamSpec:
    """The data layer's plain values for one split of this worker, by keyword."""
    d, train = cfg.data, split != "val"
    return StreamSpec(
        url=d.url, split=split, batch_size=getattr(d, f"{split}_batch_size"),
        global_batch=cfg.global_batch(split) if train else None, seed=cfg.train.seed, rank=ctx.rank,
        world_size=ctx.world_size, loader_workers=d.loader_workers if train else 0,
        crop_size=d.crop_size, scale_min=d.scale_min, scale_max=d.scale_max, flip=d.flip,
        photometric=d.photometric, shuffle_block=d.shuffle_block, sample_run=d.sample_run,
        storage_options=dict(d.storage_options),
        allow_pipe=d.allow_pipe, retries=d.retries, readahead=d.readahead,
        byte_ranges=d.byte_ranges, node_cache=d.node_cache, node_cache_bytes=int(d.node_cache_gb * 2**30),
        pin_memory=train and ctx.device.type == "cuda")


def micro_generator(seed: int, step: int, micro: int, device) -> torch.Generator:
    """The randomness of one micro-batch (pairs, boxes, perturbations), named by its place in the global
    batch: the same whichever rank computes it, at any world size. Layers that draw from torch's global
    generator (dropout) are seeded from the same place: no checkpoint holds that generator, so a resumed run
    or another rank would otherwise drop other units."""
    generator_state, global_state = np.random.SeedSequence([seed, step, micro]).generate_state(2)
    torch.manual_seed(int(global_state))
    return torch.Generator(device=device).manual_seed(int(generator_state))


def load_model(cfg: Config, num_classes: int):
    model = build_model(cfg.model, num_classes, cfg.guidedmix.mitrans.reduction)
    if cfg.model.pretrained:
        try:
            with fsspec.open(cfg.model.pretrained, "rb", **cfg.data.storage_options) as f:
                load_backbone_weights(model, torch.load(f, map_location="cpu", weights_only=True))
        except FileNotFoundError:
            raise BadInput(f"model.pretrained: {cfg.model.pretrained} not found") from None
        except ValueError as e:
            raise BadInput(f"model.pretrained: {e}") from None
    return model


def evaluate_model(module, cfg: Config, ctx: WorkerContext, manifest: dict, keep: int = 0,
                   on_batch: Callable[[], None] = lambda: None) -> tuple[float, list[float], list]:
    """mIoU over the whole val split: each rank its share, confusion matrices all-reduced; `on_batch` after
    each batch (a long evaluation is progress)."""
    num_classes = len(manifest["classes"])
    stream = ShardStream(stream_spec(cfg, "val", ctx), manifest)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    kept = []
    was_training = module.training
    module.eval()
    for i, batch in enumerate(stream):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        images = batch["image"].to(ctx.device)
        probs = evaluate.predict(module, images, num_classes, cfg.eval.mode, cfg.eval.window,
                                 cfg.eval.stride, cfg.eval.flip)
        pred = probs.argmax(1).cpu()
        confusion += evaluate.confusion_matrix(pred, batch["mask"], num_classes)
        for j in range(min(len(batch["keys"]), keep - len(kept))):
            kept.append(outputs.overlay(outputs.denormalize(batch["image"][j]), pred[j].numpy().astype("uint8"),
                                        batch["mask"][j].numpy().astype("uint8")))
        on_batch()
    module.train(was_training)
    confusion = all_reduce(confusion.to(ctx.device)).cpu()  # NCCL reduces GPU tensors only
    miou, per_class = evaluate.iou(confusion)
    return miou, per_class, kept


class _Progress:
    def __init__(self, total: int, start: int, images_per_step: int):
        self.total, self.start, self.images = total, start, images_per_step
        self.t0 = time.monotonic()

    def line(self, step: int, record: dict) -> str:
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        rate = done * self.images / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / max(done, 1)
        losses = " ".join(f"{k} {record[k] + 0.0:.3f}" for k in ("sup", "unsup", "mix") if k in record)  # no -0.000
        pseudo = f"pseudo {record['pseudo_coverage']:.0%} px" if "pseudo_coverage" in record else ""
        if "pseudo_accuracy" in record:
            pseudo += f", {record['pseudo_accuracy']:.0%} right"
        return (f"step {step}/{self.total} | loss {record['loss']:.3f} ({losses}) | "
                f"{pseudo + ' | ' if pseudo else ''}lr {record['lr']:.2e} | {rate:.1f} img/s | "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


class Trainer:
    """Model, engine, method, streams, metrics and checkpoint store of one worker, built from the
    config; `resume()`, then `train_step()` until done with `log()`, `evaluate()` and `save()` between steps,
    then `finish()`."""

    def __init__(self, cfg: Config, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx
        self.started = time.monotonic()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.manifest = read_manifest(cfg.data.url, cfg.data.storage_options, cfg.data.retries)
        self.classes = self.manifest["classes"]
        splits = METHODS[cfg.train.method].splits
        self.streams = {s: ShardStream(stream_spec(cfg, s, ctx), self.manifest) for s in splits}

        model = load_model(cfg, len(self.classes))
        use_gpu = ctx.device.type == "cuda"
        if cfg.model.sync_bn and ctx.world_size > 1:
            if use_gpu:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif ctx.rank == 0:
                log.debug("model.sync_bn: torch syncs batch norm on GPUs only; CPU workers keep per-worker statistics")
        self.metrics = for_this_process(ctx.in_ray, cfg.train.metrics_port if ctx.rank == 0 else 0,
                                        cfg.train.metrics_host, rank=ctx.rank, run=run_label(cfg.out))
        self._declare_metrics(splits)
        # before the engine wraps the model: a teacher copies it as it is
        self.method = build_method(cfg, model, ctx, self.metrics, len(self.classes))
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_gpu)
        micro = self.streams["labeled"].layout
        self.engine = build_engine(model, cfg, ctx.device, bf16, micro.micro, micro.micro_steps, rank=ctx.rank,
                                   world_size=ctx.world_size)
        self.module = self.engine.module
        self.store = checkpoint.CheckpointStore(cfg.out, cfg.data.storage_options, cfg.data.retries)

        self.step, self.history, self.elapsed_before, self.resumed_from = 0, [], 0.0, None
        self.resizes: list[dict] = []  # {step, from, to}: each time the group came back at another size
        self.tracker: Optional[Tracker] = None  # rank 0's, from resume() on
        self.ledger = {s: [] for s in self.streams}
        self.consumed = {s: 0 for s in self.streams}  # samples trained on (a corrupt one's stand-in is not one)
        self.images_per_step = sum(cfg.global_batch(s) for s in self.streams)
        micro_steps = {s: stream.layout.micro_steps for s, stream in self.streams.items()}
        if len(set(micro_steps.values())) > 1:
            raise BadInput(f"data.global_batch: at {ctx.world_size} workers the labeled and unlabeled shares need "
                           f"different numbers of micro-batches ({micro_steps}); scale both batch sizes alike")
        self.micro_steps = micro_steps["labeled"]
        self.pseudo_score = evaluate.PseudoMaskScore(len(self.classes))  # watches for collapse between log lines
        self.counted_skipped = 0
        self.data_wait = 0.0
        self.progress = _Progress(cfg.train.steps, 0, self.images_per_step)

    def _declare_metrics(self, splits) -> None:
        """Every series the run will record, from its start: what the alert rules compare against."""
        m, train = self.metrics, self.cfg.train
        m.set("run_info", 1, config_hash=self.cfg.digest())
        m.set("steps_target", train.steps)
        m.set("checkpoint_every_steps", train.ckpt_every)
        for split in splits:
            m.declare("samples_total", split=split)
        for name in ("corrupt_samples_total", "step_duration_seconds", "data_wait_seconds",
                     "checkpoint_duration_seconds", "checkpoint_stall_seconds"):
            m.declare(name)
        self._progress()

    def _progress(self) -> None:
        self.metrics.set("progress_timestamp_seconds", time.time())

    def elapsed(self) -> float:
        """Training seconds of this run, earlier attempts included."""
        return self.elapsed_before + time.monotonic() - self.started

    def resume(self) -> None:
        """Continue from the latest committed checkpoint, if there is one: weights, optimiser, schedule,
        history, stream position and ledger, whatever the world size that wrote it."""
        self.resumed_from = self.store.latest()
        if self.resumed_from:
            local = self.store.download(self.resumed_from)
            try:
                client = self.engine.load(local)
                states = checkpoint.read_rank_states(local)
                parts = checkpoint.read_parts(local, self.method.parts)
            finally:
                checkpoint.remove_local(local)
            self.step, self.history, self.elapsed_before = client["step"], client["history"], client["elapsed"]
            self.resizes = client.get("resizes", [])
            before = client.get("world_size", len(states))
            if before != self.ctx.world_size:
                self.resizes.append({"step": self.step, "from": before, "to": self.ctx.world_size})
            for name, stream in self.streams.items():  # the global step: the same in every rank's state
                stream.load_state_dict(states[0]["streams"][name])
            self.method.load_state(parts, self.step, self._replay)
            # each rank keeps its own ledger and count; rank 0 takes over those of ranks that are gone
            mine = [self.ctx.rank] + (list(range(self.ctx.world_size, before)) if self.ctx.rank == 0 else [])
            for rank in mine:
                for split, entries in states.get(rank, {}).get("ledger", {}).items():
                    self.ledger[split] += entries
                for split, count in states.get(rank, {}).get("consumed", {}).items():
                    self.consumed[split] += count
            if self.ctx.rank == 0:
                log.info("resumed from %s at step %d%s", self.resumed_from, self.step,
                         f", {before} -> {self.ctx.world_size} workers" if before != self.ctx.world_size else "")
        self.counted_skipped = sum(s.skipped for s in self.streams.values())
        self.progress = _Progress(self.cfg.train.steps, self.step, self.images_per_step)  # rate from here on
        self.metrics.set("step", self.step)
        self.metrics.set("checkpoint_last_step", self.step)  # the checkpoint resumed from, or 0: none yet
        mious = [h["miou"] for h in self.history if "miou" in h]
        if mious:
            self.metrics.set("eval_miou_best", max(mious))
        self._progress()
        self.tracker = Tracker(self.cfg, self.classes, self.step) if self.ctx.rank == 0 else None
        self.module.train()

    def _replay(self, first_step: int) -> ShardStream:
        """The labeled stream from global step `first_step` on, whole global batches as one worker reads them
        (a method's resume reads again what it held of recent steps); the caller closes it."""
        spec = dataclasses.replace(stream_spec(self.cfg, "labeled", WorkerContext()), loader_workers=0)
        stream = ShardStream(spec, self.manifest)
        stream.load_state_dict({"step": first_step})
        return stream

    def train_step(self) -> StepOutput:
        """One optimiser step: this rank's share of the global batch, in micro-batches whose gradients
        accumulate; records metrics without reading any value back from the device. Returns the step's losses
        averaged over its micro-batches."""
        self.store.poll()  # a checkpoint that failed in the background ends the run here
        t_step, waited, outs = time.monotonic(), 0.0, []
        for micro in range(self.micro_steps):
            t_data = time.monotonic()
            batches = {split: next(stream) for split, stream in self.streams.items()}
            waited += time.monotonic() - t_data
            # the micro-batch's place in the global batch, the same at any world size
            place = self.ctx.rank * self.micro_steps + micro
            with self.engine.autocast():
                out = self._loss(batches["labeled"], batches.get("unlabeled"),
                                 micro_generator(self.cfg.train.seed, self.step, place, self.ctx.device))
            self.engine.micro_step(out.loss)
            outs.append(out)
            self._count(batches)
        self.method.end_step(self.module, self.step)
        self.step += 1
        self.data_wait = waited
        self.metrics.observe("step_duration_seconds", time.monotonic() - t_step - waited)
        self.metrics.observe("data_wait_seconds", waited)
        self.metrics.set("step", self.step)
        self._progress()
        return StepOutput(sum(o.loss.detach() for o in outs) / len(outs),
                          {k: sum(o.parts[k] for o in outs) / len(outs) for k in outs[0].parts})

    def _loss(self, batch_l: dict, batch_u: Optional[dict], generator: torch.Generator) -> StepOutput:
        """One micro-batch's loss by the configured method."""
        def on_device(tensor):  # from pinned memory on a GPU: the host does not wait for the copy
            return None if tensor is None else tensor.to(self.ctx.device, non_blocking=True)
        x_u = on_device(batch_u["image"]) if batch_u is not None else None
        out = self.method.loss(self.module, on_device(batch_l["image"]), on_device(batch_l["mask"]), x_u,
                               self.step, generator)
        if out.pseudo is not None:
            self.pseudo_score.add(out.pseudo.detach(), on_device(batch_u.get("withheld_mask")))
        return out

    def _count(self, batches: dict) -> None:
        m = self.metrics
        for split, batch in batches.items():
            m.inc("samples_total", len(batch["keys"]), split=split)
            self.consumed[split] += len(batch["keys"])
            if self.cfg.train.ledger:
                self.ledger[split] += [[batch["epoch"], k] for k in batch["keys"]]
        skipped = sum(s.skipped for s in self.streams.values())
        m.inc("corrupt_samples_total", skipped - self.counted_skipped)
        self.counted_skipped = skipped

    def log(self, out: StepOutput) -> None:
        """The log step: losses read back from the device, a history record, metrics, Ray's report, a line."""
        # the global batch's losses (every rank's mean), comparable between runs at any world size
        names = [k for k, v in out.parts.items() if torch.is_tensor(v)]
        losses = all_reduce(torch.stack([out.loss.detach(), *(out.parts[k] for k in names)]).float())
        losses = losses.cpu() / self.ctx.world_size
        record = {"step": self.step, "loss": float(losses[0]), **{k: float(v) for k, v in out.parts.items()},
                  **{k: float(v) for k, v in zip(names, losses[1:])}, "lr": self.engine.lr(),
                  "data_wait_s": self.data_wait, "seconds": round(self.elapsed(), 3)}
        for name, values in self.method.stats().items():
            record.update({f"{name}_{k}": v for k, v in values.items()})
        record.update(self.pseudo_score.summary())
        self.pseudo_score.reset()
        m = self.metrics
        m.set("learning_rate", record["lr"])
        m.set("loss", record["loss"], part="total")
        for part in ("sup", "unsup", "mix"):
            if part in record:
                m.set("loss", record[part], part=part)
        for name in ("coverage", "accuracy"):
            if f"pseudo_{name}" in record:
                m.set(f"pseudo_mask_{name}", record[f"pseudo_{name}"])
        if record.get("pseudo_coverage"):  # shares of nothing claimed are no shares
            for key, metric in (("pseudo_class_freq", "pseudo_class_share"), ("true_class_freq", "true_class_share")):
                for name, share in zip(self.classes, record.get(key, ())):
                    m.set(metric, share, **{"class": name})
        self.history.append(record)
        self.ctx.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if self.tracker:
            self.tracker.scalars(self.step, record)
            log.info(self.progress.line(self.step, record))

    def evaluate(self) -> tuple[float, list[float], list]:
        """Val mIoU with every rank's batch-norm statistics averaged first (the model a checkpoint holds);
        rank 0 also keeps a few overlays."""
        average_buffers(self.module)
        keep = self.cfg.train.overlays if self.tracker else 0
        with self.engine.autocast():
            miou, per_class, overlays = evaluate_model(self.module, self.cfg, self.ctx, self.manifest, keep,
                                                       on_batch=self._progress)
        if not self.history or self.history[-1].get("step") != self.step or "miou" not in self.history[-1]:
            self.history.append({"step": self.step, "miou": miou})
        self.metrics.set("eval_miou", miou)
        self.metrics.set("eval_miou_best", max(h["miou"] for h in self.history if "miou" in h))
        if self.tracker:
            self.tracker.evaluation(self.step, miou, per_class, overlays)
            log.info("step %d | val mIoU %.4f", self.step, miou)
        return miou, per_class, overlays

    def save(self) -> None:
        """A checkpoint of every rank: its state handed over as host copies, written and committed in the
        background (see trainer/checkpoint.py); the step goes on."""
        t0 = time.monotonic()
        average_buffers(self.module)
        step = self.step

        def write_files(snapshot):
            self.engine.save(snapshot, {"step": step, "history": self.history, "elapsed": self.elapsed(),
                                        "world_size": self.ctx.world_size, "resizes": self.resizes})
            rank_state = {"streams": {n: s.state_dict() for n, s in self.streams.items()},
                          "consumed": dict(self.consumed)}
            if self.cfg.train.ledger:
                rank_state["ledger"] = self.ledger
            checkpoint.write_rank_state(snapshot.folder, self.ctx.rank, rank_state)
            if self.ctx.rank == 0:
                checkpoint.write_run_config(snapshot.folder, self.cfg, self.classes)
                for name, part in self.method.state().items():  # the same on every rank
                    snapshot.save(part, checkpoint.part_file(name))

        def committed(seconds):
            self.metrics.observe("checkpoint_duration_seconds", seconds)
            self.metrics.set("checkpoint_last_step", step)
            self._progress()

        self.store.save(checkpoint.step_name(step), self.ctx.rank, self.ctx.world_size, write_files, committed)
        if self.tracker:
            self.tracker.sync()
        self.metrics.observe("checkpoint_stall_seconds", time.monotonic() - t0)

    def finish(self) -> Optional[dict]:
        """The final evaluation and, on rank 0, the run's outputs; returns the summary there."""
        cfg, ctx = self.cfg, self.ctx
        miou, per_class, overlays = self.evaluate()  # while the last checkpoint uploads
        self.store.wait()
        splits = list(self.consumed)
        counts = all_reduce(torch.tensor([sum(s.skipped for s in self.streams.values()),
                                          *(self.consumed[s] for s in splits)], device=ctx.device))
        skipped, consumed = int(counts[0]), dict(zip(splits, counts[1:].tolist()))
        if cfg.train.ledger:
            outputs.write_json(f"{cfg.out.rstrip('/')}/ledger/rank-{ctx.rank}.json", self.ledger,
                               cfg.data.storage_options, cfg.data.retries)
        self.metrics.close()
        if not self.tracker:
            return None
        self.tracker.close()
        summary = {
            "method": cfg.train.method, "miou": miou, "per_class_iou": dict(zip(self.classes, per_class)),
            "steps": self.step, "samples_seen": sum(consumed.values()), "samples_by_split": consumed,
            "skipped_samples": skipped, "wall_seconds": round(self.elapsed(), 2),
            "workers": ctx.world_size, "resizes": self.resizes, "engine": cfg.train.engine,
            "resumed_from": self.resumed_from,
            "config_hash": cfg.digest(), "config": cfg.public_dict(),
        }
        summary.update(self.method.stats())  # rank 0's view since its last (re)start
        last_log = [h for h in self.history if "pseudo_coverage" in h]
        if last_log:  # rank 0's pseudo masks over the last log interval
            summary["pseudo_masks"] = {k: v for k, v in last_log[-1].items() if "pseudo" in k or k == "true_class_freq"}
        outputs.write_outputs(cfg.out, summary, self.history, overlays, cfg.data.storage_options, cfg.data.retries)
        log.info("done: %d steps, val mIoU %.4f, outputs under %s", self.step, miou, cfg.out)
        return summary


def train(cfg: Config, ctx: WorkerContext) -> Optional[dict]:
    """Train to cfg.train.steps (resuming if a checkpoint exists); returns the summary on rank 0."""
    trainer, every = Trainer(cfg, ctx), cfg.train
    trainer.resume()
    while trainer.step < every.steps:
        out = trainer.train_step()
        step, last = trainer.step, trainer.step == every.steps
        if step % every.log_every == 0 or last:
            trainer.log(out)
        if step % every.eval_every == 0 and not last:  # the last step's evaluation is finish()'s
            trainer.evaluate()
        if step % every.ckpt_every == 0 or last:
            trainer.save()
    return trainer.finish()
