"""The alerts of deploy/base/prometheusrule.yaml, checked and unit-tested with promtool.

``promtool test rules`` runs deploy/alerts/tests.yaml against the rule groups: each alert
fires on its condition, REST-only and gRPC-only failures each fire, and nothing fires for
another service's metrics. The rules' own text is checked too: every series they read is
scoped to job "cellexplain", every alert has a runbook section in docs/runbooks.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULE = REPO / "deploy" / "base" / "prometheusrule.yaml"
TESTS = REPO / "deploy" / "alerts" / "tests.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
#: the old paging rule: REST + gRPC summed (empty without gRPC traffic) and unscoped
SUMMED_UNSCOPED = """(
  sum(rate(bentoml_service_request_total{http_response_code=~"5.."}[5m]))
  + sum(rate(cellexplain_grpc_request_seconds_count{code=~"INTERNAL|UNAVAILABLE"}[5m]))
) / (
  sum(rate(bentoml_service_request_total[5m]))
  + sum(rate(cellexplain_grpc_request_seconds_count[5m]))
) > 0.01"""


def all_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULE.read_text())["spec"]["groups"] for r in g["rules"]]


def rules() -> list[dict]:
    """The alerting rules (the recording rules are the autoscaling signal)."""
    return [r for r in all_rules() if "alert" in r]


def promtool(tmp_path: Path, groups: dict, *args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` in a folder holding the rule groups as rules.yaml and the tests."""
    require(shutil.which("promtool") is not None, "promtool is not installed")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(TESTS, tmp_path / "tests.yaml")
    return subprocess.run(
        ["promtool", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_promtool_checks_and_tests_the_rules(tmp_path):
    groups = yaml.safe_load(RULE.read_text())["spec"]
    check = promtool(tmp_path, groups, "check", "rules", "rules.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in check.stdout
    test = promtool(tmp_path, groups, "test", "rules", "tests.yaml")
    assert test.returncode == 0, test.stdout + test.stderr
    # every alert is exercised by the tests
    tested = set(re.findall(r"alertname: (\w+)", TESTS.read_text()))
    assert tested == {r["alert"] for r in rules()}


def test_the_tests_catch_the_old_summed_unscoped_rule(tmp_path):
    """The tests can fail: the rule this issue replaced (REST + gRPC in one sum, every job)
    stays silent with REST at 50% 5xx and no gRPC traffic, and fires for another service."""
    groups = yaml.safe_load(RULE.read_text())["spec"]
    for r in (r for g in groups["groups"] for r in g["rules"]):
        if r.get("alert") == "CellexplainRestErrors":
            r["expr"] = SUMMED_UNSCOPED
    test = promtool(tmp_path, groups, "test", "rules", "tests.yaml")
    assert test.returncode != 0
    assert "CellexplainRestErrors" in test.stdout + test.stderr


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_each_rule_is_scoped_and_has_a_runbook(rule):
    expr = rule["expr"]
    # every series of ours or BentoML's is read with job="cellexplain"
    for m in re.finditer(r"\b((?:cellexplain|bentoml)_\w+|up)\{([^}]*)\}", expr):
        assert 'job="cellexplain"' in m.group(2), (rule["alert"], m.group(0))
    bare = re.findall(r"\b(?:cellexplain|bentoml)_\w+\b(?!\{)", expr)
    assert not bare, (rule["alert"], bare)  # a series read without any selector
    # alerts are per namespace (two deployments never merge)
    assert "namespace" in expr, rule["alert"]
    url = rule["annotations"]["runbook_url"]
    anchor = url.split("#", 1)[1]
    assert url.startswith("docs/runbooks.md#") and anchor == rule["alert"].lower()
    headings = re.findall(r"^## (\w+)", RUNBOOKS.read_text(), re.M)
    assert rule["alert"] in headings, f"docs/runbooks.md has no section {rule['alert']}"
    assert rule["labels"]["severity"] in {"page", "warn"} and rule["for"]


def test_the_adapters_query_gives_each_pod_its_queued_cells(tmp_path):
    """The Prometheus adapter's metricsQuery (deploy/autoscaling), filled in as the adapter
    fills it for an HPA asking for two pods, evaluated by promtool over the recording rule:
    each pod gets the cells queued in all its workers; another namespace's pod is not asked."""
    adapter = yaml.safe_load(
        (REPO / "deploy" / "autoscaling" / "prometheus-adapter-rules.yaml").read_text()
    )
    (rule,) = adapter["rules"]
    series = rule["seriesQuery"].split("{")[0]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="lab",pod=~"cellexplain-a|cellexplain-b"')
        .replace("<<.GroupBy>>", "pod")
    )
    groups = yaml.safe_load(RULE.read_text())["spec"]
    groups["groups"] = [g for g in groups["groups"] if g["name"] == "cellexplain-autoscaling"]
    workers = [("cellexplain-a", "10", 3000), ("cellexplain-a", "11", 1000),
               ("cellexplain-b", "10", 0), ("cellexplain-c", "10", 7)]  # fmt: skip
    inputs = [
        {"series": f'cellexplain_queued_cells{{job="cellexplain",namespace="{ns}",pod="{pod}",'
                   f'pid="{pid}",model="pbmc-programs"}}', "values": f"{v}x8"}
        for pod, pid, v in workers
        for ns in ("lab", "other")
    ]  # fmt: skip
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": inputs,
            "promql_expr_test": [{
                "expr": query,
                "eval_time": "1m",
                "exp_samples": [{"labels": '{pod="cellexplain-a"}', "value": 4000},
                                {"labels": '{pod="cellexplain-b"}', "value": 0}],
            }],
        }],
    }  # fmt: skip
    result = promtool(tmp_path, groups, "check", "rules", "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "adapter.yaml").write_text(yaml.safe_dump(tests))
    result = promtool(tmp_path, groups, "test", "rules", "adapter.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
