"""`guidedmix sweep`: a grid of named override lists x seeds on Ray Tune, every trial a normal single-process
training run (plain engine, one thread, one CPU of the cluster) whose outputs land under
`<out>/trials/<key>/` (Ray Tune's own records under `<out>/tune/` where `--out` is local). The key hashes
the code (shards/, trainer/) and the trial's resolved config, so a finished trial is not rerun while neither changes, and any change to either runs it afresh. At the end
`<out>/sweep.md` and `<out>/sweep.json` hold the table: every variant's mIoU per seed, its mean, and its gain
over the first variant on the same seeds.

grid.yaml maps a variant's name to its overrides:

    supervised: [train.method=supervised]
    default: [train.method=guidedmix]
    lighter: [train.method=guidedmix, guidedmix.unsup_weight=0.5]
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import ray
import yaml
from ray import tune

from shards.errors import BadInput
from shards.storage import join, local_path
from trainer import outputs
from trainer.config import Config, load_config
from trainer.loop import WorkerContext, train

from . import console
from .driver import absolute, cluster_address, finished_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Trial:
    variant: str
    seed: int
    config: Config  # resolved, `out` the trial's folder

    @property
    def key(self) -> str:
        return self.config.out.rstrip("/").rsplit("/", 1)[-1]


def code_digest() -> str:
    """A hash of the code a training result depends on."""
    digest = hashlib.sha256()
    for package in ("shards", "trainer"):
        folder = os.path.join(ROOT, package)
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def plan(config: str | None, overrides: list[str], grid: dict[str, list[str]], seeds: list[int],
         out: str) -> list[Trial]:
    """Every variant x seed, resolved and keyed; bad overrides fail here, before anything runs."""
    code, trials = code_digest(), []
    for variant, extra in grid.items():
        for seed in seeds:
            cfg = load_config(config, [*overrides, *extra, f"train.seed={seed}", "train.engine=plain",
                                       "train.workers=1", "train.tensorboard=false", "out=."])
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"url": absolute(cfg.data.url)})})
            # paths inside the checkout (the studies' data and weights) count from its root: two clones or
            # worktrees of one commit find each other's trials
            key = hashlib.sha256((code + cfg.digest(root=ROOT)).encode()).hexdigest()[:16]
            trials.append(Trial(variant, seed, cfg.model_copy(update={"out": join(absolute(out), "trials", key)})))
    return trials


def _run_trial(spec: dict) -> None:
    """One trial inside a Tune worker: the run's summary, trained now or found finished under its folder."""
    import torch

    torch.set_num_threads(1)  # one CPU per trial: trials side by side must not oversubscribe the cores
    logging.getLogger("guidedmix").setLevel(logging.WARNING)
    cfg = Config.model_validate(spec)
    summary = finished_summary(cfg) or train(cfg, WorkerContext())
    tune.report({"miou": summary["miou"]})


class _Progress(tune.Callback):
    """One line per finished trial, with the time left."""

    def __init__(self, trials: list[Trial]):
        self.names = {t.config.out: f"{t.variant} seed {t.seed}" for t in trials}
        self.done, self.started = 0, time.monotonic()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (len(self.names) - self.done)
        miou = trial.last_result.get("miou", float("nan"))
        print(f"[{self.done}/{len(self.names)}] {self.names.get(trial.config.get('out'), '?')}: mIoU "
              f"{100 * miou:.2f} ({elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)", file=sys.stderr, flush=True)


