"""The optimisation engine behind the loop: DeepSpeed (ZeRO 0-3) or plain PyTorch for one process. Both take
the same SGD/AdamW with poly decay and expose the same small interface; `save` hands a checkpoint their state
and `load` takes it back, in the files that trainer/checkpoint.py names.

bf16 is mixed precision in both: fp32 weights and optimiser, the forward under `torch.autocast` (`autocast()`),
which runs convolutions and matrix products in bf16 and keeps batch norm, softmax and reductions in fp32.
DeepSpeed's own `bf16` mode casts the whole model and keeps fp32 master copies beside it: a copy of every
weight and gradient each step, twice the step of its fp32 one (bench/step_cost.py)."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from shards.errors import BadInput

from .checkpoint import ENGINE_FOLDER, PLAIN_FILE, PORTABLE_FILE, zero_world


def build_optimizer(model, cfg_optim):
    groups = [{"params": g["params"], "lr": cfg_optim.lr * g["lr_mult"]}
              for g in model.param_groups(cfg_optim.head_lr_mult)]
    if cfg_optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg_optim.lr, momentum=cfg_optim.momentum,
                               weight_decay=cfg_optim.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg_optim.lr, weight_decay=cfg_optim.weight_decay)


def poly_schedule(optimizer, total_steps: int, power: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps) ** power)


def build_engine(model, cfg, device, bf16: bool, micro_batch: int, micro_steps: int, *, rank: int = 0,
                 world_size: int = 1):
    """`micro_steps` micro-batches of `micro_batch` labeled images make one optimiser step of this worker, rank
    `rank` of `world_size` (the worker's context, not torch.distributed's globals)."""
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, device, bf16, micro_batch, micro_steps, rank, world_size)
    return PlainEngine(model, cfg, device, bf16, micro_steps)


class MixedPrecision:
    """`autocast()`: the context a forward runs in, bf16 mixed precision or nothing. `before_update()`: waits,
    before an optimiser step, for a checkpoint still copying the state the step changes."""

    def __init__(self, device, bf16: bool):
        self.device_type, self.bf16 = torch.device(device).type, bf16
        self.checkpoint_copied = None  # the Event of a checkpoint.Snapshot taken by `save`

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def before_update(self) -> None:
        if self.checkpoint_copied is not None:
            self.checkpoint_copied.wait()
            self.checkpoint_copied = None


class PlainEngine(MixedPrecision):
    def __init__(self, model, cfg, device, bf16: bool, micro_steps: int):
        super().__init__(device, bf16)
        self.module = model.to(device)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = poly_schedule(self.optimizer, cfg.train.steps, cfg.optim.poly_power)
        self.micro_steps, self.micros = micro_steps, 0
        self.clip_grad_norm = cfg.optim.clip_grad_norm

    def micro_step(self, loss):
        """Backward one micro-batch's loss; after the step's last one, the optimiser and schedule step (the
        gradient is the mean over the micro-batches, as DeepSpeed's accumulation makes it)."""
        (loss / self.micro_steps).backward()
        self.micros += 1
        if self.micros % self.micro_steps == 0:
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad_norm)
            self.before_update()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, snapshot, client_state: dict) -> None:
        """Hands the engine's state to a checkpoint.Snapshot (host copies, written later)."""
        snapshot.save_until_update({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                                    "scheduler": self.scheduler.state_dict(), "client": client_state}, PLAIN_FILE,
                                   changing=self.module.buffers())
        self.checkpoint_copied = snapshot.copied

    def load(self, local_dir: str) -> dict:
        state = torch.load(os.path.join(local_dir, PLAIN_FILE), weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]


