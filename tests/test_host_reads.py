"""A training step reads nothing back from the device unless it logs: on a GPU each read (`.item()`, a boolean
mask, `.cpu()`, ...) waits for the device's queued work, and a step of many such waits leaves the GPU idle.
Counted on CPU, where every read is caught (bench/step_cost.py's HostReads), through the DeepSpeed engine."""
import os

import pytest
import torch

from bench.step_cost import host_reads_per_step, process_group
from conftest import REPO, free_port
from trainer import ssl

# (method, labeled batch per micro-step, global batch): the default at two micro-batch counts and two batch sizes,
# and the other methods
STEPS = [("guidedmix", 4, 4), ("guidedmix", 4, 8), ("guidedmix", 8, 8), ("unimatch", 4, 4), ("supervised", 4, 4)]


def _trainers(url: str, out: str, device: torch.device):
    """Per size of STEPS, a Trainer of one DeepSpeed worker past its first two steps (the worker bank answers
    from the first step's end on)."""
    from trainer.config import load_config
    from trainer.loop import Trainer, WorkerContext

    for method, batch, global_batch in STEPS:
        cfg = load_config(os.path.join(REPO, "configs", "cpu-small.yaml"), [
            f"data.url={url}", f"out={out}/{method}-{batch}-{global_batch}", "train.engine=deepspeed",
            "train.workers=1", f"train.method={method}", "train.steps=100000", "train.log_every=100000",
            "data.loader_workers=0", f"data.labeled_batch_size={batch}", f"data.unlabeled_batch_size={batch}",
            f"data.global_batch.labeled={global_batch}", f"data.global_batch.unlabeled={global_batch}"])
        trainer = Trainer(cfg, WorkerContext(rank=0, world_size=1, device=device))
        trainer.resume()
        for _ in range(2):
            trainer.train_step()
        yield (method, batch, global_batch), trainer


def _count(rank, url, out, port, results):
    torch.set_num_threads(1)
    process_group(torch.device("cpu"), port)
    for step, trainer in _trainers(url, out, torch.device("cpu")):
        bank = getattr(trainer.method, "pairing", None)
        answered = bank.answered if bank else 0
        reads = host_reads_per_step(trainer)
        answered = (bank.answered - answered) if bank else None
        # a planted read of the loss in every micro-batch: the count must see each one
        loss = trainer.method.loss

        def read_loss(*args, _loss=loss, **kwargs):
            out = _loss(*args, **kwargs)
            out.loss.item()
            return out
        trainer.method.loss = read_loss
        results[step] = {"reads": reads, "planted": host_reads_per_step(trainer), "micro_steps": trainer.micro_steps,
                         "answered": answered}
    torch.distributed.destroy_process_group()


def _on_gpu(rank, url, out, port, results):
    process_group(torch.device("cuda"), port)
    for step, trainer in _trainers(url, out, torch.device("cuda")):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            trainer.train_step()
            results[step] = "no sync"
        except RuntimeError as e:
            results[step] = str(e)[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_non_log_step_reads_nothing_back_whatever_the_method_batch_or_micro_batches(synthetic_url, tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_count, args=(synthetic_url, str(tmp_path), free_port(), results), nprocs=1)
    counted = dict(results)
    assert [counted[s]["micro_steps"] for s in STEPS] == [1, 2, 1, 1, 1]
    for step in STEPS:
        c = counted[step]
        assert c["reads"] == 0, (step, c)
        assert c["planted"] == c["reads"] + c["micro_steps"], (step, c)  # the count sees a read where there is one
    # and the default's step went through its bank: every query of the counted step was answered from it
    assert all(counted[s]["answered"] == counted[s]["micro_steps"] for s in STEPS if s[0] == "guidedmix")


def test_boxes_drawn_as_tensors_are_drawn_as_the_one_by_one_boxes_are():
    """A GPU run draws the mixing boxes as tensors, a CPU generator one box at a time (the draws the study tables
    were made with): the same sizes for the same sides, inside the image, each position as likely."""
    height, width, draws = 9, 7, 4000
    side = torch.rand(draws, generator=torch.Generator().manual_seed(1)).sqrt()
    by_tensor = ssl.region_boxes(side, height, width, torch.Generator().manual_seed(2)).squeeze(1)
    one_by_one = ssl.region_boxes_one_by_one(side, height, width, torch.Generator().manual_seed(2)).squeeze(1)
    sizes = (height * side.double()).round() * (width * side.double()).round()
    for boxes in (by_tensor, one_by_one):
        assert torch.equal(boxes.sum((1, 2)).double(), sizes)  # whole boxes of the drawn size, inside the image
    # boxes of one size (4 x 3 pixels): each of the 6 x 5 places where one fits as likely
    fixed = torch.full((draws,), 0.4)
    for draw in (ssl.region_boxes, ssl.region_boxes_one_by_one):
        boxes = draw(fixed, height, width, torch.Generator().manual_seed(4)).squeeze(1)
        corners = boxes.flatten(1).argmax(1)  # the first pixel of each box, row-major: its top-left corner
        share = torch.bincount(corners, minlength=height * width).float().view(height, width) / draws
        assert share[:6, :5].sum() > 0.9999 and (share[:6, :5] - 1 / 30).abs().max() < 0.012, (draw, share)
    # and a CPU run's draws are unchanged: each corner as torch.randint(0, n) draws it, in turn
    g = torch.Generator().manual_seed(3)
    boxes = ssl.sample_lam(2, height, width, 0.5, "region", torch.Generator().manual_seed(3))
    u = torch.rand(2, generator=g)
    for i, s in enumerate((u * 0.5).sqrt().tolist()):
        h, w = round(height * s), round(width * s)
        top, left = int(torch.randint(0, height - h + 1, (1,), generator=g)), int(torch.randint(0, width - w + 1, (1,), generator=g))
        expected = torch.zeros(height, width)
        expected[top:top + h, left:left + w] = 1
        assert torch.equal(boxes[i, 0], expected)


@pytest.mark.gpu
def test_a_non_log_step_on_a_gpu_calls_nothing_that_synchronises(synthetic_url, tmp_path):
    import torch.multiprocessing as mp

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = mp.Manager().dict()
    mp.spawn(_on_gpu, args=(synthetic_url, str(tmp_path), free_port(), results), nprocs=1)
    assert dict(results) == {step: "no sync" for step in STEPS}
