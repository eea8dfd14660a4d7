"""The commands the README and docs/ quote beside their figures still parse: every `bench/*.py` command in a
code span with the bench's own argument parser (run up to the point where it has parsed its arguments, and
no further), every `guidedmix` command with the CLI's. A renamed option, a retired choice or a bench gone
fails here instead of in a reader's hands."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

SPAN = re.compile(r"`([^`\n]+)`")
BENCH = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:\S*python3? )?(bench/[a-z_]+\.py)(.*)$")
PLACEHOLDER = re.compile(r"\.\.\.|\[|\b[A-Z]{3,}\b")  # `--sets ...`, `[--verify]`, `URL`: a pattern, not a command

# run in a child: each bench as __main__ with its arguments, parse_args stopping it once they parsed
PARSE_ONLY = """
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_and_stop
failed = {}
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        failed[" ".join(sys.argv)] = "ran without parsing its arguments"
    except Parsed:
        pass
    except SystemExit as e:
        failed[" ".join(sys.argv)] = f"exit {e.code}"
print(json.dumps(failed))
"""


def quoted_commands():
    """Code spans that are commands: not a pattern (PLACEHOLDER), not a bench named without arguments (a
    reference), not on a line, nor in a document whose first lines, say `historical` (commands of an
    earlier commit's code, kept with their figures)."""
    found = set()
    for path in [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]:
        lines = open(path).read().splitlines()
        if any("historical" in line.lower() for line in lines[:3]):
            continue
        for line in lines:
            if "historical" in line.lower():
                continue
            for span in SPAN.findall(line):
                command = span.startswith(("guidedmix ", ".venv/bin/", "OMP_NUM_THREADS", "python", "bench/"))
                reference = span.startswith("bench/") and " " not in span
                if command and not reference and not PLACEHOLDER.search(span):
                    found.add(span)
    return sorted(found)


def test_every_quoted_bench_command_parses_with_todays_bench():
    benches = []
    for command in quoted_commands():
        match = BENCH.match(command)
        if match:
            script, args = match.group(1), shlex.split(match.group(2))
            assert os.path.exists(os.path.join(REPO, script)), command
            if "argparse" not in open(os.path.join(REPO, script)).read():
                assert not args, f"{command}: the bench takes no arguments"
            else:
                benches.append((script, args))
    assert len(benches) >= 15
    r = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(benches)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.splitlines()[-1])
    assert not failed, failed


def test_every_quoted_guidedmix_command_parses_with_todays_cli():
    from launch.cli import build_parser
    from shards.errors import BadInput

    commands = [c for c in quoted_commands() if c.startswith("guidedmix ")]
    assert len(commands) >= 3
    for command in commands:
        args = shlex.split(command)[1:]
        if len(args) == 1:  # `guidedmix sweep`: the subcommand named, which must exist
            args.append("--help")
        try:
            build_parser().parse_args(args)
        except SystemExit as e:  # --help
            assert e.code == 0 and args[-1] == "--help", f"{command}: exit {e.code}"
        except BadInput as e:  # the CLI's parser: one line, exit 2
            pytest.fail(f"{command}: {e}")


