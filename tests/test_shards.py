"""The data layer end to end: dataset trees written here -> shards on disk and on S3 -> streams back."""
import json
import os
import re
import shutil
import tarfile
import time
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from shards import build, sources
from shards.errors import BadInput, StorageFailure
from shards.manifest import read_manifest, summary, verify
from shards.node_cache import NodeCache
from shards import order
from shards.samples import skip_bad_sample
from shards.storage import Storage
from shards.stream import ShardStream, StreamSpec
from trainer.config import DataConfig

RETRIES = DataConfig().retries


def _image(path, rng, size=(24, 32)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def _mask(path, mask, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)


def _random_mask(rng, classes, size=(24, 32)):
    mask = rng.integers(0, classes, size)
    mask[0, :4] = 255
    return mask


def write_voc(root, rng, n_train=10, n_val=4, n_aug=6):
    masks = {}
    names = [f"2007_{i:06d}" for i in range(n_train + n_val + n_aug)]
    for name in names:
        _image(f"{root}/JPEGImages/{name}.jpg", rng)
        masks[name] = _random_mask(rng, 21)
    for name in names[: n_train + n_val]:
        _mask(f"{root}/SegmentationClass/{name}.png", masks[name], palette=True)
    for name in names:
        _mask(f"{root}/SegmentationClassAug/{name}.png", masks[name])
    os.makedirs(f"{root}/ImageSets/Segmentation")
    open(f"{root}/ImageSets/Segmentation/train.txt", "w").write("\n".join(names[:n_train]) + "\n")
    open(f"{root}/ImageSets/Segmentation/val.txt", "w").write("\n".join(names[n_train:n_train + n_val]) + "\n")
    return masks


def stream_all(url, split, **kw):
    spec = StreamSpec(url=url, split=split, batch_size=kw.pop("batch_size", 4), retries=RETRIES, **kw)
    stream = ShardStream(spec)
    if split == "val":
        return list(stream)
    return [next(stream) for _ in range(stream.batches_per_epoch())]


def whole_shards(url):
    """The manifest of `url` as shard sets built before per-sample offsets read it: shards fetched whole."""
    manifest = read_manifest(Storage(url, retries=RETRIES))
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard.pop("offsets"), shard.pop("crc32")
    return manifest


def test_voc_with_aug_shards_stream_back_pixel_exact(tmp_path):
    rng = np.random.default_rng(0)
    masks = write_voc(tmp_path / "VOC2012", rng)
    source = sources.voc(str(tmp_path / "VOC2012"))
    assert len(source.train) == 16 and len(source.val) == 4  # 10 fine + 6 from the Aug set
    manifest = build.build(source, str(tmp_path / "out"), 4, seed=1, samples_per_shard=3, progress=False)
    s = summary(manifest)
    assert s["classes"] == 21 and s["splits"]["labeled"]["samples"] == 4
    assert s["splits"]["unlabeled"]["samples"] == 12 and s["splits"]["val"] == {"samples": 4, "shards": 2}
    # labeled ids come from the fine train list only
    tar_keys = set()
    for shard in manifest["splits"]["labeled"]["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            tar_keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    assert tar_keys <= {f"2007_{i:06d}" for i in range(10)} and len(tar_keys) == 4
    # val streams back without augmentation: masks pixel-exact
    seen = 0
    for batch in stream_all(str(tmp_path / "out"), "val", batch_size=3):
        for key, mask in zip(batch["keys"], batch["mask"]):
            assert np.array_equal(mask[:24, :32].numpy(), masks[key])
            seen += 1
    assert seen == 4
    # unlabeled shards carry no masks
    for shard in manifest["splits"]["unlabeled"]["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            assert not [m for m in tar.getmembers() if "mask" in m.name]


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    label_ids = np.array([[7, 8, 26, 0], [33, 1, 24, 255]] * 4, np.uint8)
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            stem = f"aachen_{i:06d}_000019"
            _image(f"{root}/leftImg8bit/{split}/aachen/{stem}_leftImg8bit.png", rng, (8, 4))
            _mask(f"{root}/gtFine/{split}/aachen/{stem}_gtFine_labelIds.png", label_ids)
    build.build(sources.cityscapes(str(root)), str(tmp_path / "out"), 1, progress=False)
    (batch,) = stream_all(str(tmp_path / "out"), "val", batch_size=1)
    expected = np.array([[0, 1, 13, 255], [18, 255, 11, 255]] * 4)
    assert np.array_equal(batch["mask"][0].numpy(), expected)


def test_context_maps_background_to_ignore(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "context"
    raw = np.array([[0, 1, 59, 30]] * 4, np.uint8)
    for name in ("a1", "a2", "b1"):
        _image(f"{root}/JPEGImages/{name}.jpg", rng, (4, 4))
        _mask(f"{root}/SegmentationClassContext/{name}.png", raw)
    os.makedirs(f"{root}/ImageSets/SegmentationContext")
    open(f"{root}/ImageSets/SegmentationContext/train.txt", "w").write("a1\na2\n")
    open(f"{root}/ImageSets/SegmentationContext/val.txt", "w").write("b1\n")
    manifest = build.build(sources.context(str(root)), str(tmp_path / "out"), 1, progress=False)
    assert len(manifest["classes"]) == 59
    (batch,) = stream_all(str(tmp_path / "out"), "val", batch_size=1)
    assert batch["mask"][0, 0].tolist() == [255, 0, 58, 29]


def write_folder(root, rng, n_train=12, n_val=3, n_extra=2, classes=("bg", "thing", "stuff")):
    os.makedirs(root)
    open(f"{root}/classes.txt", "w").write("\n".join(classes) + "\n")
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            _image(f"{root}/{split}/images/{split}{i}.png", rng)
            _mask(f"{root}/{split}/masks/{split}{i}.png", _random_mask(rng, len(classes)))
    for i in range(n_extra):
        _image(f"{root}/unlabeled/x{i}.jpg", rng)


def test_folder_split_is_reproducible_and_list_file_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    write_folder(tmp_path / "ds", rng)
    src = sources.folder(str(tmp_path / "ds"))
    a = build.split_labeled(src.train, 0.25, seed=7)[0]
    b = build.split_labeled(src.train, 0.25, seed=7)[0]
    c = build.split_labeled(src.train, 0.25, seed=8)[0]
    assert [i.key for i in a] == [i.key for i in b] and len(a) == 3
    assert {i.key for i in a} != {i.key for i in c}
    listed = build.split_labeled(src.train, 1, 0, ["train2", "train5"])[0]
    assert {i.key for i in listed} == {"train2", "train5"}
    m = build.build(src, str(tmp_path / "out"), 3, progress=False)
    assert m["splits"]["unlabeled"]["samples"] == 9 + 2  # the rest of train plus the extra images
    # --shuffle: the same samples in each split, written in a seeded order unlike the source's
    written = {}
    for name, shuffle in (("out", False), ("shuffled", True), ("again", True)):
        if name != "out":
            build.build(src, str(tmp_path / name), 3, progress=False, shuffle=shuffle)
        written[name] = [b["keys"] for b in stream_all(str(tmp_path / name), "val", batch_size=64)] + [
            [k for shard in read_manifest(Storage(str(tmp_path / name), retries=RETRIES))["splits"]["unlabeled"]["shards"]
             for k in dict.fromkeys(m.name.split(".")[0] for m in tarfile.open(tmp_path / name / shard["name"]))]]
    assert written["shuffled"] == written["again"] and written["shuffled"][-1] != written["out"][-1]
    assert sorted(written["shuffled"][-1]) == sorted(written["out"][-1])
    assert written["shuffled"][:-1] == written["out"][:-1]  # val as listed


def test_withheld_masks_stay_out_of_training_and_follow_their_image(tmp_path):
    """A study's shard set keeps unlabeled images' true masks as withheld.png (never mask.png), and the
    unlabeled stream hands each back under the image's own augmentation: the same image labeled in another
    build streams back with the same pixels and mask, because augmentation draws from (seed, epoch, key)."""
    rng = np.random.default_rng(5)
    write_folder(tmp_path / "ds", rng)
    src = sources.folder(str(tmp_path / "ds"))
    ids = sorted(it.key for it in src.train)
    labeled_here = build.build(src, str(tmp_path / "a"), 6, labeled_list=ids[:6], samples_per_shard=4, progress=False)
    withheld = build.build(src, str(tmp_path / "b"), 6, labeled_list=ids[6:], samples_per_shard=4, progress=False,
                           withhold_masks=True)
    assert withheld["withheld_masks"] and not labeled_here["withheld_masks"]
    for shard in withheld["splits"]["unlabeled"]["shards"]:
        with tarfile.open(tmp_path / "b" / shard["name"]) as tar:
            names = tar.getnames()
        assert not any(n.endswith(".mask.png") for n in names)
    assert sum(n.endswith(".withheld.png") for n in names) >= 1
    kw = dict(batch_size=2, crop_size=16, photometric=True)
    as_labeled = {k: (b["image"][i], b["mask"][i]) for b in stream_all(str(tmp_path / "a"), "labeled", **kw)
                  for i, k in enumerate(b["keys"])}
    as_unlabeled = {k: (b["image"][i], b["withheld_mask"][i]) for b in stream_all(str(tmp_path / "b"), "unlabeled", **kw)
                    for i, k in enumerate(b["keys"])}
    assert set(ids[:6]) <= set(as_unlabeled) and set(as_labeled) == set(ids[:6])
    for key in ids[:6]:
        assert torch.equal(as_labeled[key][0], as_unlabeled[key][0]) and torch.equal(as_labeled[key][1], as_unlabeled[key][1])
    assert (as_unlabeled["extra_x0"][1] == 255).all()  # an extra image without a mask: nothing to score against
    assert all("withheld_mask" not in b for b in stream_all(str(tmp_path / "a"), "unlabeled", **kw))


def test_s3_build_inspect_verify_and_stream(s3, tmp_path):
    rng = np.random.default_rng(4)
    write_folder(tmp_path / "ds", rng)
    r = run_cli("shards", "build", "--source", "folder", "--root", str(tmp_path / "ds"), "--out", "s3://test/ds",
                "--labeled", "4", "--samples-per-shard", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("shards", "inspect", "s3://test/ds", "--verify")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["verified"] and info["splits"]["labeled"] == {"samples": 4, "shards": 1}
    local = build.build(sources.folder(str(tmp_path / "ds")), str(tmp_path / "local"), 4, samples_per_shard=4,
                        progress=False)
    remote = stream_all("s3://test/ds", "val", batch_size=2)
    here = stream_all(str(tmp_path / "local"), "val", batch_size=2)
    assert [b["keys"] for b in remote] == [b["keys"] for b in here]
    assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(remote, here))
    # builds are byte-reproducible: the same data gives the same checksums wherever it is written
    remote_manifest = read_manifest(Storage("s3://test/ds", retries=RETRIES))
    assert local["splits"]["val"]["shards"][0]["sha256"] == remote_manifest["splits"]["val"]["shards"][0]["sha256"]
    # a tampered shard fails verification
    fs = fsspec.filesystem("s3")
    fs.pipe_file("test/ds/val-000000.tar", b"garbage")
    assert any("sha256" in p for p in verify(Storage("s3://test/ds", retries=RETRIES), remote_manifest))


@pytest.mark.parametrize("run", [1, 3])
@pytest.mark.parametrize("sizes,block", [((5, 7, 3, 9, 4, 6, 8), 2), ((20,), 4), ((3, 3, 2, 9, 1, 0), 3)])
def test_epoch_order_covers_every_sample_once_and_is_a_function_of_seed_and_epoch(sizes, block, run):
    orders = {(seed, epoch): order.epoch_order(sizes, seed, epoch, block, True, run)
              for seed in (0, 1) for epoch in (0, 1)}
    every = {(s, i) for s, n in enumerate(sizes) for i in range(n)}
    for o in orders.values():
        assert len(o) == sum(sizes) and {tuple(p) for p in o.tolist()} == every
    assert len({o.tobytes() for o in orders.values()}) == 4  # another seed or epoch: another order
    assert np.array_equal(order.epoch_order(sizes, 0, 1, block, True, run), orders[0, 1])  # pure
    # runs: a sample that does not start one (its index a multiple of `run`) follows its neighbour
    for o in orders.values():
        for (shard, index), (before_shard, before) in zip(o[1:].tolist(), o[:-1].tolist()):
            assert index % run == 0 or (before_shard, before) == (shard, index - 1)
    if sizes == (20,) and run == 1:  # samples on their own: the order the studies ran on, unchanged
        assert orders[0, 0][:, 1].tolist() == np.random.default_rng([0, 0, 0]).permutation(20).tolist()
    # a block's samples stay within its shards: the worker holds about a block at a time
    blocks = order.shard_blocks(len(sizes), 0, 0, block, True)
    start = 0
    for members in blocks:
        n = sum(sizes[m] for m in members)
        assert set(orders[0, 0][start:start + n, 0].tolist()) <= set(members)
        start += n


def test_layout_splits_the_global_batch_at_any_world_size():
    assert (order.layout(16, 1, 8, "x").micro_steps, order.layout(16, 2, 8, "x").micro_steps) == (2, 1)
    assert order.layout(16, 4, 8, "x").micro == 4  # a share below the micro-batch: one smaller micro-batch
    assert order.layout(24, 1, 5, "x").micro == 4  # micro-batches split a share evenly
    three = order.layout(16, 3, 8, "x")  # a world that does not divide the batch: shares of 5, 5 and 6
    assert [len(three.positions(0, r, 0)) for r in range(3)] == [5, 5, 6] and not three.even
    assert [three.positions(1, r, 0).start for r in range(3)] == [16, 21, 26]
    with pytest.raises(BadInput, match="global batch 2 is smaller than 3 workers"):
        order.layout(2, 3, 8, "x")


def consume(url, split, world, loader_workers, steps, start=0, **kw):
    """The keys of `steps` global steps from `start`, in the global order (step by step, rank by rank), and
    the first batch of each rank."""
    streams = [ShardStream(StreamSpec(url=url, split=split, retries=RETRIES, rank=r, world_size=world,
                                      loader_workers=loader_workers, **kw)) for r in range(world)]
    per_rank = []
    for s in streams:
        s.load_state_dict({"step": start})
        per_rank.append([next(s) for _ in range(steps * s.layout.micro_steps)])
        assert s.state_dict()["step"] == start + steps
    keys = []
    for g in range(steps):
        for batches in per_rank:
            micro = len(batches) // steps
            assert {b["step"] for b in batches[g * micro:(g + 1) * micro]} == {start + g}
            keys += [k for b in batches[g * micro:(g + 1) * micro] for k in b["keys"]]
    return keys, [batches[0] for batches in per_rank]


def test_the_global_order_does_not_depend_on_ranks_or_loader_workers(synthetic_url):
    kw = {"batch_size": 4, "global_batch": 24, "seed": 3}
    reference, _ = consume(synthetic_url, "unlabeled", 1, 0, 25, **kw)  # 25 x 24 > 420: crosses an epoch
    assert len(reference) == 25 * 24
    for world, loader_workers in ((2, 2), (3, 1), (4, 2)):
        keys, _ = consume(synthetic_url, "unlabeled", world, loader_workers, 25, **kw)
        assert keys == reference, (world, loader_workers)


def test_equal_batches_disjoint_shares_and_val_once(synthetic_url):
    streams = [ShardStream(StreamSpec(url=synthetic_url, split="unlabeled", batch_size=8, retries=RETRIES, rank=r,
                                      world_size=3, loader_workers=2)) for r in range(3)]
    counts = {s.batches_per_epoch() for s in streams}
    assert len(counts) == 1 and counts.pop() > 0
    keys = [{k for b in (next(s) for _ in range(s.batches_per_epoch())) for k in b["keys"]} for s in streams]
    assert all(len(b) == s.batches_per_epoch() * 8 for b, s in zip(keys, streams))
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    val = [[b for b in ShardStream(StreamSpec(url=synthetic_url, split="val", batch_size=8, retries=RETRIES, rank=r,
                                              world_size=3))] for r in range(3)]
    assert len({len(v) for v in val}) == 1  # padded to the same batch count
    assert sorted(k for v in val for b in v for k in b["keys"]) == sorted({k for v in val for b in v for k in b["keys"]})
    assert sum(len(b["keys"]) for v in val for b in v) == 64  # every val sample exactly once across ranks


def test_a_checkpoint_of_4_ranks_resumes_on_1_and_on_3_at_the_exact_next_sample(synthetic_url):
    """The stream's state is the global step: written by 4 ranks with 2 loader workers each, it resumes on one
    rank without loader workers, or on three, with the very next samples, augmented the same."""
    kw = {"batch_size": 2, "global_batch": 24, "seed": 5}
    reference, _ = consume(synthetic_url, "unlabeled", 1, 0, 24, **kw)
    streams = [ShardStream(StreamSpec(url=synthetic_url, split="unlabeled", retries=RETRIES, rank=r, world_size=4,
                                      loader_workers=2, **kw)) for r in range(4)]
    for s in streams:
        for _ in range(7 * s.layout.micro_steps):
            next(s)
    states = [json.loads(json.dumps(s.state_dict())) for s in streams]  # it travels as JSON in checkpoints
    assert all(state == states[0] for state in states)
    for world, loader_workers in ((1, 0), (3, 1)):
        keys, firsts = consume(synthetic_url, "unlabeled", world, loader_workers, 24 - 7, start=states[0]["step"], **kw)
        assert reference[:7 * 24] + keys == reference  # nothing repeated, nothing skipped, nothing reordered
    _, firsts = consume(synthetic_url, "unlabeled", 1, 0, 1, start=7, **kw)
    _, again = consume(synthetic_url, "unlabeled", 4, 2, 1, start=7, **kw)
    assert torch.equal(firsts[0]["image"][:2], again[0]["image"])  # augmentation: a function of (seed, epoch, key)


def test_the_manifest_indexes_each_sample_as_an_independent_reading_of_the_tar_does(synthetic_url, tmp_path):
    from conftest import _index_again

    copy = str(tmp_path / "copy")
    shutil.copytree(synthetic_url, copy)
    written = read_manifest(Storage(copy, retries=RETRIES))
    for split in written["splits"].values():
        for shard in split["shards"]:
            _index_again(f"{copy}/{shard['name']}")
    assert read_manifest(Storage(copy, retries=RETRIES)) == written


@pytest.mark.parametrize("ranged,sample_run", [(True, 1), (False, 1), (True, 4)])
def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path, caplog, ranged, sample_run):
    rng = np.random.default_rng(5)
    write_folder(tmp_path / "ds", rng, n_train=16, n_val=2, n_extra=0)
    url = str(tmp_path / "out")
    manifest = build.build(sources.folder(str(tmp_path / "ds")), url, 8, samples_per_shard=4, progress=False)
    shard_a, shard_b = (s["name"] for s in manifest["splits"]["labeled"]["shards"])
    # shard a: one image's bytes overwritten in place (what storage corruption looks like); shard b: cut in half
    with tarfile.open(f"{url}/{shard_a}") as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith(".png") and "mask" not in m.name)
    bad_key = image.name.split(".")[0]
    raw = bytearray(open(f"{url}/{shard_a}", "rb").read())
    raw[image.offset_data:image.offset_data + image.size] = b"x" * image.size
    open(f"{url}/{shard_a}", "wb").write(raw)
    raw = open(f"{url}/{shard_b}", "rb").read()
    open(f"{url}/{shard_b}", "wb").write(raw[: len(raw) // 2 + 100])
    spec = StreamSpec(url=url, split="labeled", batch_size=2, retries=RETRIES, loader_workers=0, sample_run=sample_run)
    manifest = None if ranged else whole_shards(url)
    seen = []  # the default handler, watched
    stream = ShardStream(spec, manifest, on_bad_sample=lambda bad: seen.append(bad) or skip_bad_sample(bad))
    batches = [next(stream) for _ in range(6)]
    assert stream.skipped >= 2 and stream.skipped == len(seen)
    assert all(b["image"].shape[0] == 2 for b in batches)  # equal batches: readable samples fill the gaps
    assert bad_key not in {k for b in batches for k in b["keys"]}  # keys: what was really consumed
    assert any(bad_key in r.message and shard_a in r.message for r in caplog.records)
    assert any(shard_b in r.message and "unreadable" in r.message for r in caplog.records)
    assert {bad.shard for bad in seen} == {shard_a, shard_b}
    # a handler that raises stops the stream at the first bad sample, with its error
    def refuse(bad):
        raise BadInput(f"{bad.shard} {bad.sample}: {bad.reason}")
    refusing = ShardStream(spec, manifest, on_bad_sample=refuse)
    with pytest.raises(BadInput, match=f"({shard_a}|{shard_b}) (key|sample)"):
        for _ in range(6):
            next(refusing)


@pytest.mark.parametrize("case", ["missing_root", "class_beyond", "unreadable_image", "bad_scheme", "no_manifest",
                                  "exists", "bad_labeled", "too_many_labeled", "list_unknown_id", "bad_offsets"])
def test_bad_input_is_one_line_exit_2(tmp_path, case):
    rng = np.random.default_rng(6)
    write_folder(tmp_path / "ds", rng, n_train=4, n_val=1, n_extra=0)
    ds = str(tmp_path / "ds")
    args = ["shards", "build", "--source", "folder", "--root", ds, "--out", str(tmp_path / "out"), "--labeled", "2"]
    expect = {"missing_root": "nope", "class_beyond": "train1.png", "unreadable_image": "train2.png",
              "bad_scheme": "ftp", "no_manifest": "manifest", "exists": "already", "bad_labeled": "--labeled",
              "too_many_labeled": "--labeled", "list_unknown_id": "zzz", "bad_offsets": "offsets"}[case]
    if case == "missing_root":
        args[5] = str(tmp_path / "nope")
    elif case == "class_beyond":
        _mask(f"{ds}/train/masks/train1.png", np.full((24, 32), 7))
    elif case == "unreadable_image":
        open(f"{ds}/train/images/train2.png", "wb").write(b"\x89PNG garbage")
    elif case == "bad_scheme":
        args[7] = "ftp://host/x"
    elif case == "no_manifest":
        args = ["shards", "inspect", str(tmp_path)]
    elif case == "exists":
        assert run_cli(*args, "--quiet").returncode == 0
    elif case == "bad_labeled":
        args[9] = "1/0"
    elif case == "too_many_labeled":
        args[9] = "40"
    elif case == "list_unknown_id":
        open(tmp_path / "list.txt", "w").write("train0\nzzz\n")
        args += ["--labeled-list", str(tmp_path / "list.txt")]
    elif case == "bad_offsets":  # a manifest whose sample offsets go backwards
        assert run_cli(*args, "--quiet").returncode == 0
        manifest = json.load(open(tmp_path / "out" / "manifest.json"))
        manifest["splits"]["labeled"]["shards"][0]["offsets"].reverse()
        json.dump(manifest, open(tmp_path / "out" / "manifest.json", "w"))
        args = ["shards", "inspect", str(tmp_path / "out")]
    r = run_cli(*args, "--quiet") if args[1] == "build" else run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr


def test_pipe_urls_need_opt_in(synthetic_url):
    with pytest.raises(BadInput, match="allow_pipe"):
        ShardStream(StreamSpec(url="pipe:cat " + synthetic_url, split="val", batch_size=2, retries=RETRIES))


def test_a_storage_failure_of_byte_ranges_names_every_shard_asked(synthetic_url, monkeypatch):
    """One concurrent call reads a micro-batch's samples from several shards: its failure names them all."""
    from fsspec.implementations.local import LocalFileSystem

    def refused(self, paths, *args, **kw):
        raise PermissionError("refused")

    monkeypatch.setattr(LocalFileSystem, "cat_ranges", refused)
    stream = ShardStream(StreamSpec(url=synthetic_url, split="unlabeled", batch_size=8, retries=RETRIES))
    with pytest.raises(StorageFailure) as failure:
        next(stream)
    asked = {stream.infos[s].name for s, _ in stream.plan.order(0)[:8].tolist()}
    assert len(asked) > 1 and all(name in str(failure.value) for name in asked)


def test_each_storage_operation_has_its_own_retry_budget(monkeypatch):
    """`data.retries` bounds one read or write, not a run: an operation after an outage (or after a restart,
    which reads everything again) starts with the whole budget; one that fails past it is a StorageFailure
    naming the URL."""
    from shards import storage

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    failures = {"left": 0}

    def flaky():
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("refused")
        return b"ok"

    for _ in range(2):  # each call rides out `retries` failures
        failures["left"] = 3
        assert storage.with_retries(flaky, "s3://b/x", retries=3) == b"ok"
    failures["left"] = 4
    with pytest.raises(StorageFailure, match=r"s3://b/x: .*gave up after 3 retries"):
        storage.with_retries(flaky, "s3://b/x", retries=3)


def test_read_ahead_fetches_the_next_micro_batch_while_one_is_decoded(synthetic_url, monkeypatch):
    """Byte-range reads with data.readahead=2: the first micro-batch comes out while the worker's next two are
    fetched, and nothing else is."""
    import threading

    from shards import fetch

    fetched, real = [], fetch.RangeFetch.ranges_of
    monkeypatch.setattr(fetch.RangeFetch, "ranges_of", lambda self, key: fetched.append(key) or real(self, key))
    s = ShardStream(StreamSpec(url=synthetic_url, split="unlabeled", batch_size=4, retries=RETRIES, readahead=2,
                               loader_workers=0))
    next(s)
    deadline = time.monotonic() + 5
    while len(fetched) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(fetched) == [(0, 0, 4), (0, 4, 8), (0, 8, 12)]
    assert threading.active_count() >= 2


def test_read_ahead_fetches_the_next_shard_while_one_is_decoded(synthetic_url, monkeypatch):
    """Whole shards (a shard set without offsets), one shard a block and data.readahead=1: the first
    micro-batch comes out while the next shard is already fetched; the worker never holds more than its
    blocks and the ones ahead."""
    import threading

    from shards import fetch

    fetched, released = [], threading.Event()
    real = fetch.ShardStore.whole

    def whole(self, name):
        fetched.append(name)
        return real(self, name)

    monkeypatch.setattr(fetch.ShardStore, "whole", whole)
    s = ShardStream(StreamSpec(url=synthetic_url, split="unlabeled", batch_size=4, retries=RETRIES, shuffle_block=1,
                               readahead=1, loader_workers=0), whole_shards(synthetic_url))
    first_shard = s.plan.blocks(0).shards[0][0]
    next(s)
    deadline = time.monotonic() + 5
    while len(fetched) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetched[:2] == [first_shard, s.plan.blocks(0).shards[1][0]], fetched
    cache = fetch.ReadAhead(lambda name: released.wait(5) and name, threads=2)
    cache.want("abc")
    cache.retain("bc")
    assert list(cache.held) == ["b", "c"]
    released.set()
    assert cache.get("c") == "c"
    cache.close()


def test_each_shard_is_hashed_once_per_worker_and_run(synthetic_url, monkeypatch):
    """Whole shards: epochs after the first trust what the first verified, no shard is hashed twice."""
    from shards import fetch

    hashed = Counter()
    real = fetch.hashlib.sha256

    def counting(data):
        hashed[len(data)] += 1
        return real(data)

    monkeypatch.setattr(fetch.hashlib, "sha256", counting)
    s = ShardStream(StreamSpec(url=synthetic_url, split="labeled", batch_size=4, retries=RETRIES, loader_workers=0),
                    whole_shards(synthetic_url))
    shards_in_split = len(s.infos)
    for _ in range(3 * s.batches_per_epoch()):  # three epochs
        next(s)
    assert sum(hashed.values()) == shards_in_split


@pytest.mark.parametrize("sample_run", [1, 4])
def test_an_epoch_reads_each_sample_once_over_all_ranks_and_loader_workers(synthetic_url, tmp_path, monkeypatch,
                                                                          sample_run):
    """2 ranks x 2 loader workers (forked processes) over one epoch: the byte ranges asked of storage cover
    every consumed sample's exactly once, and no shard is read whole; in runs of 4 neighbours, a run is one
    range."""
    from fsspec.implementations.local import LocalFileSystem

    calls = tmp_path / "reads.txt"
    ranges, cat_file = LocalFileSystem.cat_ranges, LocalFileSystem.cat_file

    def logged_ranges(self, paths, starts, ends, **kw):
        with open(calls, "a") as f:  # forked loader workers append to the same file
            f.writelines(f"{os.path.basename(p)} {a} {b}\n" for p, a, b in zip(paths, starts, ends))
        return ranges(self, paths, starts, ends, **kw)

    def logged_file(self, path, start=None, end=None, **kw):  # cat_ranges calls it per range
        if path.endswith(".tar") and start is None and end is None:
            with open(calls, "a") as f:
                f.write(f"{os.path.basename(path)} whole\n")
        return cat_file(self, path, start, end, **kw)

    monkeypatch.setattr(LocalFileSystem, "cat_ranges", logged_ranges)
    monkeypatch.setattr(LocalFileSystem, "cat_file", logged_file)
    streams = [ShardStream(StreamSpec(url=synthetic_url, split="unlabeled", batch_size=4, global_batch=16,
                                      retries=RETRIES, rank=r, world_size=2, loader_workers=2,
                                      sample_run=sample_run)) for r in range(2)]
    for s in streams:
        for _ in range(s.batches_per_epoch()):
            next(s)
        s.close()
    ranges = open(calls).read().split("\n")[:-1]
    assert not [r for r in ranges if r.endswith("whole")]
    plan = streams[0].plan
    offsets = {info.name: info.offsets for info in plan.infos}
    reads = []  # each range as the samples it holds
    for line in ranges:
        name, start, end = line.split()
        first, last = offsets[name].index(int(start)), offsets[name].index(int(end))
        reads += [f"{name} {offsets[name][i]} {offsets[name][i + 1]}" for i in range(first, last)]
    consumed = plan.order(0)[:plan.steps_per_epoch * 16]
    expected = sorted(f"{plan.infos[s].name} {plan.infos[s].offsets[i]} {plan.infos[s].offsets[i + 1]}"
                      for s, i in consumed.tolist())
    assert not Counter(expected) - Counter(reads)  # every consumed sample read
    # and nothing else, but for what ran ahead when the streams stopped: each loader worker's DataLoader
    # prefetch (2 micro-batches) and read-ahead (1), of 4 samples, on 2 ranks x 2 workers; reading every
    # sample on every worker would be 4 x 416
    assert sum((Counter(reads) - Counter(expected)).values()) <= 2 * 2 * (2 + 1) * 4
    assert len(ranges) <= len(reads) / (2 if sample_run == 4 else 1)  # runs split only at shard ends and batches


def test_s3_at_a_distance_streams_the_same_batches(s3, synthetic_url, tmp_path, monkeypatch):
    """bench/tcp_proxy.py in front of the S3 server: every request waits its latency and a large object its
    bandwidth, and shards read through it (read ahead) stream exactly what the local shards do."""
    import s3fs

    from conftest import TcpFront

    fsspec.filesystem("s3").put(synthetic_url + "/", "test/far/", recursive=True)
    front = TcpFront(s3.port, str(tmp_path / "front.log"), latency_ms=40, bandwidth_mbps=2)
    front.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{front.port}")
        s3fs.S3FileSystem.clear_instance_cache()
        far = fsspec.filesystem("s3")
        far.cat_file("test/far/manifest.json")  # the connection is open: what follows is per request
        started = time.monotonic()
        far.cat_file("test/far/manifest.json")
        assert time.monotonic() - started >= 0.04
        big = max(far.find("test/far"), key=lambda p: far.size(p))
        started = time.monotonic()
        far.cat_file(big)
        assert time.monotonic() - started >= far.size(big) / 2e6
        remote = stream_all("s3://test/far", "unlabeled", batch_size=8, loader_workers=2, readahead=2)
        here = stream_all(synthetic_url, "unlabeled", batch_size=8, loader_workers=2, readahead=0)
        assert [b["keys"] for b in remote] == [b["keys"] for b in here]  # reading ahead changes no order
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(remote, here))
    finally:
        front.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def shard_gets(moto_log: str) -> Counter:
    """Whole-object (200) and byte-range (206) GETs of tar objects in the S3 server's request log."""
    lines = re.findall(r'"GET /\S+\.tar HTTP/1\.1" (200|206)', open(moto_log).read())
    return Counter(lines)


def test_a_node_cache_reads_each_shard_once_a_node_and_streams_the_same_batches(s3, synthetic_url, tmp_path):
    """Two ranks x 2 loader workers of one node share a node cache: each shard is read whole from S3 once
    (however many processes want it), the samples stream exactly as from local shards, and once the node
    holds the shards an epoch reads nothing from the store."""
    fsspec.filesystem("s3").put(synthetic_url + "/", "test/cached/", recursive=True)
    cache, moto_log = str(tmp_path / "node-cache"), str(tmp_path / "moto.log")
    kw = dict(batch_size=4, global_batch=8, world_size=2, loader_workers=2, node_cache=cache,
              node_cache_bytes=2**30)
    here = [stream_all(synthetic_url, "unlabeled", batch_size=4, global_batch=8, world_size=2, rank=r)
            for r in range(2)]
    before = shard_gets(moto_log)
    for warm in (False, True):
        far = [stream_all("s3://test/cached", "unlabeled", rank=r, **kw) for r in range(2)]
        assert [[b["keys"] for b in rank] for rank in far] == [[b["keys"] for b in rank] for rank in here]
        assert all(torch.equal(a["image"], b["image"]) for r in range(2) for a, b in zip(far[r], here[r]))
        gets = shard_gets(moto_log) - before
        if not warm:
            time.sleep(1)  # downloads still running when the streams stopped finish in the background
            shards = read_manifest(Storage(synthetic_url, retries=RETRIES))["splits"]["unlabeled"]["shards"]
            cached = sorted(os.listdir(cache))
            assert cached == sorted(f"{s['sha256'][:32]}-{s['name'].replace('/', '_')}" for s in shards)  # no .part
            assert shard_gets(moto_log)["200"] - before["200"] == len(shards)  # each whole once, not once a worker
            before = shard_gets(moto_log)
        else:
            assert not gets  # a warm node reads its shards from disk


def test_a_node_cache_keeps_to_its_limit_and_leaves_a_download_to_the_process_that_claimed_it(
        s3, synthetic_url, tmp_path):
    """Past its limit the least recently used shards leave; a shard another process is downloading is read
    from the store meanwhile (not downloaded twice), and a claim left by a dead process is taken over."""
    fsspec.filesystem("s3").put(synthetic_url + "/", "test/cached/", recursive=True)
    shards = read_manifest(Storage(synthetic_url, retries=RETRIES))["splits"]["unlabeled"]["shards"]
    sizes = [os.path.getsize(os.path.join(synthetic_url, s["name"])) for s in shards]
    cache = tmp_path / "node-cache"
    limit = max(sizes) * 2
    claimed = NodeCache(str(cache), limit)
    held, stale = shards[0], shards[1]
    open(claimed.path(held["name"], held["sha256"]) + ".part", "wb").close()  # another process downloading
    dead = claimed.path(stale["name"], stale["sha256"]) + ".part"
    open(dead, "wb").close()
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    far = stream_all("s3://test/cached", "unlabeled", batch_size=4, loader_workers=0, node_cache=str(cache),
                     node_cache_bytes=limit)
    here = stream_all(synthetic_url, "unlabeled", batch_size=4)
    assert [b["keys"] for b in far] == [b["keys"] for b in here]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(far, here))
    time.sleep(1)
    left = {e.name: e.stat().st_size for e in os.scandir(cache)}
    assert sum(size for name, size in left.items() if not name.endswith(".part")) <= limit
    assert 0 < len([n for n in left if not n.endswith(".part")]) < len(shards)
    assert os.path.basename(claimed.path(held["name"], held["sha256"])) + ".part" in left  # left to its owner
    assert os.path.basename(dead) not in left  # taken over and published (or since evicted)


def test_a_node_cache_folder_that_cannot_be_made_is_a_warning_and_the_store_is_read(s3, synthetic_url, tmp_path,
                                                                                   caplog):
    fsspec.filesystem("s3").put(synthetic_url + "/", "test/cached/", recursive=True)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    far = stream_all("s3://test/cached", "unlabeled", batch_size=4, node_cache=str(not_a_folder / "cache"),
                     node_cache_bytes=2**30)
    assert [b["keys"] for b in far] == [b["keys"] for b in stream_all(synthetic_url, "unlabeled", batch_size=4)]
    assert "data.node_cache" in caplog.text and "unusable on this node" in caplog.text


@pytest.mark.parametrize("preset,classes", [("textures", 7), ("textures-hard", 11)])
def test_texture_scenes_are_real_pixels_with_exact_masks_and_reproducible(tmp_path, preset, classes):
    """The study sets of real pixels: scikit-image's textures cut into shapes. Built twice, byte for byte
    the same; every mask pixel names a class, and each object class appears."""
    outs = []
    for attempt in ("a", "b"):
        out = str(tmp_path / attempt)
        r = run_cli("shards", "build", "--source", preset, "--train-images", "48", "--val-images", "16",
                    "--image-size", "32", "--labeled", "1/4", "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        outs.append(read_manifest(Storage(out, retries=RETRIES)))
    assert outs[0]["splits"] == outs[1]["splits"]  # same shard checksums
    assert len(outs[0]["classes"]) == classes and outs[0]["classes"][0] == "background"
    batches = stream_all(str(tmp_path / "a"), "val", batch_size=8)
    masks = torch.cat([b["mask"] for b in batches])
    assert masks.max() < classes and len(masks.unique()) > classes // 2
    images = torch.cat([b["image"] for b in batches])
    assert images.std() > 0.2  # textured, not flat


def test_exemplar_pretraining_set_is_reproducible_and_shares_no_image_with_the_study_sets():
    """Pretraining data for the studies' backbone (shards/exemplars.py): the same bytes from the same seed,
    every class `views` views of one patch, and no source image is (a crop or rescale of) an image the
    texture study sets cut their classes or backgrounds from."""
    from shards import exemplars, textures
    a, labels = exemplars.exemplar_set(12, 3, 32, seed=0)
    b, _ = exemplars.exemplar_set(12, 3, 32, seed=0)
    assert a.shape == (36, 32, 32, 3) and np.array_equal(a, b) and labels.tolist() == sorted(list(range(12)) * 3)
    assert not np.array_equal(a, exemplars.exemplar_set(12, 3, 32, seed=1)[0])

    def thumbnail(image):  # grey 32 x 32, zero mean, unit norm: a correlation of 1 means the same picture
        grey = np.asarray(Image.fromarray(image.mean(axis=2).astype(np.uint8)).resize((32, 32)), np.float32)
        grey -= grey.mean()
        return grey / (np.linalg.norm(grey) + 1e-6)

    # a scene's mask names, at every pixel, the class of the view its pixel came from (views painted by class)
    painted, rng = np.repeat(labels, 32 * 32 * 3).reshape(a.shape).astype(np.uint8), np.random.default_rng(0)
    scenes = [exemplars.exemplar_scene(painted, labels, rng) for _ in range(20)]
    assert all(np.array_equal(image[..., 0], mask) for image, mask in scenes)
    assert max(len(np.unique(mask)) for _, mask in scenes) >= 3  # objects of other classes laid over the background

    study = {name for preset in textures.PRESETS.values() for name in preset.objects + preset.backgrounds}
    for source in exemplars.SOURCES:
        assert source not in study
        for name in study:
            similarity = float((thumbnail(exemplars.source_image(source)) * thumbnail(textures._texture(name, False))).sum())
            assert similarity < 0.9, (source, name, similarity)


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_a_pretrained_backbone_loads_through_model_pretrained(tmp_path, task):
    """bench/pretrain_backbone.py's weights, either task: learnt (held-out views classified, or held-out
    scenes' pixels labelled, above chance) and loaded by `model.pretrained` into the segmenter's backbone as
    they were saved."""
    from bench.pretrain_backbone import parse, pretrain
    from trainer.config import load_config
    from trainer.loop import load_model
    path = str(tmp_path / "tiny.pt")
    figures = pretrain(parse(["--task", task, "--classes", "8", "--views", "6", "--steps", "60", "--batch", "16"]),
                       path)
    assert figures["held_out_accuracy"] > 2 * figures["chance"], figures
    saved = torch.load(path, weights_only=True)
    cfg = load_config("configs/cpu-small.yaml", [f"model.pretrained={path}"])
    model = load_model(cfg, num_classes=5)
    assert torch.equal(model.backbone.layer4[0].conv2.weight, saved["layer4.0.conv2.weight"])
    assert not torch.equal(load_model(load_config("configs/cpu-small.yaml", []), 5).backbone.conv1.weight,
                           saved["conv1.weight"])
