"""The chaos suite's report: runs every fault-injection test (`pytest -m chaos`: tests/test_chaos.py on a
two-node Ray cluster with S3 on loopback, and the pairing service's faults in tests/test_pairing.py), then
prints as its last line one JSON object with each fault's figures: whether the run finished, steps completed
against requested, samples lost and repeated (from the runs' sample ledgers), and recovery time in seconds
(from the fault, or from its end where the fault lasts, to the first sign of training progress after it).

    .venv/bin/python bench/chaos.py          # about 10 minutes on 2 cores
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import publish  # noqa: E402


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "faults.jsonl")
        # -v: one line per fault as it ends, the suite's progress
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "chaos",
               "tests/test_chaos.py", "tests/test_pairing.py"]
        code = subprocess.call(cmd, cwd=ROOT, env={**os.environ, "GUIDEDMIX_CHAOS_REPORT": report})
        faults = [json.loads(line) for line in open(report)] if os.path.exists(report) else []
    publish({"all_passed": code == 0, "faults": faults})
    return code


if __name__ == "__main__":
    sys.exit(main())
