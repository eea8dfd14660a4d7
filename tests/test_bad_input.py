"""Bad input everywhere, property-based: whatever hypothesis makes of config YAML, `--set` values, shard
manifests and command lines, `guidedmix` answers with one line and exit 2, or goes on to a valid run; never a
traceback, never a hang.

The command runs in this process, for real up to the point where it would start Ray (or train, or build
shards): there a sentinel stops it and the example counts as a valid run. Everything before it (argument
parsing, config loading and validation, URL checks, reading the manifest and a finished run's summary) is the
code users run.
"""
import contextlib
import copy
import io
import json
import os
import tempfile
import time

import pytest
import yaml
from pydantic import BaseModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.cli import main
from trainer.config import Config

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Started(Exception):
    """The command got past every check and would now start Ray, train or build."""


def _start(*args, **kwargs):
    raise Started()


@pytest.fixture(scope="module")
def guidedmix():
    """run(argv) -> "started", or the exit code with stderr checked: one error line, no traceback, quick."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("launch.driver._connect", _start)
        patch.setattr("launch.commands.train", _start)
        patch.setattr("shards.build.build", _start)

        def run(argv):
            err = io.StringIO()
            started = time.monotonic()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except Started:
                    code = "started"
                except SystemExit as e:  # --help
                    code = e.code
            assert time.monotonic() - started < 30, f"{argv}: took {time.monotonic() - started:.0f}s"
            text = err.getvalue()
            assert "Traceback" not in text, text
            if code not in ("started", 0):
                lines = text.strip().splitlines()  # all of stderr: the error line and nothing else
                assert code == 2 and len(lines) == 1 and lines[0].startswith("guidedmix: error: ") \
                    and len(lines[0]) < 400, (argv, code, text)
            return code

        yield run


def _dotted_keys(model=Config, prefix=""):
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += _dotted_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


KEYS = _dotted_keys()
NAMES = sorted({part for key in KEYS for part in key.split(".")})
WEIRD = ["-1", "0", "1e309", "nan", "-inf", "[1, 2]", "{a: 1}", "null", "true", "", "~", "'", "pipe:cat /etc/passwd",
         "ftp://x/y", "s3://", "../../etc", "*", "9" * 40, "{{", "- -"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
           | st.sampled_from(WEIRD))
yaml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@pytest.fixture(scope="module")
def workdir():
    return tempfile.mkdtemp(prefix="guidedmix-badinput-")


@SETTINGS
@given(document=st.dictionaries(st.sampled_from(NAMES), yaml_values, max_size=4) | yaml_values | st.text(max_size=60))
def test_any_config_file(guidedmix, workdir, synthetic_url, document):
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as f:
        f.write(document if isinstance(document, str) else yaml.safe_dump(document))
    guidedmix(["train", "--config", path, "--data", synthetic_url, "--out", os.path.join(workdir, "out")])


@SETTINGS
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=12),
                                    st.sampled_from(WEIRD) | st.text(max_size=20)), max_size=4))
def test_any_set_values(guidedmix, workdir, synthetic_url, overrides):
    argv = ["train", "--data", synthetic_url, "--out", os.path.join(workdir, "out")]
    for key, value in overrides:
        argv += ["--set", f"{key}={value}"]
    guidedmix(argv)


def _mutations(manifest):
    """Every path (a tuple of keys and indices) into the manifest: the places hypothesis may change."""
    paths = []

    def walk(node, path):
        paths.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            walk(child, path + (key,))

    walk(manifest, ())
    return paths


DELETE = object()
ESCAPES = ["../outside.tar", "/etc/passwd", "s3://other-bucket/x.tar", "a/../../b.tar", "", ".", "x\\..\\y.tar",
           "pipe:cat /etc/passwd"]


@SETTINGS
@given(data=st.data())
def test_any_manifest(guidedmix, workdir, synthetic_url, data):
    with open(os.path.join(synthetic_url, "manifest.json")) as f:
        manifest = json.load(f)
    mutated = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_mutations(mutated)))
        if not path:
            mutated = data.draw(yaml_values)
            continue
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        value = data.draw(st.just(DELETE) | yaml_values | st.sampled_from(ESCAPES))
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        if not isinstance(mutated, (dict, list)):
            break
    folder = os.path.join(workdir, "data")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(mutated, f)
    guidedmix(["train", "--data", folder, "--out", os.path.join(workdir, "out")])


@pytest.mark.parametrize("name", ESCAPES[:4])
def test_a_manifest_cannot_point_outside_its_shard_set(guidedmix, synthetic_url, tmp_path, name):
    with open(os.path.join(synthetic_url, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["splits"]["labeled"]["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert guidedmix(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


TOKENS = ["train", "eval", "predict", "shards", "build", "inspect", "demo", "--config", "--data", "--out",
          "--workers", "--steps", "--method", "--address", "--set", "--checkpoint", "--images", "--labeled",
          "--source", "--root", "--verify", "--no-ray", "--help", "-v", "synthetic", "voc", "1/16", "abc", "-3",
          "0", "pipe:ls", "ftp://x", "s3://", "/nonexistent", "x=1", "guidedmix", "supervised"]


@SETTINGS
@given(argv=st.lists(st.sampled_from(TOKENS) | st.text(max_size=12), max_size=8))
def test_any_command_line(guidedmix, workdir, argv):
    with contextlib.chdir(workdir):  # relative paths from hypothesis land here, not in the repository
        guidedmix(argv)


def test_a_yaml_bomb_is_refused_quickly(guidedmix, tmp_path, synthetic_url):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("data:\n  storage_options:\n" + "".join(f"    {line}\n" for line in levels))
    assert guidedmix(["train", "--config", str(bomb), "--data", synthetic_url, "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("flag", ["--data", "--out"])
def test_command_running_urls_are_refused_without_the_opt_in(guidedmix, tmp_path, synthetic_url, flag):
    argv = ["train", "--data", synthetic_url, "--out", str(tmp_path / "out")]
    argv[argv.index(flag) + 1] = "pipe:touch " + str(tmp_path / "ran")
    assert guidedmix(argv) == 2
    assert not (tmp_path / "ran").exists()


def test_a_damaged_portable_checkpoint_is_one_line_naming_it(tmp_path):
    """The whole state a ZeRO checkpoint keeps for a resume at another world size (trainer/engine.py) is
    checked against the model before any of it is set: truncated, or lacking a parameter or an optimiser
    state, it is one line naming the file and what is missing."""
    import torch

    from shards.errors import BadInput
    from trainer.engine import PORTABLE_KEYS, read_portable

    shapes, keys = {"w": (2, 3), "b": (3,)}, ("momentum_buffer",)
    whole = {k: None for k in PORTABLE_KEYS} | {
        "params": {n: torch.zeros(s) for n, s in shapes.items()},
        "optimiser": {n: {"momentum_buffer": torch.zeros(s)} for n, s in shapes.items()}}
    good = tmp_path / "portable.pt"
    torch.save(whole, good)
    assert read_portable(str(good), shapes, keys)["params"]["w"].shape == (2, 3)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    lacking = tmp_path / "lacking.pt"
    torch.save(whole | {"params": {"w": torch.zeros(2, 3)}, "optimiser": {"w": {}, "b": {}}}, lacking)
    for path, names in ((truncated, ["cannot be read"]), (lacking, ["params.b", "optimiser.w.momentum_buffer"]),
                        (good, ["params.w (4, 3)"])):
        with pytest.raises(BadInput) as e:
            read_portable(str(path), {"w": (4, 3) if path == good else (2, 3), "b": (3,)}, keys)
        message = str(e.value)
        assert str(path) in message and "\n" not in message and all(n in message for n in names), message


@pytest.mark.parametrize("argv, named", [
    (["--steps", "20"], "--steps"),  # under a step of warm-up: the schedule would divide by zero mid-run
    (["--classes", "0"], "--classes"),
    (["--views", "2"], "--views"),  # all held out, none to train on
    (["--size", "4"], "--size"),
    (["--task", "segment", "--classes", "2", "--views", "3", "--batch", "3"], "--batch"),
])
def test_pretraining_arguments_that_cannot_work_are_one_line(argv, named, capsys):
    """bench/pretrain_backbone.py (and `bench/ssl_suite.py --pretrained=ARGS`, which parses through it)."""
    from bench.pretrain_backbone import parse
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("pretrain_backbone.py: error: ") and named in last, last
