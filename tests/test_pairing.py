"""The pairing service: its bank against brute force, and a real one behind a Ray actor during training
(killed, slowed down), with training going on regardless."""
import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, SMALL, check_ledgers, fault_figures, run_cli, stop_tree, train_cmd, wait_for
from shards.errors import BankFailure
from trainer import guidedmix, pairing
from trainer.config import Config, PairingConfig
from trainer.metrics import Metrics


def batch(n, width=16, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, width, generator=g), dim=1)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, 7, (n, size, size), generator=g, dtype=torch.uint8)
    return emb, images, masks


def test_matches_are_the_brute_force_argmax_over_the_whole_bank_from_every_worker():
    bank = pairing.PairingBank(PairingConfig(bank_size=64, similarity="most"))
    pushed = []
    for step in range(4):
        for rank in range(2):  # two workers push in turn
            emb, images, masks = batch(6, seed=10 * step + rank)
            bank.push(emb, images, masks, rank, step)
            pushed.append((emb, images, masks))
    all_emb = torch.cat([p[0] for p in pushed])
    all_images = torch.cat([p[1] for p in pushed])
    query = batch(50, seed=99)[0]
    answer = bank.query(query, step=5)
    expected = (query @ all_emb.T).argmax(1)
    assert (answer["index"] == expected).all()
    assert (answer["images"] == all_images[expected]).all()
    assert set(answer["ranks"].tolist()) == {0, 1}  # both workers' samples are in the answers
    assert answer["staleness"].min() >= 2 and answer["staleness"].max() <= 5


def test_the_ring_keeps_the_most_recent_samples():
    bank = pairing.PairingBank(PairingConfig(bank_size=10, similarity="most"))
    for step in range(5):
        bank.push(*batch(4, seed=step), rank=0, step=step)
    assert bank.size == 10
    assert sorted(bank.steps.tolist()) == [2, 2, 3, 3, 3, 3, 4, 4, 4, 4]  # steps 0-1 gave way


def test_the_bank_draws_by_class_from_what_workers_push_and_report():
    """`need` draws partners by the running per-class IoU that workers report with their pushes; `complement`
    by the class shares pushed beside each sample and the queries' own."""
    classes = 3
    bank = pairing.PairingBank(PairingConfig(bank_size=64, similarity="need", temperature=0.05))
    emb, images, _ = batch(6)
    masks = torch.zeros(6, 8, 8, dtype=torch.uint8)
    masks[::2, :4] = 1  # even samples hold class 1, odd ones class 2
    masks[1::2, :4] = 2
    shares = guidedmix.image_class_shares(masks.long(), classes)
    assert bank.query(emb[:2], 0) is None  # no score reported yet: the worker pairs in-batch
    # two workers report: class 1 learnt well (IoU 0.9), class 2 badly (IoU 0.1), then a push without a report
    for rank in range(2):
        overlap = torch.tensor([[90.0, 90, 10], [100, 100, 100]])
        bank.push(emb, images, masks, rank, 0, shares, overlap)
    bank.push(emb, images, masks, 0, 1, shares)
    assert bank.need().tolist() == pytest.approx([0.1, 0.1, 0.9])  # the decayed sums keep each class's IoU
    answer = bank.query(batch(200, seed=3)[0], 2)
    assert (answer["index"] % 2 == 1).float().mean() > 0.9  # the samples of the badly learnt class
    # complement: queries whose predictions hold background and class 2 get partners with class 1
    bank.cfg = PairingConfig(bank_size=64, similarity="complement", temperature=0.05)
    predicted = torch.tensor([[0.7, 0.0, 0.3]]).repeat(200, 1)
    answer = bank.query(batch(200, seed=4)[0], 2, predicted)
    assert (answer["index"] % 2 == 0).float().mean() > 0.9
    assert bank.query(batch(2, seed=4)[0], 2) is None  # complement without the queries' shares: in-batch
    with pytest.raises(ValueError, match="shares must be float32 6 x 3"):
        bank.push(emb, images, masks, 0, 3, torch.ones(6, 4))
    with pytest.raises(ValueError, match="overlap must be float32 2 x 3"):
        bank.push(emb, images, masks, 0, 3, shares, torch.ones(2, 3, dtype=torch.float64))


