"""The PrometheusRule's alerts work, with the real tools.

- The document validates against the prometheus-operator's published schema
  (tests/deploy/schemas/prometheusrule.json), and its `spec` passes `promtool check rules`.
- `promtool test rules` runs unit tests generated here from CASES: every alert fires on
  series that should page or ticket, and stays quiet on series just short of it (a burst
  that ended, a rate under the threshold, a blip shorter than `for`). The expected
  annotations are rendered from the rule's own templates for the expected labels and value,
  so a template using a label the alert does not keep fails. A coverage test checks every
  alert has both a firing and a quiet case; another that promtool does report a wrong
  expectation (the harness can fail).
- Every alert has a severity (page or ticket), a summary, a description and a runbook URL
  whose anchor is a heading of docs/alerts.md (GitHub's anchor rules).
- Every metric the rules name is one `sidecar.metrics.Metrics` defines (or a recording rule
  of the file), with labels it has (or the target labels a PodMonitor adds); no rule keeps
  the organisation label.
- The SLO alerts follow the SRE workbook's multi-window, multi-burn-rate scheme, with one
  target per SLO.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from sidecar.metrics import REQUEST_BUCKETS, Metrics
from tests.deploy.test_prometheus_scrape import (
    AGGREGATIONS,
    HISTOGRAM_SUFFIXES,
    MONITORING,
    ROOT,
    RULES,
    TARGET_LABELS,
    TOKEN,
    analyse,
    rule_exprs,
)

SCHEMA = ROOT / "tests" / "deploy" / "schemas" / "prometheusrule.json"
RUNBOOK = ROOT / "docs" / "alerts.md"
RUNBOOK_URL = "https://github.com/example/sidecar/blob/main/docs/alerts.md#"
# Labels the prometheus-operator's PodMonitor puts on every series, besides the sidecar's.
SCRAPE_LABELS = set(TARGET_LABELS) | {"job", "instance", "endpoint"}
PROMTOOL_TIMEOUT = 120


def promtool() -> str:
    executable = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(executable).exists():
        # A failure, not a skip: a run without it would not check the rules at all.
        pytest.fail("promtool is not on PATH (Debian package prometheus)")
    return executable


def load_document() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())  # type: ignore[no-any-return]


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_document()["spec"]["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def write_rules(directory: Path) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(load_document()["spec"], sort_keys=False))
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


# --- The document ------------------------------------------------------------------------


def test_the_rule_document_is_a_valid_prometheusrule() -> None:
    document = load_document()
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert document["metadata"]["name"] == "orders-sidecar"
    assert document["metadata"]["labels"] == {"app.kubernetes.io/name": "orders"}
    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert RULES.name in kustomization["resources"]


def test_the_schema_check_can_fail() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    document = load_document()
    document["spec"]["groups"][0]["rules"][0]["expr"] = {"not": "a string"}
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert list(validator.iter_errors(document))


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    result = run_promtool("check", "rules", str(write_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    assert alerts(), "no alert in the rule file"
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_URL), (name, url)
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor in anchors, f"{name}: docs/alerts.md has no heading for #{anchor}"
        assert anchor == github_anchor(name), f"{name}: its section is not named after it"


def github_anchor(heading: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped (but - and _), spaces as -."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def github_anchors(markdown: str) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6} +(.+?) *#* *$", line)
        if in_code or match is None:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def test_github_anchors_follow_githubs_rules() -> None:
    text = "# A title\n## Hot reload: `SIGHUP`\n```\n# not a heading\n```\n## A title\n"
    assert github_anchors(text) == {"a-title", "hot-reload-sighup", "a-title-1"}


# --- Metrics and labels ------------------------------------------------------------------


def defined_metrics() -> dict[str, set[str]]:
    """Every series name the sidecar exports, with its labels (as sidecar.metrics defines
    them: counters get _total, histograms _bucket/_sum/_count with le on the buckets)."""
    metrics = Metrics()
    found: dict[str, set[str]] = {}
    for wrapper in vars(metrics).values():
        if not isinstance(wrapper, MetricWrapperBase):
            continue
        name, labels, kind = wrapper._name, set(wrapper._labelnames), wrapper._type
        if kind == "counter":
            found[f"{name}_total"] = labels
        elif kind == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                found[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            found[name] = labels
    assert "sidecar_requests_total" in found and "sidecar_circuit_state" in found
    return found


KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)


OFFSET = re.compile(r"\boffset\s+-?(?:\d+(?:ms|[smhdwy]))+")


def metric_names(expr: str) -> set[str]:
    """Every metric (or recorded series) an expression selects: identifiers outside label
    lists, selectors and strings that are not functions, aggregations or keywords."""
    tokens = TOKEN.findall(OFFSET.sub(" ", expr))
    names: set[str] = set()
    depth_braces = 0
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token == "{":
            depth_braces += 1
        elif token == "}":
            depth_braces -= 1
        elif token in ("by", "without", "on", "ignoring", "group_left", "group_right"):
            if following == "(":
                while tokens[i] != ")":
                    i += 1
        elif (
            depth_braces == 0
            and re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token)
            and token.lower() not in KEYWORDS
            and token not in AGGREGATIONS
            and following != "("
        ):
            names.add(token)
        i += 1
    return names


def test_metric_names_finds_selected_metrics_only() -> None:
    expr = (
        'sum by (route) (rate(a_total{code=~"5.."}[5m])) / on (route) group_left (x) '
        "max without (pod) (b:c:ratio) > bool 2 and min_over_time(d[1m]) or vector(1)"
        " unless e offset 1h30m"
    )
    assert metric_names(expr) == {"a_total", "b:c:ratio", "d", "e"}


# Series of other exporters the rules read, with their labels: Prometheus' own `up` of
# each target (the PodMonitor's labels), and kube-state-metrics' restart counters.
EXTERNAL_METRICS = {
    "up": set(),
    "kube_pod_container_status_restarts_total": {"namespace", "pod", "container", "uid"},
    "kube_pod_init_container_status_restarts_total": {"namespace", "pod", "container", "uid"},
}


def test_every_metric_and_label_the_rules_use_is_defined_by_the_sidecar() -> None:
    defined = defined_metrics() | EXTERNAL_METRICS
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    problems = []
    for where, expr in rule_exprs():
        for name in sorted(metric_names(expr) - recorded):
            if name not in defined:
                problems.append(f"{where}: {name} is not a metric sidecar.metrics defines")
        for metric, labels in analyse(expr).required().items():
            unknown = labels - defined.get(metric, set()) - SCRAPE_LABELS
            if unknown:
                problems.append(f"{where}: {metric} has no label(s) {sorted(unknown)}")
    assert problems == []


def test_no_rule_keeps_the_organisation_label() -> None:
    for where, expr in rule_exprs():
        usage = analyse(expr)
        for metric, labels in usage.required().items():
            assert "org" not in labels, f"{where}: {expr}"
            # Every sidecar series is aggregated, so no per-organisation series survives.
            assert usage.aggregated_by.get(metric), f"{where}: {metric} is not aggregated"
        for groups in usage.aggregated_by.values():
            assert all("org" not in labels for labels in groups), f"{where}: {expr}"


def test_the_latency_slo_uses_a_bucket_the_histogram_has() -> None:
    buckets = set(re.findall(r'le="([^"]+)"', RULES.read_text()))
    assert buckets, "no le matcher in the rules"
    # prometheus_client writes le as Python floats do: 0.5, 1.0, 30.0.
    assert buckets <= {str(float(b)) for b in REQUEST_BUCKETS}
    assert buckets == {"0.5"}  # what docs/alerts.md and the descriptions say


# --- The SLO scheme ----------------------------------------------------------------------

RECORDED = re.compile(r"namespace_route:sidecar_requests_(?P<slo>errors|slow):ratio_rate(?P<w>\w+)")
THRESHOLD = re.compile(r"> \((?P<factor>[\d.]+) \* \(1 - (?P<target>[\d.]+)\)\)")
# (long window, short window, burn rate) of the workbook's alerts, page and ticket.
WORKBOOK = {
    "page": {("1h", "5m", 14.4), ("6h", "30m", 6.0)},
    "ticket": {("1d", "2h", 3.0), ("3d", "6h", 1.0)},
}
TARGETS = {"errors": 0.9995, "slow": 0.99}


def test_the_slo_alerts_are_multi_window_multi_burn_rate_with_one_target_per_slo() -> None:
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    slo_alerts = {n: r for n, r in alerts().items() if "BudgetBurn" in n}
    assert len(slo_alerts) == 4
    for name, rule in slo_alerts.items():
        pairs = set()
        for branch in rule["expr"].split("\nor\n"):
            found = RECORDED.findall(branch)
            thresholds = THRESHOLD.findall(branch)
            assert len(found) == 2 and len(thresholds) == 2, (name, branch)
            assert len({slo for slo, _ in found}) == 1 and len(set(thresholds)) == 1, branch
            slo = found[0][0]
            factor, target = thresholds[0]
            assert float(target) == TARGETS[slo], f"{name}: another target than {TARGETS[slo]}"
            pairs.add((found[0][1], found[1][1], float(factor)))
        assert pairs == WORKBOOK[rule["labels"]["severity"]], name
    for record, expr in recorded.items():
        match = RECORDED.fullmatch(record)
        assert match is not None, record
        ranges = set(re.findall(r"\[(\w+)\]", expr))
        assert ranges == {match["w"]}, f"{record} computes over {ranges}"


# --- promtool unit tests -----------------------------------------------------------------


@dataclass
class Check:
    """At `at`, alert `alert` fires exactly for `fired`: label sets (the alert's own labels
    added) with the value its annotations show under the key "value"."""

    at: str
    alert: str
    fired: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Case:
    name: str
    interval: str
    series: dict[str, str]
    checks: list[Check]


def s(metric: str, **labels: str) -> str:
    """A series of pod orders-a in namespace shop, as the PodMonitor labels it."""
    labels = {"namespace": "shop", "pod": "orders-a", "container": "sidecar"} | labels
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def requests(route: str, code: str, values: str, pod: str = "orders-a") -> dict[str, str]:
    return {s("sidecar_requests_total", route=route, method="GET", code=code, pod=pod): values}


def durations(route: str, count: str, fast: str, faster: str = "") -> dict[str, str]:
    """A route's histogram: the _count and its le="0.5" bucket (and optionally le="0.25",
    which no rule should read)."""
    series = {
        s("sidecar_request_duration_seconds_count", route=route): count,
        s("sidecar_request_duration_seconds_bucket", route=route, le="0.5"): fast,
    }
    if faster:
        series[s("sidecar_request_duration_seconds_bucket", route=route, le="0.25")] = faster
    return series


def shop(route: str | None = None, **labels: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"namespace": "shop"}
    if route is not None:
        found["route"] = route
    return found | labels


def seq(values: list[int]) -> str:
    return " ".join(str(v) for v in values)


AVAIL_FAST, AVAIL_SLOW = "SidecarAvailabilityBudgetBurnFast", "SidecarAvailabilityBudgetBurnSlow"
LAT_FAST, LAT_SLOW = "SidecarLatencyBudgetBurnFast", "SidecarLatencyBudgetBurnSlow"

CASES = [
    Case(
        "availability: 1% of 5xx over two pods pages (1h & 5m), 0.5% pages (6h & 30m)",
        "1m",
        requests("orders", "200", "0+98x70")
        | requests("orders", "500", "0+2x70")
        | requests("orders", "200", "0+100x70", pod="orders-b")
        | requests("payments", "200", "0+995x70")
        | requests("payments", "502", "0+5x70"),
        [
            Check("1m", AVAIL_FAST),  # not for 2m yet
            Check(
                "30m",
                AVAIL_FAST,
                [shop("orders", value=0.01), shop("payments", value=0.005)],
            ),
        ],
    ),
    Case(
        "availability: 0.25% of 5xx does not page; a 10-minute outage stops paging once over",
        "1m",
        requests("search", "200", "0+9975x70")
        | requests("search", "500", "0+25x70")
        | requests("catalog", "200", "0+100x70")
        | requests("catalog", "503", "0+100x10 1000x60"),
        [
            Check("12m", AVAIL_FAST, [shop("catalog", value=1000 / 2200)]),
            Check("45m", AVAIL_FAST),
            Check("60m", AVAIL_FAST),
        ],
    ),
    Case(
        "availability: 0.2% over a day tickets (1d & 2h), 0.07% tickets (3d & 6h), no page",
        "5m",
        requests("orders", "200", "0+998x300")
        | requests("orders", "500", "0+2x300")
        | requests("payments", "200", "0+9993x300")
        | requests("payments", "504", "0+7x300"),
        [
            Check("12h", AVAIL_SLOW, [shop("orders", value=0.002), shop("payments", value=7e-4)]),
            Check("12h", AVAIL_FAST),
        ],
    ),
    Case(
        "availability: 0.03% does not ticket; errors that stopped 14h ago no longer ticket",
        "5m",
        requests("search", "200", "0+9997x300")
        | requests("search", "500", "0+3x300")
        | requests("catalog", "200", "0+99x72 7128+100x200")
        | requests("catalog", "500", "0+1x72 72x200"),
        [Check("20h", AVAIL_SLOW), Check("20h", AVAIL_FAST)],
    ),
    Case(
        "latency: 20% slower than 0.5s pages (1h & 5m), 8% pages (6h & 30m)",
        "1m",
        durations("orders", "0+100x70", "0+80x70", faster="0+10x70")
        | durations("payments", "0+100x70", "0+92x70"),
        [Check("30m", LAT_FAST, [shop("orders", value=0.2), shop("payments", value=0.08)])],
    ),
    Case(
        "latency: 5% slow does not page; a 10-minute slowdown stops paging once over",
        "1m",
        durations("search", "0+100x70", "0+95x70")
        | durations("catalog", "0+100x70", "0x10 100+100x59"),
        [
            Check("12m", LAT_FAST, [shop("catalog", value=1000 / 1200)]),
            Check("45m", LAT_FAST),
        ],
    ),
    Case(
        "latency: 4% slow over a day tickets (1d & 2h), 1.5% tickets (3d & 6h), no page",
        "5m",
        durations("orders", "0+100x300", "0+96x300")
        | durations("payments", "0+1000x300", "0+985x300"),
        [
            Check("12h", LAT_SLOW, [shop("orders", value=0.04), shop("payments", value=0.015)]),
            Check("12h", LAT_FAST),
        ],
    ),
    Case(
        "latency: 0.5% slow does not ticket; a slowdown that ended 14h ago no longer does",
        "5m",
        durations("search", "0+1000x300", "0+995x300")
        | durations("catalog", "0+100x240", "0+90x72 6580+100x167"),
        [Check("20h", LAT_SLOW), Check("20h", LAT_FAST)],
    ),
    Case(
        "breaker: open and half-open, never closed, on one pod for 10 minutes",
        "1m",
        {
            s("sidecar_circuit_state", route="orders"): seq([0] * 5 + [2, 2, 2, 1] * 8),
            s("sidecar_circuit_state", route="orders", pod="orders-b"): "0x40",
        },
        [
            Check("12m", "SidecarCircuitBreakerOpen"),  # pending
            Check("20m", "SidecarCircuitBreakerOpen", [shop("orders", value=1)]),
        ],
    ),
    Case(
        "breaker: one that closes between trips, or opens for 8 minutes, stays quiet",
        "1m",
        {
            s("sidecar_circuit_state", route="payments"): seq([2, 2, 2, 0] * 10),
            s("sidecar_circuit_state", route="search"): seq([0] * 5 + [2] * 8 + [0] * 27),
        },
        [Check("14m", "SidecarCircuitBreakerOpen"), Check("30m", "SidecarCircuitBreakerOpen")],
    ),
    Case(
        "store: quotas degraded on two pods and the breaker on one, for 5 minutes",
        "1m",
        {
            s("sidecar_ratelimit_degraded", route="orders"): "0x2 1x20",
            s("sidecar_ratelimit_degraded", route="orders", pod="orders-b"): "0x2 1x20",
            s("sidecar_circuit_degraded", route="orders"): "0x2 1x20",
            s("sidecar_circuit_degraded", route="orders", pod="orders-b"): "0x22",
        },
        [
            Check("5m", "SidecarStateStoreDegraded"),
            Check(
                "10m",
                "SidecarStateStoreDegraded",
                [
                    shop("orders", policy="quotas", value=2),
                    shop("orders", policy="circuit_breaker", value=1),
                ],
            ),
        ],
    ),
    Case(
        "store: a 3-minute blip of degradation does not alert",
        "1m",
        {
            s("sidecar_ratelimit_degraded", route="search"): "0x2 1x3 0x20",
            s("sidecar_circuit_degraded", route="search"): "0x2 1x3 0x20",
        },
        [Check("5m", "SidecarStateStoreDegraded"), Check("15m", "SidecarStateStoreDegraded")],
    ),
    Case(
        "store: 6% of quota_admit calls failing for 10 minutes alerts",
        "1m",
        {
            s("sidecar_store_request_duration_seconds_count", operation="quota_admit"): (
                "0+100x40"
            ),
            s("sidecar_store_errors_total", operation="quota_admit", kind="timeout"): "0+5x40",
            s("sidecar_store_errors_total", operation="quota_admit", kind="unavailable"): (
                "0+1x40"
            ),
        },
        [Check("25m", "SidecarStateStoreErrors", [shop(operation="quota_admit", value=0.06)])],
    ),
    Case(
        "store: 0.5% of calls failing does not alert",
        "1m",
        {
            s("sidecar_store_request_duration_seconds_count", operation="idempotency_begin"): (
                "0+1000x40"
            ),
            s("sidecar_store_errors_total", operation="idempotency_begin", kind="timeout"): (
                "0+5x40"
            ),
        },
        [Check("25m", "SidecarStateStoreErrors")],
    ),
    Case(
        "quotas: 40% of a route's requests denied for 15 minutes (shadow denials ignored)",
        "1m",
        requests("orders", "201", "0+60x40")
        | requests("orders", "429", "0+40x40")
        | {
            s("sidecar_ratelimit_decisions_total", route="orders", limit="hourly", decision=d): v
            for d, v in (("allowed", "0+60x40"), ("denied", "0+40x40"))
        },
        [
            Check("10m", "SidecarQuotaDenialSurge"),  # pending
            Check("30m", "SidecarQuotaDenialSurge", [shop("orders", value=0.4)]),
        ],
    ),
    Case(
        "quotas: 10% denied, a flood of shadow denials, or a trickle of denials stay quiet",
        "1m",
        requests("catalog", "200", "0+900x40")
        | requests("catalog", "429", "0+100x40")
        | requests("search", "200", "0+2x40")
        | requests("search", "429", "0+2x40")
        | {
            s("sidecar_ratelimit_decisions_total", route="catalog", limit="daily", decision=d): v
            for d, v in (("allowed", "0+900x40"), ("denied", "0+100x40"))
        }
        | {
            s("sidecar_ratelimit_decisions_total", route="catalog", limit="new", decision=d): v
            for d, v in (("allowed", "0+900x40"), ("shadow_denied", "0+800x40"))
        }
        | {
            s(
                "sidecar_ratelimit_decisions_total",
                route="search",
                limit="daily",
                decision="denied",
            ): "0+2x40"
        },
        [Check("30m", "SidecarQuotaDenialSurge")],
    ),
    Case(
        "idempotency: a lost claim alerts for 10 minutes; a counter reset does not",
        "1m",
        {
            s("sidecar_idempotency_claims_lost_total", route="orders"): "0x5 1x20",
            s("sidecar_idempotency_claims_lost_total", route="payments"): "3x10 0x15",
            s("sidecar_idempotency_claims_lost_total", route="search"): "0x25",
        },
        [
            Check("8m", "SidecarIdempotencyClaimsLost", [shop("orders", value=1)]),
            Check("20m", "SidecarIdempotencyClaimsLost"),
        ],
    ),
    Case(
        "config: a failed reload alerts for 15 minutes, a pod's first one too (its error"
        " series appears at 1); successful reloads do not",
        "1m",
        {
            s("sidecar_config_reloads_total", result="error"): "0x5 1x30",
            s("sidecar_config_reloads_total", result="error", pod="orders-c"): "_x5 1x30",
            s("sidecar_config_reloads_total", result="success", pod="orders-c"): "0x35",
            s("sidecar_config_reloads_total", result="success"): "0x35",
            s("sidecar_config_reloads_total", result="error", pod="orders-b"): "0x35",
            s("sidecar_config_reloads_total", result="success", pod="orders-b"): "0+1x35",
        },
        [
            Check(
                "10m",
                "SidecarConfigReloadFailed",
                [shop(pod="orders-a", value=1), shop(pod="orders-c", value=1)],
            ),
            Check("25m", "SidecarConfigReloadFailed"),
        ],
    ),
    Case(
        "restarts: one restart of the native (init) or plain sidecar container alerts for"
        " 30 minutes; the app's restarts and a pod without restarts do not",
        "1m",
        {
            s("kube_pod_init_container_status_restarts_total", uid="a"): "0x10 1x55",
            s("kube_pod_container_status_restarts_total", pod="orders-b", uid="b"): (
                "0x20 1x5 2x40"
            ),
            s("kube_pod_container_status_restarts_total", container="app", uid="a"): ("0x10 1x40"),
            s("kube_pod_init_container_status_restarts_total", pod="orders-c", uid="c"): "0x65",
        },
        [
            Check("15m", "SidecarRestarting", [shop(pod="orders-a", value=1)]),
            Check(
                "30m",
                "SidecarRestarting",
                [shop(pod="orders-a", value=1), shop(pod="orders-b", value=2)],
            ),
            Check("45m", "SidecarRestarting", [shop(pod="orders-b", value=2)]),
            Check("55m", "SidecarRestarting", [shop(pod="orders-b", value=1)]),
            Check("60m", "SidecarRestarting"),
        ],
    ),
    Case(
        "down: a sidecar target down for 5 minutes pages; a shorter gap (a pod being"
        " replaced) and the app's own target do not",
        "1m",
        {
            s("up", job="shop/orders-sidecar"): "1x5 0x20",
            s("up", job="shop/orders-sidecar", pod="orders-b"): "1x5 0x3 1x17",
            s("up", job="shop/orders-app", container="app", pod="orders-c"): "0x25",
        },
        [
            Check("8m", "SidecarDown"),
            Check("12m", "SidecarDown", [shop(pod="orders-a", value=0)]),
        ],
    ),
]


TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def render(template: str, labels: dict[str, str], value: float) -> str:
    """The Go templates the annotations use (a small subset; anything else fails)."""

    def one(match: re.Match[str]) -> str:
        text = match.group(1)
        if text.startswith("$labels."):
            return labels[text.removeprefix("$labels.")]
        if text == "$value":
            assert value == int(value), f"give {template!r} an integer value"
            return str(int(value))
        if text == "$value | humanizePercentage":
            return go_g4(value * 100) + "%"
        if text == '$value | printf "%.0f"':
            return f"{value:.0f}"
        raise AssertionError(f"the test cannot render {{{{ {text} }}}}")

    return TEMPLATE.sub(one, template)


def go_g4(number: float) -> str:
    """Go's fmt %.4g, which humanizePercentage uses (the same as C's for finite numbers)."""
    assert math.isfinite(number)
    return f"{number:.4g}"


def unit_tests(cases: list[Case], rules_file: Path) -> dict[str, Any]:
    by_name = alerts()
    tests = []
    for case in cases:
        alert_tests = []
        for check in case.checks:
            rule = by_name[check.alert]
            expected = []
            for fired in check.fired:
                labels = {k: str(v) for k, v in fired.items() if k != "value"}
                labels |= {k: str(v) for k, v in rule.get("labels", {}).items()}
                expected.append(
                    {
                        "exp_labels": labels,
                        "exp_annotations": {
                            key: render(text, labels, fired["value"])
                            for key, text in rule["annotations"].items()
                        },
                    }
                )
            alert_tests.append(
                {"eval_time": check.at, "alertname": check.alert, "exp_alerts": expected}
            )
        tests.append(
            {
                "name": case.name,
                "interval": case.interval,
                "input_series": [{"series": k, "values": v} for k, v in case.series.items()],
                "alert_rule_test": alert_tests,
            }
        )
    return {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}


def run_unit_tests(tmp_path: Path, cases: list[Case]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(unit_tests(cases, write_rules(tmp_path)), sort_keys=False))
    return run_promtool("test", "rules", str(path))


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    result = run_unit_tests(tmp_path, CASES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    names = set(alerts())
    tested = {check.alert for case in CASES for check in case.checks}
    assert tested <= names, f"checks of alerts the rules do not have: {tested - names}"
    firing = {check.alert for case in CASES for check in case.checks if check.fired}
    quiet = {check.alert for case in CASES for check in case.checks if not check.fired}
    assert names - firing == set(), "alerts no case makes fire"
    assert names - quiet == set(), "alerts no case checks quiet"


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    """The harness can fail: a quiet case expected to fire, and a firing one expected quiet."""
    case = next(c for c in CASES if c.name.startswith("idempotency"))
    flipped = Case(
        case.name,
        case.interval,
        case.series,
        [Check("20m", "SidecarIdempotencyClaimsLost", [shop("orders", value=1)])],
    )
    result = run_unit_tests(tmp_path, [flipped])
    assert result.returncode != 0 and "FAILED" in result.stderr, result.stdout + result.stderr
    silenced = Case(
        case.name, case.interval, case.series, [Check("8m", "SidecarIdempotencyClaimsLost")]
    )
    result = run_unit_tests(tmp_path, [silenced])
    assert result.returncode != 0 and "FAILED" in result.stderr, result.stdout + result.stderr