def test_the_check_sees_a_retired_option():
    r = subprocess.run([sys.executable, "-c", PARSE_ONLY, '[["bench/ssl_suite.py", ["--no-such-option"]]]'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "exit 2" in r.stdout.splitlines()[-1]


# -- records: what a bench measured, kept by bench/common.py:publish --------------------------------------

RECORD = re.compile(r"docs/results/[\w.-]+\.json")
NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+")


def records() -> dict[str, dict]:
    return {os.path.relpath(p, REPO): json.load(open(p)) for p in glob.glob(os.path.join(REPO, "docs/results/*.json"))}


def leaves(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def unrecorded(cell: str, cited: list[dict]) -> list[str]:
    """The decimal figures of a table cell that none of the cited records holds."""
    values = [v for record in cited for v in leaves(record["figures"])]
    return [n for n in NUMBER.findall(cell) if not any(abs(float(n) - v) < 1e-9 for v in values)]


def test_every_record_names_its_command_commit_and_date_and_the_command_parses():
    kept = records()
    assert kept, "no bench records under docs/results/"
    benches = []
    for path, record in kept.items():
        assert set(record) == {"command", "commit", "date", "figures"}, path
        assert re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", record["commit"]), path
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]) and leaves(record["figures"]), path
        match = BENCH.match(record["command"])
        assert match, (path, record["command"])
        benches.append((match.group(1), shlex.split(match.group(2))))
    r = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(benches)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and not json.loads(r.stdout.splitlines()[-1]), r.stdout[-2000:] + r.stderr[-2000:]


def test_every_figure_a_readme_row_quotes_from_a_record_is_in_it():
    """A Measured row that cites records (`docs/results/NAME.json`) quotes in its figure cell only decimals that
    those records hold; a retyped, rounded-differently or stale figure fails here."""
    kept, rows = records(), 0
    for line in open(os.path.join(REPO, "README.md")).read().splitlines():
        cited = RECORD.findall(line)
        if not cited or not line.startswith("|"):
            continue
        rows += 1
        assert all(c in kept for c in cited), (cited, sorted(kept))
        figures = line.split("|")[2]
        assert not unrecorded(figures, [kept[c] for c in cited]), (unrecorded(figures, [kept[c] for c in cited]), line[:120])
    assert rows >= 3


def test_the_record_check_sees_a_retyped_figure():
    record = {"figures": {"ratio": 3.304, "parts": {"mitrans": 0.00662}}}
    assert unrecorded(" 3.304 and 0.00662 ", [record]) == []
    assert unrecorded(" 3.30 and 0.0066 ", [record]) == ["3.30", "0.0066"]


# -- where every figure came from: a record, or the commit it ran at ------------------------------------------

COMMIT = re.compile(r"\bcommits? ([0-9a-f]{7,12})\b(?: and ([0-9a-f]{7,12})\b)?")


def section(text: str, heading: str) -> str:
    """The text under a Markdown heading (a line of its own), up to the next heading of its level or higher."""
    rest = text[re.search(r"^%s$" % re.escape(heading), text, flags=re.M).end():]
    end = re.search(r"^#{1,%d} " % len(heading.split(" ")[0]), rest, flags=re.M)
    return rest[:end.start()] if end else rest


def table_rows(text: str) -> list[list[str]]:
    return [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line) and not line.startswith("| what")]


def named_commits(text: str) -> list[str]:
    return [c for match in COMMIT.findall(text) for c in match if c]


def unknown(commits: list[str]) -> list[str]:
    """The commits this repository does not hold (none counted in a shallow clone: it holds few)."""
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
    if shallow != "false":
        return []
    return [c for c in commits
            if subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=REPO).returncode != 0]


def test_every_measured_row_cites_its_record_or_the_commit_it_ran_at():
    """README's Measured table: each row cites the records its figures are in, or names the commit it was measured
    at; the History table (figures of earlier code) names the commit, every one of them a commit of this
    repository."""
    readme = open(os.path.join(REPO, "README.md")).read()
    measured = section(readme, "## Measured")
    history = section(measured, "### History: figures of earlier code")
    current = measured.replace(history, "")
    rows = table_rows(current)
    assert len(rows) >= 10
    for row in rows:
        assert RECORD.search(row[-1]) or named_commits(row[-1]), row[0][:100]
    old = table_rows(history)
    assert len(old) >= 10
    for row in old:
        assert named_commits(row[-1]) and not RECORD.search(row[-1]), row[0][:100]
    cited = [c for row in rows + old for c in named_commits(row[-1])]
    assert not unknown(cited), unknown(cited)


def test_every_results_table_names_the_commit_it_was_written_at():
    """docs/results*.md: the file's banner names a commit, or each of its sections does."""
    for path in sorted(glob.glob(os.path.join(REPO, "docs", "results*.md"))):
        text = open(path).read()
        banner = "\n".join(text.splitlines()[:8])
        if named_commits(banner):
            assert not unknown(named_commits(banner)), path
            continue
        headings = re.findall(r"^##+ .*$", text, flags=re.M)
        unnamed = [h for h in headings if not named_commits(h)]
        assert headings and not unnamed, (path, unnamed)
        assert not unknown([c for h in headings for c in named_commits(h)]), path
