"""The input pipeline where it matters: decoded + augmented samples per second, in one run, at the same loader
workers, decode and augmentation, from

- `per_file_s3`: the usual per-file loader (a torch Dataset reading each image and mask object through fsspec,
  as UniMatch- and mmseg-style loaders read a bucket) from S3 at a distance;
- `shards_s3`: WebDataset shards from the same S3 at the same distance (each loader worker reads ahead
  `data.readahead` shards; `shards_s3_no_readahead`: the same without);
- `shards_s3_runs`: the same, the samples shuffled in runs of `--sample-run` neighbours (`data.sample_run`),
  one request a run;
- `shards_s3_node_cache`: the same with a node cache (`data.node_cache`, a fresh folder): each shard read whole
  once, in the background, the samples by byte range from local disk once it is there (the first epoch: the
  measured batches are fewer than an epoch's);
- `whole_shards_s3`: the same shards read whole (`data.byte_ranges=false`): every loader worker reads every
  shard of its blocks, fewer requests and loader workers times the bytes;
- `shards_local`: the shards on local disk;
- `ceiling`: the shards already in memory (`memory://`, inherited by the forked loader workers): the same
  tar parsing, decode, augmentation and collation with no I/O at all, the limit of this CPU.

S3 is moto_server on loopback behind bench/tcp_proxy.py, which delays each response's first byte by
`--latency-ms` and caps each connection at `--bandwidth-mbps` (a real object store's distance). Prints one
JSON object as the last line.

    .venv/bin/python bench/data_pipeline.py [--latency-ms 20] [--bandwidth-mbps 100] [--images 600]
        [--size 320] [--crop 256] [--workers 2] [--batches 60] [--sample-run 8]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zlib

import fsspec
import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import loopback_s3, publish  # noqa: E402
from shards import augment, build, sources, synthetic  # noqa: E402
from shards.stream import ShardStream, StreamSpec  # noqa: E402
from trainer.config import DataConfig  # noqa: E402


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
    """The usual loader: one image object and one mask object per sample, read through fsspec, decoded and
    augmented."""

    def __init__(self, root: str, names: list[str], crop: int):
        self.root, self.names, self.crop = root, names, crop

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        fs, root = fsspec.core.url_to_fs(self.root)
        image = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{root}/train/images/{name}.jpg"))).convert("RGB"))
        mask = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{root}/train/masks/{name}.png"))))
        rng = np.random.default_rng([0, zlib.crc32(name.encode())])
        image, mask = augment.train_augment(image, mask, rng, self.crop, 0.5, 2.0, True, True)
        return augment.to_tensor(image), augment.mask_tensor(mask)


def rate(batches, count: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)  # start-up (worker spawn, first shard) is not throughput
    t0 = time.perf_counter()
    for _ in range(count):
        next(it)
    seconds = time.perf_counter() - t0
    del it  # its loader workers stop here, before the next loader forks
    if isinstance(batches, ShardStream):
        batches.close()
    return count * batch_size / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="megabytes per second per connection")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--sample-run", type=int, default=8, help="data.sample_run of shards_s3_runs")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="gm-data-bench-")
    write_folder(f"{tmp}/folder", args.images, args.size)
    # all train images labeled, so every loader reads image + mask for every sample
    build.build(sources.folder(f"{tmp}/folder"), f"{tmp}/shards", args.images, samples_per_shard=64,
                progress=False)
    with loopback_s3(args.latency_ms, args.bandwidth_mbps) as (near_url, far_url, servers):
        os.environ["AWS_ENDPOINT_URL"] = near_url
        near = fsspec.filesystem("s3", skip_instance_cache=True)  # uploads go around the front
        near.mkdir("bench")
        near.put(f"{tmp}/shards/", "bench/shards/", recursive=True)
        near.put(f"{tmp}/folder/", "bench/folder/", recursive=True)
        memory = fsspec.filesystem("memory")
        memory.put(f"{tmp}/shards/", "/bench/shards/", recursive=True)
        os.environ["AWS_ENDPOINT_URL"] = far_url  # everything measured is far
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()

        def shard_stream(url, readahead=DataConfig().readahead, byte_ranges=True, sample_run=1, node_cache=None):
            return ShardStream(StreamSpec(url=url, split="labeled", batch_size=args.batch,
                                          retries=DataConfig().retries, readahead=readahead,
                                          loader_workers=args.workers, crop_size=args.crop,
                                          byte_ranges=byte_ranges, sample_run=sample_run, node_cache=node_cache,
                                          node_cache_bytes=int(DataConfig().node_cache_gb * 2**30)))

        stores = [psutil.Process(server.pid) for server in servers]

        def store_cpu_seconds() -> float:
            return sum(t.user + t.system for t in (p.cpu_times() for p in stores))

        def measured(name, batches, count):
            """Samples/s, and the CPU seconds the S3 server and its front spent meanwhile: on loopback they
            share this machine's cores with the loaders, which a real object store does not."""
            before = store_cpu_seconds()
            samples_per_s = rate(batches, count, args.batch)
            store_cpu[name] = round(store_cpu_seconds() - before, 1)
            return samples_per_s

        store_cpu: dict = {}
        names = sorted(n[:-4] for n in os.listdir(f"{tmp}/folder/train/images"))
        per_file = DataLoader(PerFileDataset("s3://bench/folder", names, args.crop), batch_size=args.batch,
                              shuffle=True, num_workers=args.workers, drop_last=True)
        result = {
            "ceiling": rate(shard_stream("memory://bench/shards"), args.batches, args.batch),
            "shards_local": rate(shard_stream(f"{tmp}/shards"), args.batches, args.batch),
            "shards_s3": measured("shards_s3", shard_stream("s3://bench/shards"), args.batches),
            "shards_s3_node_cache": measured("shards_s3_node_cache",
                                             shard_stream("s3://bench/shards", node_cache=f"{tmp}/node-cache"),
                                             args.batches),
            "shards_s3_runs": measured("shards_s3_runs", shard_stream("s3://bench/shards", sample_run=args.sample_run),
                                       args.batches),
            "shards_s3_no_readahead": measured("shards_s3_no_readahead",
                                               shard_stream("s3://bench/shards", readahead=0), args.batches),
            "whole_shards_s3": measured("whole_shards_s3", shard_stream("s3://bench/shards", byte_ranges=False),
                                        args.batches),
            # the per-file loader pays the distance per object: a quarter of the batches measure it well
            "per_file_s3": measured("per_file_s3", per_file, max(args.batches // 4, 5)),
        }
    samples = {k: round(v, 1) for k, v in result.items()}
    publish({
        "latency_ms": args.latency_ms, "bandwidth_mbps": args.bandwidth_mbps, "samples_per_s": samples,
        "samples_per_s_per_loader_worker": {k: round(v / max(args.workers, 1), 1) for k, v in result.items()},
        "ratios": {"shards_vs_per_file_s3": round(result["shards_s3"] / result["per_file_s3"], 2),
                   "s3_vs_local_shards": round(result["shards_s3"] / result["shards_local"], 2),
                   "s3_vs_local_shards_node_cache": round(result["shards_s3_node_cache"]
                                                          / result["shards_local"], 2),
                   "s3_vs_local_shards_runs": round(result["shards_s3_runs"] / result["shards_local"], 2),
                   "s3_vs_local_shards_no_readahead": round(result["shards_s3_no_readahead"]
                                                            / result["shards_local"], 2),
                   "s3_vs_local_whole_shards": round(result["whole_shards_s3"] / result["shards_local"], 2),
                   "pipeline_vs_ceiling": round(result["shards_local"] / result["ceiling"], 2)},
        "store_cpu_seconds": store_cpu, "images": args.images, "size": args.size, "crop": args.crop,
        "loader_workers": args.workers, "cores": os.cpu_count(), "sample_run": args.sample_run,
        "readahead_shards": DataConfig().readahead, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
