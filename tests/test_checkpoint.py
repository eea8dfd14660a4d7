"""Checkpoints that do not stall training (trainer/checkpoint.py): the state is taken as host copies when the
step saves, written and committed in the background, committed only once every rank's files are complete,
one at a time; a failed background write is raised in the training thread and leaves `latest` where it was."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from shards.storage import Storage
from trainer import checkpoint


def held_store(out, gate: threading.Event) -> checkpoint.CheckpointStore:
    """A store whose background work (writing the files, uploading, committing) waits for `gate`: a slow disk
    and object store."""
    store = checkpoint.CheckpointStore(Storage(str(out), retries=1))
    write_and_commit = store._write_and_commit

    def held(*args):
        assert gate.wait(30), "the test never let the write go"
        write_and_commit(*args)
    store._write_and_commit = held
    return store


def saves(weights: torch.Tensor, rank: int = 0):
    def write_files(snapshot):
        snapshot.save({"w": weights}, "plain.pt")
        checkpoint.write_rank_state(snapshot.folder, rank, {"rank": rank})
    return write_files


def test_the_step_goes_on_while_the_checkpoint_uploads_and_the_checkpoint_holds_the_state_it_was_given(tmp_path):
    gate, weights = threading.Event(), torch.zeros(4)
    store = held_store(tmp_path, gate)
    store.save("step-00000001", 0, 1, saves(weights))  # returns with the upload still held
    weights += 1  # training goes on changing the weights in place
    store.poll()
    assert store.latest() is None  # not committed while its files are not all there
    gate.set()
    store.wait()
    assert store.latest() == "step-00000001"
    local = store.download("step-00000001")
    assert torch.equal(torch.load(os.path.join(local, "plain.pt"))["w"], torch.zeros(4))
    assert checkpoint.read_rank_states(local) == {0: {"rank": 0}}


def test_rank_0_commits_only_once_every_rank_has_written_its_files(tmp_path):
    gate = threading.Event()
    rank_0, rank_1 = checkpoint.CheckpointStore(Storage(str(tmp_path), retries=1)), held_store(tmp_path, gate)
    rank_0.save("step-00000002", 0, 2, saves(torch.ones(2), rank=0))
    rank_1.save("step-00000002", 1, 2, saves(torch.ones(2), rank=1))
    committed = threading.Thread(target=rank_0.wait)
    committed.start()
    committed.join(1.5)
    assert committed.is_alive() and rank_0.latest() is None  # rank 1's files are still on their way
    gate.set()
    rank_1.wait()
    committed.join(10)
    assert not committed.is_alive() and rank_0.latest() == "step-00000002"
    local = rank_0.download("step-00000002")
    assert set(checkpoint.read_rank_states(local)) == {0, 1}


def test_a_new_checkpoint_waits_for_the_previous_commit(tmp_path):
    gate = threading.Event()
    store = held_store(tmp_path, gate)
    store.save("step-00000001", 0, 1, saves(torch.zeros(1)))
    second = threading.Thread(target=store.save, args=("step-00000002", 0, 1, saves(torch.ones(1))))
    second.start()
    second.join(1.0)
    assert second.is_alive()  # held until the first is committed
    gate.set()
    second.join(10)
    store.wait()
    assert store.latest() == "step-00000002"


def test_a_failed_background_write_is_raised_in_the_training_thread_and_latest_stays(tmp_path, monkeypatch):
    store = checkpoint.CheckpointStore(Storage(str(tmp_path), retries=1))
    store.save("step-00000001", 0, 1, saves(torch.zeros(1)))
    store.wait()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store.fs, "put_file", full_disk)
    store.save("step-00000002", 0, 1, saves(torch.ones(1)))
    with pytest.raises(checkpoint.CheckpointError, match="step-00000002"):
        for _ in range(500):  # the training thread polls once a step
            store.poll()
            threading.Event().wait(0.01)
    assert store.latest() == "step-00000001"


def test_host_copies_are_copies():
    weights = torch.zeros(3)
    state = checkpoint.host_copy({"model": {"w": weights}, "history": [{"step": 1}], "step": 7})
    weights += 1
    assert torch.equal(state["model"]["w"], torch.zeros(3)) and state["step"] == 7
    assert state["history"] == [{"step": 1}]


def test_the_engine_updates_its_weights_only_once_the_checkpoint_has_copied_them(tmp_path):
    """The engine's weights and optimiser state are copied in the background while the next forward and backward
    run; its optimiser step waits for that copy. Batch-norm statistics, which the forward changes, are copied at
    once. The checkpoint holds the state at the step it was taken, every tensor of it."""
    from trainer.config import load_config
    from trainer.engine import build_engine
    from trainer.model import build_model
    from trainer.ssl import supervised_loss

    cfg = load_config("configs/cpu-small.yaml", ["model.backbone=tiny", "train.engine=plain", "optim.name=adamw"])
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model, 3, cfg.guidedmix.mitrans.reduction).train(), cfg,
                          torch.device("cpu"), False, 2, 1)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    engine.micro_step(supervised_loss(engine.module, x, y).loss)  # the optimiser has state now
    at_save = {k: v.clone() for k, v in engine.module.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in engine.optimizer.state.values()]
    gate = threading.Event()
    store = held_store(tmp_path, gate)  # the background copy waits for the gate
    store.save("step-00000001", 0, 1, lambda snapshot: engine.save(snapshot, {"step": 1}))
    loss = supervised_loss(engine.module, x, y).loss  # the forward changes batch-norm statistics
    stepping = threading.Thread(target=engine.micro_step, args=(loss,))
    stepping.start()
    stepping.join(0.5)
    assert stepping.is_alive()  # the optimiser step waits for the copy
    params = dict(engine.module.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in at_save.items() if k in params)
    gate.set()
    stepping.join(30)
    store.wait()
    assert all(not torch.equal(p, at_save[k]) for k, p in params.items() if p.grad is not None)  # then it stepped
    saved = torch.load(os.path.join(store.download("step-00000001"), "plain.pt"), weights_only=False)
    buffers = [k for k, _ in engine.module.named_buffers()]
    assert buffers and any(not torch.equal(engine.module.state_dict()[k], at_save[k]) for k in buffers)
    assert all(torch.equal(saved["model"][k], v) for k, v in at_save.items())
    assert all(torch.equal(a["exp_avg"], b) for a, b in zip(saved["optimizer"]["state"].values(), moments))
