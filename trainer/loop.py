"""One worker's training: a `Trainer` built from the config in one place, and the loop that drives it.

The same code runs inside a Ray Train worker (rank/world from Ray, DeepSpeed engine) and in a single process
(`train.engine: plain`, the studies and benchmarks). It resumes from the latest committed checkpoint under
--out whenever there is one: after a worker failure, a node failure or a rerun. Losses stay on the device
between log steps: the host reads them only when it writes a log line.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from shards.errors import BadInput
from shards.manifest import read_manifest
from shards.stream import ShardStream, StreamSpec

from . import evaluate, outputs
from .collectives import all_reduce, average_buffers
from .config import Config
from .engine import build_engine
from .methods import METHODS, build_method
from .metrics import declare_training_series, for_this_process, run_label
from .model import build_model, load_backbone_weights
from .checkpointer import Checkpointer
from .run import RunRecord, SampleLedger, StepLog, run_summary
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


# the training streams a method may read (its `splits`), each a split in an order drawn from the run's seed and
# the stream's salt: unlabeled_mix is a second pass over the unlabeled split in an order of its own, as
# UniMatch's reference reads its CutMix sources through a second loader
STREAMS = {"labeled": ("labeled", 0), "unlabeled": ("unlabeled", 0), "unlabeled_mix": ("unlabeled", 1)}


def split_of(stream: str) -> str:
    return STREAMS.get(stream, (stream, 0))[0]


def stream_spec(cfg: Config, stream: str, ctx: WorkerContext) -> StreamSpec:
    """The data layer's plain values for one stream (a training stream of STREAMS, or val) of this worker, by
    keyword."""
    split, salt = STREAMS.get(stream, (stream, 0))
    d, train = cfg.data, stream != "val"
    seed = int(np.random.SeedSequence([cfg.train.seed, salt]).generate_state(1)[0]) if salt else cfg.train.seed
    return StreamSpec(
        url=d.url, split=split, batch_size=getattr(d, f"{split}_batch_size"),
        global_batch=cfg.global_batch(split) if train else None, seed=seed, rank=ctx.rank,
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
            weights = io.BytesIO(cfg.storage(cfg.model.pretrained).read())
            load_backbone_weights(model, torch.load(weights, map_location="cpu", weights_only=True))
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


def build_model_for(cfg: Config, ctx: WorkerContext, num_classes: int) -> torch.nn.Module:
    """The model as this worker trains it: batch norm synchronised across GPU workers."""
    model = load_model(cfg, num_classes)
    if cfg.model.sync_bn and ctx.world_size > 1:
        if ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.rank == 0:
            log.debug("model.sync_bn: torch syncs batch norm on GPUs only; CPU workers keep per-worker statistics")
    return model


class TrainStreams:
    """This worker's streams of the method's training splits, read a micro-batch of each at a time."""

    def __init__(self, cfg: Config, ctx: WorkerContext, manifest: dict, splits):
        self.cfg, self.manifest = cfg, manifest
        self.streams = {s: ShardStream(stream_spec(cfg, s, ctx), manifest) for s in splits}
        micro_steps = {s: stream.layout.micro_steps for s, stream in self.streams.items()}
        if len(set(micro_steps.values())) > 1:
            raise BadInput(f"data.global_batch: at {ctx.world_size} workers the labeled and unlabeled shares need "
                           f"different numbers of micro-batches ({micro_steps}); scale both batch sizes alike")
        self.layout = self.streams["labeled"].layout
        self.counted_skipped = 0

    def next(self) -> dict:
        return {split: next(stream) for split, stream in self.streams.items()}

    def skipped(self) -> int:
        """Bad samples skipped so far (shards/samples.py)."""
        return sum(s.skipped for s in self.streams.values())

    def newly_skipped(self) -> int:
        """Bad samples skipped since the last call (the first: since the streams' position was restored)."""
        skipped, before = self.skipped(), self.counted_skipped
        self.counted_skipped = skipped
        return skipped - before

    def replay(self, first_step: int) -> ShardStream:
        """The labeled stream from global step `first_step` on, whole global batches as one worker reads them
        (a method's resume reads again what it held of recent steps); the caller closes it."""
        spec = dataclasses.replace(stream_spec(self.cfg, "labeled", WorkerContext()), loader_workers=0)
        stream = ShardStream(spec, self.manifest)
        stream.load_state_dict({"step": first_step})
        return stream

    def state_dict(self) -> dict:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, stream in self.streams.items():
            # a stream the checkpoint lacks (written before its method read it) starts at the checkpoint's step
            stream.load_state_dict(state.get(name, {"step": state["labeled"]["step"]}))


class Trainer:
    """One worker's typed parts, built from the config: streams, model and engine, method, metrics, checkpoint
    store, the run's record and samples, its log step. `resume()`, then `train_step()` until done with `log()`,
    `evaluate()` and `save()` between steps, then `finish()`."""

    def __init__(self, cfg: Config, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx
        self.run = RunRecord()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.manifest = read_manifest(cfg.storage())
        self.classes = self.manifest["classes"]
        splits = METHODS[cfg.train.method].splits
        self.streams = TrainStreams(cfg, ctx, self.manifest, splits)
        self.micro_steps = self.streams.layout.micro_steps
        self.samples = SampleLedger(splits, keys=cfg.train.ledger)
        self.metrics = for_this_process(ctx.in_ray, cfg.train.metrics_port if ctx.rank == 0 else 0,
                                        cfg.train.metrics_host, rank=ctx.rank, run=run_label(cfg.out))
        declare_training_series(self.metrics, cfg, splits)
        self.steplog = StepLog(self.metrics, self.classes, cfg.train.steps,
                               sum(cfg.global_batch(split_of(s)) for s in splits))
        model = build_model_for(cfg, ctx, len(self.classes))
        # before the engine wraps the model: a teacher copies it as it is
        self.method = build_method(cfg, model, ctx, self.metrics, len(self.classes))
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and ctx.device.type == "cuda")
        self.engine = build_engine(model, cfg, ctx.device, bf16, self.streams.layout.micro, self.micro_steps,
                                   rank=ctx.rank, world_size=ctx.world_size)
        self.module = self.engine.module
        self.checkpointer = Checkpointer(cfg, ctx, self.classes, self.engine, self.streams, self.samples, self.method,
                                         self.run)
        self.tracker: Optional[Tracker] = None  # rank 0's, from resume() on
        self.data_wait = 0.0

    def resume(self) -> None:
        """Continue from the latest committed checkpoint, if there is one: weights, optimiser, schedule,
        record, stream position, samples and the method's state, whatever the world size that wrote it."""
        ctx = self.ctx
        before = self.checkpointer.restore(self.streams.replay)
        if before is not None and ctx.rank == 0:
            log.info("resumed from %s at step %d%s", self.run.resumed_from, self.run.step,
                     f", {before} -> {ctx.world_size} workers" if before != ctx.world_size else "")
        self.streams.newly_skipped()  # those of earlier attempts were counted then
        self.steplog.restart(self.run.step)  # rate from here on
        self.metrics.set("step", self.run.step)
        self.metrics.set("checkpoint_last_step", self.run.step)  # the checkpoint resumed from, or 0: none yet
        if self.run.best_miou() is not None:
            self.metrics.set("eval_miou_best", self.run.best_miou())
        self._progress()
        self.tracker = Tracker(self.cfg, self.classes, self.run.step) if ctx.rank == 0 else None
        self.module.train()

    def train_step(self) -> StepOutput:
        """One optimiser step: this rank's share of the global batch, in micro-batches whose gradients
        accumulate; records metrics without reading any value back from the device. Returns the step's losses
        averaged over its micro-batches."""
        self.checkpointer.store.poll()  # a checkpoint that failed in the background ends the run here
        t_step, waited, outs = time.monotonic(), 0.0, []
        for micro in range(self.micro_steps):
            t_data = time.monotonic()
            batches = self.streams.next()
            waited += time.monotonic() - t_data
            # the micro-batch's place in the global batch, the same at any world size
            place = self.ctx.rank * self.micro_steps + micro
            with self.engine.autocast():
                out = self._loss(batches, micro_generator(self.cfg.train.seed, self.run.step, place, self.ctx.device))
            self.engine.micro_step(out.loss)
            outs.append(out)
            self._count(batches)
        self.method.end_step(self.module, self.run.step)
        self.run.step += 1
        self.data_wait = waited
        self.metrics.observe("step_duration_seconds", time.monotonic() - t_step - waited)
        self.metrics.observe("data_wait_seconds", waited)
        self.metrics.set("step", self.run.step)
        self._progress()
        return StepOutput(sum(o.loss.detach() for o in outs) / len(outs),
                          {k: sum(o.parts[k] for o in outs) / len(outs) for k in outs[0].parts})

    def _loss(self, batches: dict[str, dict], generator: torch.Generator) -> StepOutput:
        """One micro-batch's loss by the configured method, from a micro-batch of each of its streams."""
        def on_device(tensor):  # from pinned memory on a GPU: the host does not wait for the copy
            return None if tensor is None else tensor.to(self.ctx.device, non_blocking=True)

        images = {stream: on_device(batch["image"]) for stream, batch in batches.items()}
        out = self.method.loss(self.module, images, on_device(batches["labeled"]["mask"]), self.run.step, generator)
        if out.pseudo is not None:
            self.steplog.pseudo_score.add(out.pseudo.detach(), on_device(batches["unlabeled"].get("withheld_mask")))
        return out

    def _count(self, batches: dict) -> None:
        for split, batch in batches.items():
            self.metrics.inc("samples_total", len(batch["keys"]), split=split)
            self.samples.add(split, batch)
        self.metrics.inc("corrupt_samples_total", self.streams.newly_skipped())

    def _progress(self) -> None:
        self.metrics.set("progress_timestamp_seconds", time.time())

    def log(self, out: StepOutput) -> None:
        """The log step (run.StepLog): a history record, Ray's report, rank 0's line and trackers."""
        record = self.steplog.record(self.run.step, out, self.ctx.world_size, lr=self.engine.lr(),
                                     data_wait_s=self.data_wait, seconds=round(self.run.elapsed(), 3),
                                     **self.method.stats())
        self.run.history.append(record)
        self.ctx.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if self.tracker:
            self.tracker.scalars(self.run.step, record)
            self.steplog.line(self.run.step, record)

    def evaluate(self) -> tuple[float, list[float], list]:
        """Val mIoU with every rank's batch-norm statistics averaged first (the model a checkpoint holds);
        rank 0 also keeps a few overlays."""
        average_buffers(self.module)
        keep, step, history = self.cfg.train.overlays if self.tracker else 0, self.run.step, self.run.history
        with self.engine.autocast():
            miou, per_class, overlays = evaluate_model(self.module, self.cfg, self.ctx, self.manifest, keep,
                                                       on_batch=self._progress)
        if not history or history[-1].get("step") != step or "miou" not in history[-1]:
            history.append({"step": step, "miou": miou})
        self.metrics.set("eval_miou", miou)
        self.metrics.set("eval_miou_best", self.run.best_miou())
        if self.tracker:
            self.tracker.evaluation(step, miou, per_class, overlays)
            log.info("step %d | val mIoU %.4f", step, miou)
        return miou, per_class, overlays

    def save(self) -> None:
        """A checkpoint of every rank: its state handed over as host copies, written and committed in the
        background (see trainer/checkpoint.py); the step goes on."""
        t0 = time.monotonic()
        average_buffers(self.module)
        step = self.run.step

        def committed(seconds):
            self.metrics.observe("checkpoint_duration_seconds", seconds)
            self.metrics.set("checkpoint_last_step", step)
            self._progress()

        self.checkpointer.save(committed)
        if self.tracker:
            self.tracker.sync()
        self.metrics.observe("checkpoint_stall_seconds", time.monotonic() - t0)

    def finish(self) -> Optional[dict]:
        """The final evaluation and, on rank 0, the run's outputs; returns the summary there."""
        cfg, ctx, run = self.cfg, self.ctx, self.run
        miou, per_class, overlays = self.evaluate()  # while the last checkpoint uploads
        self.checkpointer.store.wait()
        consumed, skipped = self.samples.summed(self.streams.skipped(), ctx.device)
        if self.samples.keys is not None:
            outputs.write_json(cfg.storage(cfg.out).at("ledger", f"rank-{ctx.rank}.json"), self.samples.keys)
        self.metrics.close()
        if not self.tracker:
            return None
        self.tracker.close()
        summary = run_summary(cfg, run, dict(zip(self.classes, per_class)), miou, consumed, skipped,
                              ctx.world_size, self.method.stats())
        outputs.write_outputs(cfg.storage(cfg.out), summary, run.history, overlays)
        log.info("done: %d steps, val mIoU %.4f, outputs under %s", run.step, miou, cfg.out)
        return summary


def train(cfg: Config, ctx: WorkerContext) -> Optional[dict]:
    """Train to cfg.train.steps (resuming if a checkpoint exists); returns the summary on rank 0."""
    trainer, every = Trainer(cfg, ctx), cfg.train
    trainer.resume()
    while trainer.run.step < every.steps:
        out = trainer.train_step()
        step, last = trainer.run.step, trainer.run.step == every.steps
        if step % every.log_every == 0 or last:
            trainer.log(out)
        if step % every.eval_every == 0 and not last:  # the last step's evaluation is finish()'s
            trainer.evaluate()
        if step % every.ckpt_every == 0 or last:
            trainer.save()
    return trainer.finish()
