"""The alert rules of k8s/base/prometheusrule.yaml unit-tested with promtool: for each alert, series that must
fire it and series beside them that must not, and the cases shown to catch a changed rule. A real Prometheus
server evaluates the same rules during a run in test_operations.py."""
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, alert_rules, prometheus_binary, rule_groups, write_rules

CASES = os.path.join(REPO, "tests", "alerts", "guidedmix.test.yaml")


def promtool_test(tmp_path, groups) -> subprocess.CompletedProcess:
    write_rules(tmp_path / "rules.yaml", groups)
    shutil.copy(CASES, tmp_path / "cases.yaml")
    return subprocess.run([prometheus_binary("promtool"), "test", "rules", "cases.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


# -- the rules, unit-tested -----------------------------------------------------------------------------

def test_the_alert_rules_pass_their_unit_tests(tmp_path):
    r = promtool_test(tmp_path, rule_groups())
    print(r.stdout)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_case_that_fires_it_and_series_beside_it_that_must_not():
    cases = yaml.safe_load(open(CASES))["tests"]
    for rule in alert_rules():
        name, fired, quiet = rule["alert"], False, False
        for case in cases:
            firing = [a for t in case["alert_rule_test"] if t["alertname"] == name for a in t["exp_alerts"]]
            if not firing:
                continue
            fired = True
            runs = {re.search(r'run="([^"]+)"', s["series"]).group(1) for s in case["input_series"]}
            quiet |= bool(runs - {a["exp_labels"]["run"] for a in firing})
        assert fired and quiet, f"{name}: needs series that fire it and series beside them that must not"


# a planted change per alert that loosens it: each must make a quiet case fire
LOOSER = {
    "GuidedMixTrainingStalled": ("20 *", "2 *"),
    "GuidedMixInputBound": ("> 0.25", "> 0.01"),
    "GuidedMixPairingFallingBack": ("> 0.1", ">= 0"),
    "GuidedMixCheckpointOverdue": ("on (run) 2 *", "on (run) 0 *"),
    "GuidedMixCorruptSamplesRising": ("> 0", ">= 0"),
    "GuidedMixPseudoMaskCollapse": ("> 0.3", "> 0.05"),
    "GuidedMixEvalMiouDropped": (">= 0.1", ">= 0.04"),
}


@pytest.mark.parametrize("change", ["never fires", "looser"])
@pytest.mark.parametrize("name", sorted(LOOSER))
def test_the_unit_tests_catch_a_changed_rule(tmp_path, name, change):
    groups = rule_groups()
    rule = next(r for r in alert_rules(groups) if r["alert"] == name)
    if change == "never fires":
        rule["expr"] = f"({rule['expr']}) unless on () vector(1)"
    else:
        old, new = LOOSER[name]
        assert old in rule["expr"]
        rule["expr"] = rule["expr"].replace(old, new)
    r = promtool_test(tmp_path, groups)
    report = r.stdout + r.stderr  # promtool prints failures on stderr
    assert r.returncode != 0 and f"alertname: {name}," in report, report


def test_the_dashboard_reads_only_series_the_rules_record():
    dashboard = json.load(open(os.path.join(REPO, "k8s", "base", "grafana-dashboard.json")))
    read = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"guidedmix:[a-z_:0-9]+", t["expr"])}
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    assert read and read <= recorded, sorted(read - recorded)


def test_every_alert_says_how_bad_and_what_to_do():
    readme = open(os.path.join(REPO, "README.md")).read()
    headings = {h.strip().lower() for h in re.findall(r"^#{2,5} (.+)$", readme, re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook == f"README.md#{rule['alert'].lower()}" and rule["alert"].lower() in headings, \
            f"{rule['alert']}: no runbook paragraph in the README"