# Ray Tune copies these from the driver's environment into each trial actor's runtime_env, which Ray logs
# (runtime_env_agent.log) and keeps; the trials find them in their node's environment instead, as training's
# workers do (a local Ray started by the sweep inherited them)
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def credentials_withheld():
    saved = {name: os.environ.pop(name) for name in CREDENTIAL_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_trials(trials: list[Trial], parallel: int, address: str | None = None,
               tune_folder: str | None = None) -> list[dict]:
    """Run what is not finished on Ray Tune (`parallel` at a time); every trial's summary, in order. Tune's
    own records (each trial's results and the resolved config it ran) go to `tune_folder`, or to a temporary
    folder removed afterwards: the trials' outputs are what the sweep keeps."""
    todo = {t.key: t for t in trials if finished_summary(t.config) is None}
    if todo:
        temporary = tune_folder is None
        tune_folder = tempfile.mkdtemp(prefix="guidedmix-tune-") if temporary else os.path.abspath(tune_folder)
        address = cluster_address(address)
        ray.init(address=address, num_cpus=None if address else parallel, include_dashboard=False,
                 logging_level=logging.WARNING)
        try:
            tuner = tune.Tuner(
                tune.with_resources(_run_trial, {"cpu": 1}),
                param_space=tune.grid_search([t.config.public_dict(drop_secrets=True) for t in todo.values()]),
                tune_config=tune.TuneConfig(max_concurrent_trials=parallel),
                run_config=tune.RunConfig(name="sweep", storage_path=tune_folder,
                                          verbose=0, callbacks=[_Progress(list(todo.values()))]))
            with contextlib.redirect_stdout(io.StringIO()), credentials_withheld():  # stdout: Tune's pointers
                failed = [r.error for r in tuner.fit() if r.error]
            if failed:
                raise RuntimeError(f"{len(failed)} trials failed; the first: {failed[0]}")
        finally:
            ray.shutdown()
            if temporary:
                shutil.rmtree(tune_folder, ignore_errors=True)
    return [finished_summary(t.config) for t in trials]


def table(trials: list[Trial], summaries: list[dict]) -> dict:
    """Per variant: mIoU per seed (points), mean, and gain over the first variant on the same seeds."""
    miou: dict[str, dict[int, float]] = {}
    for t, s in zip(trials, summaries):
        miou.setdefault(t.variant, {})[t.seed] = round(100 * s["miou"], 2)
    base = next(iter(miou))
    rows = []
    for variant, by_seed in miou.items():
        diffs = [v - miou[base][seed] for seed, v in by_seed.items()]
        rows.append({"variant": variant, "miou": by_seed, "mean": round(statistics.mean(by_seed.values()), 2),
                     "gain": round(statistics.mean(diffs), 2), "worst_seed_gain": round(min(diffs), 2)})
    return {"baseline": base, "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = [f"Made by `{command}`. mIoU in %; gain: the mean difference to `{result['baseline']}` on the same "
             "seeds; worst seed: the lowest of those differences.", "",
             "| variant | mIoU per seed | mean | gain | worst seed |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        seeds = " / ".join(f"{v:.2f}" for v in r["miou"].values())
        gain = "" if r["variant"] == result["baseline"] else f"{r['gain']:+.2f}"
        worst = "" if r["variant"] == result["baseline"] else f"{r['worst_seed_gain']:+.2f}"
        lines.append(f"| {r['variant']} | {seeds} | {r['mean']:.2f} | {gain} | {worst} |")
    return "\n".join(lines) + "\n"


def read_grid(path: str) -> dict[str, list[str]]:
    try:
        with open(path) as f:
            grid = yaml.safe_load(f)
    except FileNotFoundError:
        raise BadInput(f"--grid {path}: no such file") from None
    except yaml.YAMLError as e:
        raise BadInput(f"--grid {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(grid, dict) or not grid or not all(
            isinstance(v, list) and all(isinstance(o, str) for o in v) for v in grid.values()):
        raise BadInput(f"--grid {path}: must map each variant's name to a list of KEY=VALUE overrides")
    return {str(k): v for k, v in grid.items()}


def sweep(args) -> dict:
    overrides = [*args.overrides, *([f"data.url={args.data}"] if args.data else [])]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    trials = plan(args.config, overrides, read_grid(args.grid), args.seeds, args.out)
    out = trials[0].config.storage(args.out)
    with console.quiet(out, args.verbose):
        # Tune's records beside the trials where the sweep's folder is local
        result = table(trials, run_trials(trials, args.parallel, args.address, local_path(join(args.out, "tune"))))
    command = shlex.join(["guidedmix", *sys.argv[1:]])
    out.at("sweep.md").write(markdown(result, command).encode())
    outputs.write_json(out.at("sweep.json"), result)
    return result


def add_command(sub, add_config_args) -> None:
    s = sub.add_parser("sweep", help="a grid of overrides x seeds on Ray Tune; a Markdown and JSON table")
    add_config_args(s)
    s.add_argument("--data", help="shard set URL (overrides data.url)")
    s.add_argument("--grid", required=True, help="YAML: variant name -> list of KEY=VALUE overrides")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--steps", type=int, help="training steps of every trial (overrides train.steps)")
    s.add_argument("--out", required=True, help="sweep folder URL: trials/<key>/, sweep.md, sweep.json")
    s.add_argument("--parallel", type=int, default=2, help="trials at a time (one CPU each)")
    s.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")
    s.set_defaults(func=lambda args: print(json.dumps(sweep(args))) or 0)
