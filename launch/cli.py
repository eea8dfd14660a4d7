"""The `guidedmix` command line. Bad input is one line on stderr and exit 2; other failures exit 1."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from shards import build, sources
from shards.errors import BadInput, BankFailure, StorageFailure
from shards.manifest import read_manifest, summary, verify

from . import commands, console, sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors are bad input too: one line, exit 2
        raise BadInput(f"{self.prog}: {message}")


def _shards_build(args) -> int:
    labeled = build.parse_labeled(args.labeled)
    listed = build.read_list(args.labeled_list) if args.labeled_list else None
    source = sources.open_source(args.source, args.root, synthetic_train=args.train_images,
                                 synthetic_val=args.val_images, synthetic_size=args.image_size, seed=args.seed)
    manifest = build.build(source, args.out, labeled, seed=args.seed, labeled_list=listed,
                           samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
                           args={k: v for k, v in vars(args).items() if k not in ("func",)},
                           progress=not args.quiet, withhold_masks=args.withhold_masks, shuffle=args.shuffle)
    print(json.dumps(summary(manifest)))
    return 0


def _shards_inspect(args) -> int:
    storage = commands.storage_config(args).storage(args.url)
    manifest = read_manifest(storage)
    result = summary(manifest)
    if args.verify:
        problems = verify(storage, manifest)
        result["verified"] = not problems
        result["problems"] = problems
    print(json.dumps(result, indent=1))
    return 0 if not args.verify or not result["problems"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guidedmix", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    shards = sub.add_parser("shards", help="build and inspect WebDataset shard sets")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True, parser_class=_Parser)
    b = shards_sub.add_parser("build", help="dataset layout -> labeled/unlabeled/val shards + manifest")
    b.add_argument("--source", required=True,
                   choices=["voc", "cityscapes", "context", "folder", "synthetic", "textures", "textures-hard"])
    b.add_argument("--root", help="dataset root (not for synthetic)")
    b.add_argument("--out", required=True, help="output URL: path, file://, s3://...")
    b.add_argument("--labeled", required=True, help="labeled images: a count (1464) or fraction (1/16)")
    b.add_argument("--labeled-list", help="file of ids to label exactly (one per line)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--samples-per-shard", type=int, default=256)
    b.add_argument("--overwrite", action="store_true", help="replace a shard set already at --out")
    b.add_argument("--train-images", type=int, default=1200, help="synthetic, textures: train images")
    b.add_argument("--val-images", type=int, default=240, help="synthetic, textures: val images")
    b.add_argument("--image-size", type=int, default=64, help="synthetic, textures: image side in pixels")
    b.add_argument("--withhold-masks", action="store_true",
                   help="studies: keep unlabeled images' true masks (withheld.png), never trained on, to score "
                        "pseudo masks against")
    b.add_argument("--shuffle", action="store_true",
                   help="write the train splits in a seeded random order (for data.sample_run > 1 where the "
                        "source's order groups alike images)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_shards_build)
    i = shards_sub.add_parser("inspect", help="print a shard set's manifest summary as JSON")
    i.add_argument("url")
    i.add_argument("--verify", action="store_true", help="read every shard, check counts and checksums")
    commands.add_config_args(i, reads_storage_only=True)
    i.set_defaults(func=_shards_inspect)

    commands.add_commands(sub)
    sweep.add_command(sub, commands.add_config_args)
    return parser


def one_line(err: BaseException) -> str:
    """The error's own message. One re-raised by a DataLoader carries the worker's traceback: its last line
    is `module.Class: message`."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if len(lines) == 1:
        return lines[0]
    return lines[-1].split(f"{type(err).__name__}: ", 1)[-1]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format=console.LOG_FORMAT)
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        return args.func(args)
    except BadInput as e:
        print(f"guidedmix: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (StorageFailure, BankFailure) as e:  # storage down past the retry budget (a rerun resumes); a bug
        print(f"guidedmix: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("guidedmix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
