"""One typed config for a run, loaded from YAML and overridden by `--set dotted.key=value`.

Passed down whole (torchtitan-style); every option of the method (docs/method.md) is a field here with its
default.
Unknown keys, wrong types and impossible values are `BadInput` naming the dotted key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Literal, Optional, Union

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shards import order
from shards.errors import BadInput
from shards.storage import Storage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GlobalBatch(_Strict):
    labeled: int = Field(ge=1)
    unlabeled: int = Field(ge=1)


class DataConfig(_Strict):
    url: str = "data/synthetic"
    storage_options: dict = Field(default_factory=dict, description="fsspec options, e.g. endpoint, key")
    crop_size: int = Field(64, ge=8)
    scale_min: float = Field(0.5, gt=0)
    scale_max: float = Field(2.0, gt=0)
    flip: bool = True
    photometric: bool = True
    # the most one worker's micro-batch holds; a worker's share of the global batch above that accumulates
    labeled_batch_size: int = Field(8, ge=1)
    unlabeled_batch_size: int = Field(8, ge=1)
    # samples per optimiser step over all workers, the same at any worker count (null: the batch sizes above
    # times the most workers the run allows): the optimiser and the schedule see one batch however it is split
    global_batch: Optional[GlobalBatch] = None
    val_batch_size: int = Field(8, ge=1)
    loader_workers: int = Field(1, ge=0)
    # shards whose samples are shuffled together (a shard set without per-sample offsets holds about twice
    # that in memory a loader worker)
    shuffle_block: int = Field(4, ge=1)
    # samples shuffled in runs of this many neighbours of one shard, each run one read of a remote store (1:
    # every sample on its own, what the studies ran on; a micro-batch's size in runs: one request a
    # micro-batch). A run's samples always share a micro-batch: build the shards shuffled if neighbours are alike
    sample_run: int = Field(1, ge=1)
    allow_pipe: bool = False  # `pipe:` URLs run shell commands: only on explicit opt-in
    retries: int = Field(5, ge=0)
    # what each loader worker fetches while it decodes: its next micro-batches by byte range, or (a shard
    # set without per-sample offsets) its next shards; memory: readahead + 1 of them
    readahead: int = Field(1, ge=0)
    # fetch each micro-batch's samples by byte range (each sample read once an epoch over all ranks and
    # loader workers), or whole shards (every loader worker reads every shard of its blocks: fewer requests,
    # ranks x loader workers times the bytes)
    byte_ranges: bool = True
    # a folder on each node's local disk for its copy of remote shards: each shard read whole once a node (in
    # the background), checked once, and shared by the node's ranks and loader workers, which read their
    # samples from it by byte range; least recently used shards leave past node_cache_gb. null: no copy
    node_cache: Optional[str] = None
    node_cache_gb: float = Field(20.0, gt=0)

    @field_validator("node_cache")
    @classmethod
    def _node_cache_is_a_local_folder(cls, value):
        # each worker makes it on its own node: a URL or a path relative to a worker's working directory
        # would make a folder nobody meant
        if value is not None and ("://" in value or not value.startswith("/")):
            raise ValueError("expected an absolute path on each node's local disk, not a URL or relative path")
        return value

    @model_validator(mode="after")
    def _scale_order(self):
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must be <= scale_max")
        return self


class ModelConfig(_Strict):
    backbone: Literal["tiny", "resnet18", "resnet50", "resnet101"] = "tiny"
    output_stride: Literal[8, 16] = 16
    pretrained: Optional[str] = None  # torchvision-format ResNet state dict: path or fsspec URL
    aspp_channels: int = Field(256, ge=8)
    decoder_channels: int = Field(256, ge=8)
    aspp_rates: tuple[int, int, int] = (6, 12, 18)  # at output stride 16; doubled at 8
    sync_bn: bool = True


class MITransConfig(_Strict):
    enabled: bool = True
    reduction: int = Field(2, ge=1)


class PairingConfig(_Strict):
    # in_batch: each unlabeled image pairs within its worker's labeled batch; service: with the best match
    # in the pairing service's bank of recent labeled samples from all workers (trainer/pairing/); worker:
    # a bank of every worker's labeled samples kept in each worker's process (no service), the same on every
    # rank, checkpointed and rebuilt on resume (the default: docs/results-suite.md)
    mode: Literal["in_batch", "service", "worker"] = "worker"
    # which labeled partner: the paper's most similar, or random (the measured best: docs/results-partners.md),
    # or least similar (ablation: does similarity matter?); or by class (docs/results-pairing.md): `complement`,
    # the partner whose mask holds the classes the unlabeled image's prediction lacks; `need`, partners drawn
    # by how badly the model does on their classes (the service keeps a running per-class IoU that workers
    # report; in-batch, the step's labeled batch). Both draw from softmax(score / temperature)
    similarity: Literal["most", "random", "least", "complement", "need"] = "need"
    topk: int = Field(1, ge=1)
    temperature: float = Field(0.1, gt=0)
    bank_size: int = Field(1024, ge=1)
    deadline_s: float = Field(0.05, gt=0)  # a later answer is dropped: that step pairs in-batch
    max_restarts: int = Field(10, ge=-1)  # of the service actor after a crash (-1: no limit)


class GuidedMixConfig(_Strict):
    # The defaults are the variant that beats supervised-only in docs/results.md; each line says what the
    # paper does instead (docs/method.md), reachable with bench/ssl_ablation.py's PAPER overrides.
    lam_max: float = Field(0.5, gt=0, lt=1)
    # paste a box of the labeled reference (CutMix-style: its mask is known there, so decoupling is exact),
    # its pixels of whole classes up to lam_max of the image (`class`, ClassMix-style), or the paper's global
    # interpolation `interp`
    mix: Literal["interp", "region", "class"] = "region"
    decouple_with: Literal["gt", "prediction"] = "gt"
    teacher: Literal["self", "ema"] = "self"
    ema_decay: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(0.8, ge=0, le=1)  # confidence threshold of pseudo masks; the paper has none (0)
    # `adaptive`: per-class thresholds that follow the model's learning status of each class (FreeMatch;
    # trainer/guidedmix.py AdaptiveThresholds) in place of tau, their moving averages at this momentum (FreeMatch
    # has 0.999 over a million steps; 0.99 follows a run of a few thousand)
    threshold: Literal["fixed", "adaptive"] = "fixed"
    threshold_momentum: float = Field(0.99, ge=0, lt=1)
    # besides pixels above tau, teach each predicted class's most confident share (class-balanced). Off by
    # default, as the paper: it helped on the synthetic set it was tuned on and lowered the gain on every
    # other set measured (docs/results-suite.md, docs/results-class-balanced.md)
    class_keep: float = Field(0.0, ge=0, le=1)
    # no class taught beyond its share of the labeled pixels (the labeled batch's): a confident teacher
    # otherwise teaches the unlabeled pixels mostly background (89-99% where the truth has 73-80%)
    class_cap: bool = False
    # teach a class on unlabeled pixels only once it is earned: the model's confident (>= tau) predictions
    # of it on the step's labeled batch are right at least this often (0: every class taught)
    earn_precision: float = Field(0.0, ge=0, le=1)
    # distribution alignment (ReMixMatch): the teacher's clean view rescaled per class towards the labeled
    # batch's class shares before its confident pixels are taught
    align: bool = False
    # the mixed view's loss averaged over its taught pixels, or over all pixels (FixMatch, UniMatch): then it
    # shrinks with what the teacher is sure of instead of weighing a few taught pixels as much as many
    loss_over: Literal["taught", "all"] = "taught"
    unsup_weight: float = Field(1.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    rampup_steps: int = Field(300, ge=0)
    # which views learn: the paper's both, or only the mixed view from the clean one (authors' code)
    unsup_loss: bool = False
    mix_loss: bool = True
    # the mixed view's target on x_u's share: the clean view's argmax, or its soft prediction (paper)
    mix_target: Literal["soft", "hard"] = "hard"
    shared_bn: bool = False  # one encoder pass per batch, or one over [labeled; unlabeled] (the paper)
    strong_aug: bool = True  # perturb the student's unlabeled view (colour, grey, blur, noise) before mixing
    mitrans: MITransConfig = Field(default_factory=MITransConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)


class UniMatchConfig(_Strict):
    """`train.method: unimatch` (trainer/unimatch.py), as UniMatch's reference implementation trains it:
    unlabeled images teach their two strongly perturbed, CutMix-ed views and a feature-perturbed one."""

    tau: float = Field(0.95, ge=0, le=1)  # UniMatch's fixed confidence threshold
    cutmix_p: float = Field(0.5, ge=0, le=1)  # the chance that a strong view gets a box of another image
    feature_dropout: float = Field(0.5, ge=0, lt=1)  # channel dropout of the feature-perturbed view


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    head_lr_mult: float = Field(1.0, gt=0)
    # the gradients' global norm capped at this before each optimiser step, by either engine; 0: none, as the
    # paper and UniMatch train (DeepSpeed's own default, 1.0, would clip where the plain engine does not)
    clip_grad_norm: float = Field(0.0, ge=0)


class EvalConfig(_Strict):
    mode: Literal["whole", "slide"] = "whole"
    window: int = Field(512, ge=8)
    stride: int = Field(341, ge=1)
    flip: bool = False
    max_batches: Optional[int] = Field(None, ge=1)


class TrainConfig(_Strict):
    method: Literal["guidedmix", "unimatch", "supervised"] = "guidedmix"
    steps: int = Field(1000, ge=1)
    seed: int = 0
    # N, or "MIN:MAX": elastic, Ray Train starts with what it has of MAX (at least MIN) and regrows the group
    workers: Union[int, str] = 2
    # elastic: how often Ray Train looks for returned capacity to regrow the group (each regrowth is a restart)
    resize_check_s: float = Field(60.0, gt=0)
    use_gpu: Optional[bool] = None  # None: detect from the cluster
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_every: int = Field(500, ge=1)
    ckpt_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    max_failures: int = Field(3, ge=0)
    engine: Literal["deepspeed", "plain"] = "deepspeed"  # plain: one process, no DeepSpeed (studies, benches)
    ledger: bool = False  # record every consumed sample key, to prove nothing is lost or repeated
    overlays: int = Field(4, ge=0)  # val overlays kept at each evaluation (TensorBoard, MLflow, overlays/)
    tensorboard: bool = True  # event files under <out>/tensorboard/ (trainer/tracking.py)
    # outside Ray only (inside Ray, each node's metrics agent serves them): a Prometheus endpoint, 0 = none
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("workers")
    @classmethod
    def _workers(cls, value):
        low, high = _worker_range(value)
        if not 1 <= low <= high:
            raise ValueError("expected N >= 1 or MIN:MAX with 1 <= MIN <= MAX")
        return value if isinstance(value, int) or low < high else low

    @property
    def worker_range(self) -> tuple[int, int]:
        return _worker_range(self.workers)

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range
        return low < high


def _worker_range(value) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError("expected N or MIN:MAX")
    if isinstance(value, int):
        return value, value
    low, sep, high = str(value).partition(":")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise ValueError("expected N or MIN:MAX") from None


class Config(_Strict):
    out: str = "runs/latest"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    guidedmix: GuidedMixConfig = Field(default_factory=GuidedMixConfig)
    unimatch: UniMatchConfig = Field(default_factory=UniMatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def digest(self, root: Optional[str] = None) -> str:
        """A short hash of the resolved config, for the run's info metric and summary. Paths under `root` count
        from it, so that where a checkout lies is no part of the hash."""
        text = json.dumps(self.public_dict(), sort_keys=True)
        if root:
            text = text.replace(json.dumps(os.path.join(root, ""))[1:-1], "")
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def public_dict(self, drop_secrets: bool = False) -> dict:
        """The resolved config without secrets, fit for summary.json and logs: every secret-looking key of
        `storage_options`, at any depth, masked as `***`, or dropped where the config must stay loadable (a
        checkpoint's, and what Ray Train carries: credentials then come from the environment)."""
        data = self.model_dump()
        data["data"]["storage_options"] = _without_secrets(data["data"]["storage_options"], drop_secrets)
        return data

    def storage(self, url: Optional[str] = None) -> Storage:
        """Where `url` lives (default: the data) reached as the config says: `data.storage_options` and
        `data.retries` go with every read and write of a run, its data, checkpoints and outputs alike."""
        return Storage(self.data.url if url is None else url, dict(self.data.storage_options), self.data.retries)

    def secret_keys(self) -> list[str]:
        """Dotted names of the credentials this config holds (in `data.storage_options`, at any depth)."""
        return _secret_paths(self.data.storage_options, "data.storage_options")

    @model_validator(mode="after")
    def _compatible(self):
        if self.guidedmix.teacher == "ema" and self.train.zero_stage == 3:
            raise ValueError("guidedmix.teacher=ema needs whole parameters; use train.zero_stage <= 2")
        low, high = self.train.worker_range
        for split in ("labeled", "unlabeled"):
            total = self.global_batch(split)
            if total < high or not any(total % world == 0 for world in range(low, high + 1)):
                raise ValueError(f"data.global_batch.{split}: {total} is divisible by none of {low} to {high} workers "
                                 f"(train.workers {self.train.workers})")
        steps = {split: self.micro_steps(split, high) for split in ("labeled", "unlabeled")}
        if self.train.method != "supervised" and steps["labeled"] != steps["unlabeled"]:
            raise ValueError(f"data.global_batch: labeled and unlabeled need the same number of micro-batches per "
                             f"worker ({steps['labeled']} and {steps['unlabeled']} at {high} workers)")
        return self

    def global_batch(self, split: str) -> int:
        """Samples of a split per optimiser step over all workers."""
        if self.data.global_batch is not None:
            return getattr(self.data.global_batch, split)
        return getattr(self.data, f"{split}_batch_size") * self.train.worker_range[1]

    def micro_steps(self, split: str, world: int) -> int:
        """Micro-batches a worker accumulates per optimiser step at this world size (see shards/order.py)."""
        return order.layout(self.global_batch(split), world, getattr(self.data, f"{split}_batch_size"),
                            f"data.global_batch.{split}").micro_steps


# Key names that carry credentials in fsspec's filesystems: s3fs (key, secret, token, client_kwargs'
# aws_secret_access_key, aws_session_token), gcsfs (token), adlfs (account_key, sas_token, client_secret,
# connection_string), http (auth, headers' Authorization).
_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "auth", "connection_string")
MASK = "***"