def test_bad_input_to_the_bank_is_a_clear_error():
    bank = pairing.PairingBank(PairingConfig(bank_size=8, similarity="most"))
    assert bank.query(batch(2)[0], step=0) is None  # empty bank: defined, the worker pairs in-batch
    bank.push(*batch(4), rank=0, step=0)
    emb, images, masks = batch(4, width=32)
    with pytest.raises(ValueError, match="width 32, the bank holds width 16"):
        bank.push(emb, images, masks, 0, 1)
    with pytest.raises(ValueError, match="width 32"):
        bank.query(emb, 1)
    with pytest.raises(ValueError, match="float32"):
        bank.query(batch(2)[0].double(), 1)
    with pytest.raises(ValueError, match="uint8"):
        bank.push(batch(4)[0], batch(4)[1].float(), batch(4)[2], 0, 1)
    with pytest.raises(ValueError, match="bank_size"):
        pairing.PairingBank(PairingConfig(bank_size=0, similarity="most"))
    # what reaches the service over the wire is checked for values too
    service = pairing.PairingService(PairingConfig(bank_size=8, similarity="most"), Metrics())
    emb, images, masks = (part.numpy() for part in batch(4))
    service.push(emb, images, masks, 0, 0)
    with pytest.raises(ValueError, match="embeddings contain NaN"):
        service.query(np.full((1, 16), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="overlap contain NaN"):
        service.push(emb, images, masks, 0, 1, None, np.full((2, 3), np.inf, np.float32))
    assert service.query(emb[:2], 1)["images"].shape == (2, 3, 8, 8)  # numpy out, as the wire takes it


def test_bank_size_zero_in_the_config_is_refused_with_one_line(tmp_path):
    r = run_cli("train", "--config", "configs/cpu-small.yaml", "--set", "guidedmix.pairing.bank_size=0",
                "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "guidedmix.pairing.bank_size" in r.stderr and "Traceback" not in r.stderr


def test_images_survive_the_uint8_round_trip():
    pixels = torch.rand(2, 3, 8, 8) * 255  # any image a loader can produce, between grey levels
    x = pairing.from_uint8(pixels, "cpu")
    back = pairing.from_uint8(pairing.to_uint8(x), "cpu")
    assert (back - x).abs().max() < 0.5 / (0.224 * 255)  # half a grey level over the normalising std


def test_a_failure_of_the_worker_bank_stops_training_and_is_no_fallback(monkeypatch, synthetic_url, tmp_path, capsys):
    """The service may be late or gone (pair in-batch, go on); the worker's own bank has no such excuse: a
    bank that raises is a bug, and a run that quietly paired in-batch would hide it from every study. The run
    stops with one line naming the step and the error, exit 1."""
    from launch import cli

    cfg = Config().guidedmix.pairing.model_copy(update={"mode": "worker", "bank_size": 32, "similarity": "random"})
    client = pairing.PairingClient(cfg, "runs/x", rank=0, in_ray=True, metrics=Metrics())

    def broken(*args, **kwargs):
        raise IndexError("a planted bug")
    monkeypatch.setattr(client.local, "query", broken)
    with pytest.raises(BankFailure, match="query at step 1 failed .IndexError: a planted bug"):
        client.query(torch.randn(2, 16), None, 1, "cpu")
    assert client.fallbacks == 0

    monkeypatch.setattr(pairing.PairingBank, "query", broken)
    code = cli.main(["train", "--no-ray", *SMALL, "--data", synthetic_url, "--out", str(tmp_path / "run"),
                     "--steps", "4", "--set", "guidedmix.pairing.mode=worker"])
    errors = capsys.readouterr().err.splitlines()
    assert code == 1 and errors[-1].startswith("guidedmix: error: pairing bank: query at step 0 failed"), errors
    assert not any(line.startswith("Traceback") for line in errors)


def test_outside_ray_the_bank_lives_in_the_process():
    cfg = Config().guidedmix.pairing.model_copy(update={"mode": "service", "bank_size": 32, "similarity": "random"})
    client = pairing.PairingClient(cfg, "runs/x", rank=0, in_ray=False, metrics=Metrics())
    assert client.query(torch.randn(2, 16), None, 0, "cpu") is None and client.fallbacks == 1
    emb, _, _ = batch(4)
    client.push(emb, torch.randn(4, 3, 8, 8), torch.randint(0, 7, (4, 8, 8)), step=0)
    client.end_step(0)
    images, masks = client.query(emb[:2], None, 1, "cpu")
    assert images.shape == (2, 3, 8, 8) and masks.shape == (2, 8, 8) and client.answered == 1


def test_a_worker_bank_lives_in_the_process_even_inside_ray():
    """`pairing.mode: worker`: each worker's own bank, no service to find (no Ray is running here: a lookup
    of the actor would fail)."""
    cfg = Config().guidedmix.pairing.model_copy(update={"mode": "worker", "bank_size": 32, "similarity": "random"})
    client = pairing.PairingClient(cfg, "runs/x", rank=0, in_ray=True, metrics=Metrics())
    emb, _, _ = batch(4)
    client.push(emb, torch.randn(4, 3, 8, 8), torch.randint(0, 7, (4, 8, 8)), step=0)
    assert client.query(emb[:2], None, 0, "cpu") is None  # until the step ends
    client.end_step(0)
    images, masks = client.query(emb[:2], None, 1, "cpu")
    assert images.shape == (2, 3, 8, 8) and client.answered == 1 and client.actor is None
    assert client.local.size == 4


def _worker_bank_draws(rank: int, world: int, port: int, results) -> None:
    """Three steps of a global labeled batch of 8 (two micro-batches of 4, split over `world` ranks) through
    a worker bank of 12, then the draws of each micro-batch place, as this rank sees them."""
    import torch.distributed as dist

    from trainer.loop import micro_generator

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    client = pairing.PairingClient(PairingConfig(mode="worker", similarity="need", bank_size=12), "runs/x", rank,
                                   in_ray=True, metrics=Metrics())
    classes, places = 3, 2 // world
    draws = []
    for step in range(3):
        for place in range(rank * places, (rank + 1) * places):
            g = torch.Generator().manual_seed(100 * step + place)
            images, masks = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, classes, (4, 8, 8), generator=g)
            overlap = torch.rand(2, classes, generator=g) * torch.tensor([[1.0], [0.0]]) + torch.tensor([[0.0], [1.0]])
            found = client.query(torch.randn(4, 16), None, step, "cpu",
                                 micro_generator(0, step, place, "cpu"))
            draws.append(None if found is None else found[1].tolist())
            client.push(torch.randn(4, 16, generator=g), images, masks, step,
                        guidedmix.image_class_shares(masks, classes), overlap)
        client.end_step(step)
    bank = client.local
    results[rank] = {"draws": draws, "masks": bank.masks.tolist(), "need": bank.need().tolist(),
                     "pushed": bank.pushed}
    if world > 1:
        dist.destroy_process_group()


def test_a_worker_bank_is_the_same_on_every_rank_at_any_world_size():
    """Every rank's bank takes the step's whole global labeled batch in the order of its places, and the
    draws are the micro-batch's: one worker and two (gloo, two processes) hold the same bank and draw the
    same partners for the same places."""
    import torch.multiprocessing as mp

    from conftest import free_port

    alone: dict = {}
    _worker_bank_draws(0, 1, 0, alone)
    shared = mp.Manager().dict()
    mp.spawn(_worker_bank_draws, args=(2, free_port(), shared), nprocs=2)
    pair_of = {0: shared[0], 1: shared[1]}
    assert alone[0]["pushed"] == 24 and alone[0]["draws"][0] is None  # an empty bank: in-batch at first
    for rank in (0, 1):
        assert pair_of[rank]["masks"] == alone[0]["masks"] and pair_of[rank]["pushed"] == 24
        assert pair_of[rank]["need"] == pytest.approx(alone[0]["need"])
    by_place = [draw for step in range(3) for draw in (pair_of[0]["draws"][step], pair_of[1]["draws"][step])]
    assert by_place == alone[0]["draws"] and any(by_place)


# -- a real service behind a Ray actor, during a real 2-worker training run ---------------------------

@pytest.fixture
def ray_client(ray_head):
    import ray

    ray.init(address=ray_head.address, namespace=pairing.NAMESPACE, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _start_training(ray_head, synthetic_url, tmp_path, steps, *extra):
    out = str(tmp_path / "run")
    cmd = train_cmd(ray_head.address, out, synthetic_url, steps, "--set", "guidedmix.pairing.mode=service",
                     "--set", "train.ckpt_every=1000", *extra)
    log = open(tmp_path / "driver.log", "w")
    return out, subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _service(ray, out):
    found = []

    def exists():
        try:
            found.append(ray.get_actor(pairing.service_name(out), namespace=pairing.NAMESPACE))
            return True
        except ValueError:
            return False

    wait_for(exists, 180, "the pairing service")
    return found[0]


def _finish(proc, out, tmp_path, steps):
    try:
        assert proc.wait(timeout=600) == 0, open(tmp_path / "driver.log").read()[-3000:]
    finally:
        stop_tree(proc.pid)
    summary = json.load(open(f"{out}/summary.json"))
    assert summary["steps"] == steps
    return summary


@pytest.mark.slow
def test_late_calls_never_queue_up_behind_a_busy_service(ray_client, tmp_path):
    """A worker's one call a step (its labeled batch and its query) that misses the deadline is cancelled: a
    busy service never works through a backlog of late calls, training never waits for it, and the next call
    after it recovers is answered and brings its labeled batch."""
    ray = ray_client
    cfg = Config().guidedmix.pairing.model_copy(update={"mode": "service", "deadline_s": 0.1, "similarity": "random"})
    out = str(tmp_path / "run")
    actor = pairing.start_service(cfg, out)
    try:
        emb, images, masks = batch(4)
        x, y = pairing.from_uint8(images, "cpu"), masks.long()
        client = pairing.PairingClient(cfg, out, rank=0, in_ray=True, metrics=Metrics())
        # a step while the service is idle: it learns how long this worker's calls take at best
        assert client.query(emb[:2], None, 0, "cpu") is None  # empty bank
        ray.get(actor.inject_delay.remote(5.0))
        busy = actor.query.remote(emb.numpy(), 0)  # the actor answers one call at a time: it is busy for 5 s
        started = time.monotonic()
        for step in range(10):
            client.push(emb, x, y, step)
            assert client.query(emb[:2], None, step, "cpu") is None
        assert time.monotonic() - started < 3.0 and client.fallbacks == 11
        ray.get(busy, timeout=30)
        ray.get(actor.inject_delay.remote(0.0))
        stats = ray.get(actor.stats.remote())
        # none of the ten late calls was worked on
        assert stats["queries"] == 2 and stats["pushes"] == 0 and stats["late_calls"] == 10
        client.push(emb, x, y, 10)
        images_back, masks_back = client.query(emb[:2], None, 10, "cpu")
        assert images_back.shape == (2, 3, 8, 8) and masks_back.shape == (2, 8, 8)
        assert ray.get(actor.stats.remote())["pushes"] == 1 and client.dropped_pushes == 0
    finally:
        ray.kill(actor)


@pytest.mark.slow
@pytest.mark.chaos
def test_killed_service_comes_back_and_training_goes_on(ray_head, ray_client, synthetic_url, tmp_path, chaos_report):
    ray = ray_client
    steps = 100  # killed about step 10; the restarted service answered within 3 s (8 steps) when measured
    out, proc = _start_training(ray_head, synthetic_url, tmp_path, steps)
    actor = _service(ray, out)
    before = {}

    def serving():  # a push rides with the next query, and a late query's is dropped: pushes may trail
        before.update(ray.get(actor.stats.remote()))
        return before["queries"] >= 10 and before["pushes"] >= 10

    wait_for(serving, 300, "answered queries and pushes")
    assert before["bank_size"] > 0
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts it with an empty bank
    killed = time.monotonic()

    latest = {}

    def answering_again():
        try:
            latest.update(ray.get(actor.stats.remote(), timeout=10))
        except ray.exceptions.RayError:  # still restarting
            return False
        return latest["pid"] != before["pid"] and latest["queries"] >= 5 and latest["bank_size"] > 0

    # the same handle reaches the restarted actor (a new process), whose bank refills from the pushes
    wait_for(answering_again, 300, "the restarted service answering")
    recovery = time.monotonic() - killed
    summary = _finish(proc, out, tmp_path, steps)
    assert summary["pairing"]["answered"] > 0
    chaos_report(**fault_figures("pairing service killed", summary, steps, round(recovery, 1), check_ledgers(out),
                                 fallbacks=summary["pairing"]["fallbacks"]))


@pytest.mark.slow
@pytest.mark.chaos
def test_slow_service_makes_workers_fall_back_instead_of_waiting(ray_head, ray_client, synthetic_url, tmp_path,
                                                                 chaos_report):
    ray = ray_client
    steps, delay = 60, 5.0
    out, proc = _start_training(ray_head, synthetic_url, tmp_path, steps, "--set", "guidedmix.pairing.deadline_s=0.2")
    actor = _service(ray, out)
    ray.get(actor.inject_delay.remote(delay))
    summary = _finish(proc, out, tmp_path, steps)
    # timed by the run itself, between its first and last log step, so that the start of Ray Train and
    # DeepSpeed on a loaded machine does not count: a step that waited for its answer would take >= 5 s
    logged = [h for h in json.load(open(f"{out}/history.json"))["history"] if "seconds" in h]
    step_s = (logged[-1]["seconds"] - logged[0]["seconds"]) / (logged[-1]["step"] - logged[0]["step"])
    assert step_s < delay / 2, step_s
    stats = summary["pairing"]
    assert stats["fallbacks"] >= steps - 5 and stats["queries"] == steps
    chaos_report(**fault_figures(f"pairing service slow ({delay:.0f} s per answer, deadline 0.2 s)", summary, steps,
                                 0.0, fallbacks=stats["fallbacks"], step_s=round(step_s, 2)))


@pytest.mark.parametrize("part,overrides", [
    ("pairing-bank", []), ("thresholds", ["guidedmix.threshold=adaptive", "guidedmix.threshold_momentum=0.5"])])
def test_a_resumed_run_takes_the_same_steps_as_one_never_stopped(synthetic_url, tmp_path, part, overrides):
    """Exact resume with the default worker bank: a run resumed from its step-6 checkpoint logs the same
    losses, bit for bit, at steps 7-10 as the run that went on, although its bank's ring (12 samples, 8 a
    step) had wrapped: the bank's state comes from the checkpoint and its pixels from the stream again. Without
    the bank's file the resumed run draws other partners and its losses differ. The same with adaptive
    thresholds: without their file the resumed run starts them again at 1/C and teaches other pixels."""
    import shutil

    from trainer.config import load_config
    from trainer.checkpoint import part_file
    from trainer.loop import WorkerContext, train

    def run(out, steps=10):
        cfg = load_config(f"{REPO}/configs/cpu-small.yaml", [
            f"data.url={synthetic_url}", f"out={out}", "train.engine=plain", "train.workers=1", "data.crop_size=32",
            f"train.steps={steps}", "train.ckpt_every=6", "train.log_every=1", "train.eval_every=100",
            "eval.max_batches=1", "guidedmix.rampup_steps=0", "guidedmix.pairing.bank_size=12", *overrides])
        assert (cfg.guidedmix.pairing.mode, cfg.guidedmix.pairing.similarity) == ("worker", "need")  # the default
        train(cfg, WorkerContext())
        return [h["loss"] for h in json.load(open(f"{out}/history.json"))["history"] if "loss" in h]

    def resume_from_step_6(out, keep_part=True):
        os.makedirs(f"{out}/checkpoints")
        shutil.copytree(f"{straight}/checkpoints/step-00000006", f"{out}/checkpoints/step-00000006")
        if not keep_part:
            os.remove(f"{out}/checkpoints/step-00000006/{part_file(part)}")
        with open(f"{out}/checkpoints/latest", "w") as f:
            f.write("step-00000006")
        return run(out)

    straight = str(tmp_path / "straight")
    losses = run(straight)
    assert len(losses) == 10 and os.path.exists(f"{straight}/checkpoints/step-00000006/{part_file(part)}")
    resumed = resume_from_step_6(str(tmp_path / "resumed"))
    assert resumed == losses  # steps 1-6 come from the checkpoint's history, 7-10 are trained again
    emptied = resume_from_step_6(str(tmp_path / "emptied"), keep_part=False)
    assert emptied[:6] == losses[:6] and emptied[6:] != losses[6:]