class DeepSpeedEngine(MixedPrecision):

    def __init__(self, model, cfg, device, bf16: bool, micro_batch: int, micro_steps: int, rank: int,
                 world_size: int):
        super().__init__(device, bf16)
        self.rank, self.world_size = rank, world_size
        # DeepSpeed JIT-builds its CPU ops with the first `ninja` on PATH, and ninja versions hash build
        # commands differently, so two of them rebuild each other's output every run: this environment's own
        # (a dependency of deepspeed) first, as `make venv` builds them
        bin_dir = os.path.dirname(sys.executable)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
            os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        import deepspeed  # 4 s to import; plain runs (studies, benches, eval) never need it

        optimizer = build_optimizer(model, cfg.optim)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": micro_steps,
            "zero_optimization": {"stage": cfg.train.zero_stage},
            "zero_allow_untested_optimizer": True,  # SGD as the paper uses; DeepSpeed's list is Adam-centric
            "gradient_clipping": cfg.optim.clip_grad_norm,  # as the plain engine (DeepSpeed would clip at 1.0)
            # fp32 weights, the forward under autocast (see the module's docstring); DeepSpeed then all-reduces
            # the gradients of convolutions and linear layers in bf16, as its `bf16` mode would
            "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
            "steps_per_print": 10**9,
        }
        model = model.to(device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=poly_schedule(optimizer, cfg.train.steps, cfg.optim.poly_power))
        if world_size == 1 and cfg.train.zero_stage == 0:
            # no other rank to reduce with, yet DeepSpeed would flatten, all-reduce and copy back every gradient
            # each step (ZeRO 1-3 partition through that reduction: kept there)
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module

    def micro_step(self, loss):
        self.engine.backward(loss)  # scaled by 1 / gradient_accumulation_steps
        if self.engine.is_gradient_accumulation_boundary():
            self.before_update()
        self.engine.step()  # at the accumulation boundary: optimizer, lr schedule and zero_grad

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, snapshot, client_state: dict) -> None:
        """DeepSpeed's own checkpoint (and at ZeRO > 0 the portable state), its files handed to a
        checkpoint.Snapshot: DeepSpeed's checkpoint engine is swapped for one that keeps them in host memory."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        buffers = list(self.module.buffers())

        class ToSnapshot(TorchCheckpointEngine):
            def save(self, state_dict, path: str):
                snapshot.save_until_update(state_dict, path, changing=buffers)

        own, self.engine.checkpoint_engine = self.engine.checkpoint_engine, ToSnapshot()
        try:
            self.engine.save_checkpoint(snapshot.folder, tag=ENGINE_FOLDER, client_state=client_state)
        finally:
            self.engine.checkpoint_engine = own
        if self.engine.zero_optimization_stage() > 0:
            self._save_portable(snapshot, client_state)
        self.checkpoint_copied = snapshot.copied

    def load(self, local_dir: str) -> dict:
        if self.engine.zero_optimization_stage() > 0 and zero_world(local_dir) != self.world_size:
            return self._load_portable(local_dir)
        _, client_state = self.engine.load_checkpoint(local_dir, tag=ENGINE_FOLDER)
        return client_state or {}

    # ZeRO partitions load only at the world size that wrote them. DeepSpeed's universal checkpoint converter
    # knows Adam's states only (SGD is the default here), so a ZeRO checkpoint also holds the whole fp32
    # weights and optimiser state per parameter, gathered with DeepSpeed's fragment API and written by rank
    # 0; a group of another size starts its engine as usual and sets its own partitions from them.

    def _optimiser_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if isinstance(self._inner(), torch.optim.SGD) else ("exp_avg", "exp_avg_sq")

    def _inner(self) -> torch.optim.Optimizer:
        """The torch optimiser over ZeRO's flat fp32 partitions."""
        return self.engine.optimizer.optimizer

    def _save_portable(self, snapshot, client_state: dict) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_optimiser_state()
        params, optimiser = {}, {}
        for name, p in self.module.named_parameters():  # collective: every rank, the same order
            params[name] = safe_get_full_fp32_param(p)
            optimiser[name] = {k: safe_get_full_optimizer_state(p, k) for k in self._optimiser_keys()}
        if self.rank == 0:
            steps = [state["step"] for state in self._inner().state.values() if "step" in state]
            snapshot.save({"params": params, "optimiser": optimiser, "optimiser_step": steps[0] if steps else None,
                           "buffers": dict(self.module.named_buffers()), "scheduler": self.scheduler.state_dict(),
                           "global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                           "client_state": client_state}, PORTABLE_FILE)

    def _load_portable(self, local_dir: str) -> dict:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        path = os.path.join(local_dir, PORTABLE_FILE)
        if not os.path.exists(path):
            raise BadInput(f"checkpoint: its ZeRO partitions were written by {zero_world(local_dir)} workers and it "
                           f"has no {PORTABLE_FILE} (an older version wrote it): resume it at that world size")
        params = dict(self.module.named_parameters())
        saved = read_portable(path, {name: _full_shape(p) for name, p in params.items()}, self._optimiser_keys())
        # the model's own (low-precision, or ZeRO-3 partitioned) parameters, then the fp32 master copies
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.engine.zero_optimization_stage() == 3):
            for name, p in params.items():
                p.data.copy_(saved["params"][name].to(p.dtype))
        for name, buffer in self.module.named_buffers():
            buffer.copy_(saved["buffers"][name])
        self._create_optimiser_state()
        for name, p in params.items():
            safe_set_full_fp32_param(p, saved["params"][name])
            for key, value in saved["optimiser"][name].items():
                safe_set_full_optimizer_state(p, value, key)
        if saved["optimiser_step"] is not None:
            for state in self._inner().state.values():
                state["step"] = saved["optimiser_step"].clone()
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, rate in zip(self.engine.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = rate  # a scheduler's state sets the rates at its next step only
        self.engine.global_steps, self.engine.global_samples = saved["global_steps"], saved["global_samples"]
        return saved["client_state"]

    def _create_optimiser_state(self) -> None:
        """torch creates an optimiser's state at its first step: one at learning rate 0 on zero gradients
        (it moves nothing) over each of ZeRO's flat fp32 partitions, so that their state exists to be set."""
        zero, inner = self.engine.optimizer, self._inner()
        if self.engine.zero_optimization_stage() == 3:  # one sub-group at a time, as ZeRO-3's own step does
            flats = [(inner.param_groups[zero.sub_group_to_group_id[i]], flat)
                     for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        else:
            flats = [(group, flat) for group, flat in zip(inner.param_groups, zero.single_partition_of_fp32_groups)]
        for group, flat in flats:
            kept, rate = group["params"], group["lr"]
            group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
            inner.step()
            group["params"], group["lr"], flat.grad = kept, rate, None
        self._link_optimiser_state()

    def _link_optimiser_state(self) -> None:
        """ZeRO-1/2 link each parameter to its optimiser state once, after the first step, when a second
        parameter group has no state yet (DeepSpeed 0.19): link again, now that every group has it."""
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()


PORTABLE_KEYS = ("params", "optimiser", "optimiser_step", "buffers", "scheduler", "global_steps", "global_samples",
                 "client_state")


def read_portable(path: str, shapes: dict[str, tuple], optimiser_keys: tuple[str, ...]) -> dict:
    """A checkpoint's portable state, checked against the model before anything is set from it: a file that
    does not load, or lacks a parameter, an optimiser state or a field, is one line naming it (BadInput), not
    a traceback halfway through setting a model."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, unpicklable: the reason in a few words
        raise BadInput(f"checkpoint: {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    missing = [k for k in PORTABLE_KEYS if not isinstance(saved, dict) or k not in saved]
    if not missing:
        for name, shape in shapes.items():
            param, state = saved["params"].get(name), saved["optimiser"].get(name, {})
            if param is None or tuple(param.shape) != tuple(shape):
                missing.append(f"params.{name} {tuple(shape)}")
            missing += [f"optimiser.{name}.{k}" for k in optimiser_keys if k not in state]
    if missing:
        raise BadInput(f"checkpoint: {path} does not hold this model's state: {', '.join(missing[:3])}"
                       + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return saved


def _full_shape(p: torch.nn.Parameter) -> tuple:
    """A parameter's whole shape, also where ZeRO-3 holds only this rank's partition of it."""
    return tuple(getattr(p, "ds_shape", p.shape))
