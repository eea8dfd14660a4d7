"""What a worker's checkpoint holds, part by part, and where each goes in the layout (trainer/checkpoint.py
names the files): the engine's weights, optimiser and schedule, with the run's record as their client state;
this rank's state (its streams' position, its samples); and on rank 0 the run's config and the method's parts.
`save` hands them to the store as host copies, which it writes and commits in the background; `restore` reads
them back, whatever the world size that wrote them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from . import checkpoint

if TYPE_CHECKING:
    from .config import Config
    from .engine import MixedPrecision
    from .loop import TrainStreams, WorkerContext
    from .methods import Method, Replay
    from .run import RunRecord, SampleLedger


class Checkpointer:
    def __init__(self, cfg: "Config", ctx: "WorkerContext", classes: list[str], engine: "MixedPrecision",
                 streams: "TrainStreams", samples: "SampleLedger", method: "Method", run: "RunRecord"):
        self.cfg, self.ctx, self.classes = cfg, ctx, classes
        self.engine, self.streams, self.samples, self.method, self.run = engine, streams, samples, method, run
        self.store = checkpoint.CheckpointStore(cfg.storage(cfg.out))

    def save(self, committed: Callable[[float], None]) -> None:
        """A checkpoint of this rank at the run's step; `committed(seconds)` once every rank's files are."""
        ctx = self.ctx

        def write_files(snapshot):
            self.engine.save(snapshot, self.run.state(ctx.world_size))
            checkpoint.write_rank_state(snapshot.folder, ctx.rank, {"streams": self.streams.state_dict(),
                                                                    **self.samples.state()})
            if ctx.rank == 0:
                checkpoint.write_run_config(snapshot.folder, self.cfg, self.classes)
                for name, part in self.method.state().items():  # the same on every rank
                    snapshot.save(part, checkpoint.part_file(name))

        self.store.save(checkpoint.step_name(self.run.step), ctx.rank, ctx.world_size, write_files, committed)

    def restore(self, replay: "Replay") -> Optional[int]:
        """Every part as the latest committed checkpoint holds it; returns the world size that wrote it (None:
        there is none, a fresh run)."""
        latest = self.store.latest()
        if not latest:
            return None
        local = self.store.download(latest)
        try:
            client = self.engine.load(local)
            states = checkpoint.read_rank_states(local)
            parts = checkpoint.read_parts(local, self.method.parts)
        finally:
            checkpoint.remove_local(local)
        before = self.run.restore(client, latest, self.ctx.world_size, len(states))
        self.streams.load_state_dict(states[0]["streams"])  # the global step: the same in every rank's state
        self.method.load_state(parts, self.run.step, replay)
        self.samples.restore(states, self.ctx.rank, self.ctx.world_size, before)
        return before