def is_secret(key) -> bool:
    key = str(key).lower()
    return any(word in key for word in _SECRET_WORDS)


def _without_secrets(value, drop: bool):
    if isinstance(value, dict):
        return {k: (MASK if is_secret(k) else _without_secrets(v, drop)) for k, v in value.items()
                if not (drop and is_secret(k))}
    if isinstance(value, (list, tuple)):
        return [_without_secrets(v, drop) for v in value]
    return value


def _secret_paths(value, prefix: str) -> list[str]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [p for k, v in items for p in ([f"{prefix}.{k}"] if is_secret(k) else _secret_paths(v, f"{prefix}.{k}"))]


# Where credentials go instead of a command line or the config that Ray carries.
CREDENTIALS_HELP = ("give credentials through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), a "
                    "credentials file (AWS_SHARED_CREDENTIALS_FILE) or, under KubeRay, a Secret")


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"config: {loc}: {msg}"


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors' aliases: a config has no use for them, and nested aliases expand exponentially
    (a "YAML bomb") or make a structure that contains itself."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


# YAML 1.1's base-60 numbers read `workers: 2:8` as 128; YAML 1.2 dropped them, and so do configs here
def _without_base_60(regex: re.Pattern) -> re.Pattern:
    head, body = regex.pattern.split("(?:", 1)
    kept = [alt for alt in body[:-2].split("|") if "(?::[0-5]?[0-9])" not in alt]
    return re.compile(f"{head}(?:{'|'.join(kept)})$", regex.flags)


_NoAliasLoader.yaml_implicit_resolvers = {
    first: [(tag, _without_base_60(regex) if tag.endswith((":int", ":float")) else regex) for tag, regex in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _yaml(text):
    return yaml.load(text, Loader=_NoAliasLoader)


def _parse_value(text: str):
    """`--set` values are YAML scalars: 3, 0.5, true, null, [1, 2], or plain strings."""
    try:
        return _yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {item!r}: expected dotted.key=value")
        if any(is_secret(part) for part in key.split(".")):
            # never echo the value: it is the secret
            raise BadInput(f"--set {key.strip()}: a command line is visible to every user of the machine and "
                           f"to Ray's dashboard; {CREDENTIALS_HELP}")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BadInput(f"--set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    raw: dict = {}
    if path:
        try:
            with fsspec.open(path, "r") as f:
                raw = _yaml(f) or {}
        except FileNotFoundError:
            raise BadInput(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            problem = getattr(e, "problem", None) or "syntax"
            raise BadInput(f"config file {path}{where}: not valid YAML ({problem})") from None
        if not isinstance(raw, dict):
            raise BadInput(f"config file {path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise BadInput(_first_error(e)) from None
