"""Decoded + augmented samples per second: WebDataset shards on local disk, the same shards from an S3
server on loopback (moto_server), and the usual per-file loader (a torch Dataset opening each image and
mask with PIL, as UniMatch and the authors' code do). Same images (JPEG + PNG masks), same augmentation,
same loader worker count, in one run. Prints one JSON object as the last line.

    .venv/bin/python bench/data_pipeline.py [--images 2000] [--size 320] [--workers 2] [--batches 100]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from shards import ShardStream, StreamSpec, augment, build, sources, synthetic  # noqa: E402


def write_folder(root: str, count: int, size: int) -> None:
    """A folder-layout dataset of JPEG images and PNG masks (synthetic shapes at this size)."""
    os.makedirs(f"{root}/val/images")
    os.makedirs(f"{root}/val/masks")
    open(f"{root}/classes.txt", "w").write("\n".join(synthetic.CLASSES) + "\n")
    for split, n in (("train", count), ("val", 2)):
        os.makedirs(f"{root}/{split}/images", exist_ok=True)
        os.makedirs(f"{root}/{split}/masks", exist_ok=True)
        for i in range(n):
            image, mask = synthetic.make_sample(size, np.random.default_rng([i, len(split)]))
            Image.fromarray(image).save(f"{root}/{split}/images/{i:06d}.jpg", quality=90)
            Image.fromarray(mask).save(f"{root}/{split}/masks/{i:06d}.png")


class PerFileDataset(Dataset):
    """The usual loader: one image file and one mask file per sample, decoded and augmented."""

    def __init__(self, root: str, crop: int):
        self.items = sorted(n[:-4] for n in os.listdir(f"{root}/train/images"))
        self.root, self.crop = root, crop

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name = self.items[i]
        image = np.asarray(Image.open(f"{self.root}/train/images/{name}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(f"{self.root}/train/masks/{name}.png"))
        rng = np.random.default_rng([0, zlib.crc32(name.encode())])
        image, mask = augment.train_augment(image, mask, rng, self.crop, 0.5, 2.0, True, True)
        return augment.to_tensor(image), augment.mask_tensor(mask)


def rate(batches, count: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)  # start-up (worker spawn, first shard) is not throughput
    t0 = time.perf_counter()
    for _ in range(count):
        next(it)
    return count * batch_size / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="gm-data-bench-")
    write_folder(f"{tmp}/folder", args.images, args.size)
    # all train images labeled, so every loader reads image + mask for every sample
    build.build(sources.folder(f"{tmp}/folder"), f"{tmp}/shards", args.images, samples_per_shard=128,
                progress=False)
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        import fsspec

        for _ in range(100):
            try:
                fs = fsspec.filesystem("s3", skip_instance_cache=True)
                fs.mkdir("bench")
                break
            except Exception:
                time.sleep(0.2)
        fs.put(f"{tmp}/shards/", "bench/shards/", recursive=True)

        def shard_stream(url):
            return ShardStream(StreamSpec(url, "labeled", args.batch, loader_workers=args.workers,
                                          crop_size=args.crop))

        per_file = DataLoader(PerFileDataset(f"{tmp}/folder", args.crop), batch_size=args.batch, shuffle=True,
                              num_workers=args.workers, drop_last=True)
        result = {
            "shards_local": rate(shard_stream(f"{tmp}/shards"), args.batches, args.batch),
            "shards_s3": rate(shard_stream("s3://bench/shards"), args.batches, args.batch),
            "per_file": rate(per_file, args.batches, args.batch),
        }
    finally:
        server.terminate()
        server.wait(10)
    samples = {k: round(v, 1) for k, v in result.items()}
    print(json.dumps({"samples_per_s": samples,
                      "local_over_per_file": round(result["shards_local"] / result["per_file"], 2),
                      "s3_over_local": round(result["shards_s3"] / result["shards_local"], 2),
                      "images": args.images, "size": args.size, "crop": args.crop, "loader_workers": args.workers,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
