"""`method: unimatch` through the loop: its CutMix sources come from a stream of their own (`unlabeled_mix`, a
second pass over the unlabeled split in its own order, as the reference's second loader), which the ledger
plans, the summary counts and a checkpoint resumes."""
import json
import os
import shutil

from conftest import REPO, check_ledgers, read_json


def test_unimatch_reads_a_second_unlabeled_stream_in_its_own_order_and_resumes_it_exactly(synthetic_url, tmp_path):
    from trainer.config import load_config
    from trainer.loop import WorkerContext, train

    def run(out, steps=10):
        cfg = load_config(f"{REPO}/configs/cpu-small.yaml", [
            f"data.url={synthetic_url}", f"out={out}", "train.engine=plain", "train.workers=1", "data.crop_size=32",
            "train.method=unimatch", "unimatch.tau=0", f"train.steps={steps}", "train.ckpt_every=6",
            "train.log_every=1", "train.eval_every=100", "eval.max_batches=1", "train.ledger=true"])
        train(cfg, WorkerContext())
        return [h["loss"] for h in read_json(f"{out}/history.json")["history"] if "loss" in h]

    straight = str(tmp_path / "straight")
    losses = run(straight)
    report = check_ledgers(straight)  # each stream trained on exactly its planned order
    assert set(report) == {"labeled", "unlabeled", "unlabeled_mix"}
    summary = read_json(f"{straight}/summary.json")
    assert summary["samples_by_split"]["unlabeled_mix"] == summary["samples_by_split"]["unlabeled"] > 0
    ledgers = [read_json(f"{straight}/ledger/{name}") for name in sorted(os.listdir(f"{straight}/ledger"))]
    main, pasted = ([key for ledger in ledgers for key in ledger[s]] for s in ("unlabeled", "unlabeled_mix"))
    assert main != pasted and sum(a == b for a, b in zip(main, pasted)) < len(main) / 4  # an order of its own

    def resume_from_step_6(out, keep_mix_stream=True):
        os.makedirs(f"{out}/checkpoints")
        checkpoint = f"{out}/checkpoints/step-00000006"
        shutil.copytree(f"{straight}/checkpoints/step-00000006", checkpoint)
        if not keep_mix_stream:  # as a checkpoint written before unimatch read a second stream
            state = read_json(f"{checkpoint}/rank-0.json")
            del state["streams"]["unlabeled_mix"]
            with open(f"{checkpoint}/rank-0.json", "w") as f:
                json.dump(state, f)
        with open(f"{out}/checkpoints/latest", "w") as f:
            f.write("step-00000006")
        return run(out)

    assert len(losses) == 10 and resume_from_step_6(str(tmp_path / "resumed")) == losses  # 7-10 bit for bit
    check_ledgers(str(tmp_path / "resumed"))
    # a stream the checkpoint lacks starts at the checkpoint's step: here, where the lost position was
    assert resume_from_step_6(str(tmp_path / "older"), keep_mix_stream=False) == losses
