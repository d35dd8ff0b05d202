"""The monitoring manifests query metrics that exist: a real Prometheus scraping a real
sidecar has every metric named in the Grafana dashboard's and the PrometheusRule's exprs,
with every label those exprs use (in `by`/`without`/`on`/`ignoring` clauses and in
`{matchers}`).

One `sidecar run` process on a real Redis, with every policy on (tracing and span export,
per-organisation quotas, a circuit breaker, retries, a bulkhead, idempotency), sits in front
of a loopback app. A little traffic makes the labelled series exist (successes, a 500, a
quota denial, an idempotent POST and its replay, an open breaker, a retry, an upstream
timeout, a bulkhead refusal, a state store outage, a good and a bad config reload). Then
`prometheus` scrapes the admin /metrics every second, with the target labels a PodMonitor
attaches (namespace, pod, container), and its HTTP API (/api/v1/series, /api/v1/metadata)
is asked about each metric the exprs name. `up` must be 1.

The dashboard's structure is checked too: stable unique ids, non-overlapping panels, a
description on each, the template variables, and the organisation label never shown
unaggregated.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.deploy.prometheus import PrometheusServer, scrape_config
from tests.redis_fixture import RedisServer
from tests.support import SidecarProcess, free_port, run_app, write_config

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheusrule.yaml"

TEST_TIMEOUT = 30.0
# The labels the prometheus-operator's PodMonitor puts on every scraped series (with job,
# instance and endpoint); the dashboard's variables and the rules rely on namespace and pod.
TARGET_LABELS = {"namespace": "shop", "pod": "orders-5d8c7b9f4-x2k9q", "container": "sidecar"}

# Metrics allowed to have metadata (HELP/TYPE on /metrics) but no series, because their
# series appear only on a rare event this test does not cause. Every one needs its reason.
# Empty today: the sidecar creates the label children of its rare-event metrics when a route
# is loaded (claims lost, retry budget, store fallbacks, degraded gauges, connections
# closed, spans dropped), and the traffic below causes the rest.
METADATA_ONLY: dict[str, str] = {}

# Labels a query may use that are made by the query itself, not by the sidecar.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --- Which metrics and labels a PromQL expression uses ----------------------------------

TOKEN = re.compile(
    r""""(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`"""  # strings
    r"|\[[^\]]*\]"  # range and subquery durations, Grafana variables included
    r"|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*"  # Grafana variables outside strings
    r"|[A-Za-z_:][A-Za-z0-9_:]*"  # identifiers: metric, label, function names, keywords
    r"|=~|!~|!=|==|>=|<=|[(){},=]"
    r"|\S"
)
METRIC = re.compile(r"^(?:sidecar|process)_[a-z0-9_]+$")
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
MATCH_OPERATORS = frozenset({"=", "!=", "=~", "!~"})
# Functions whose string arguments create a label (the first string) from others.
LABEL_MAKERS = frozenset({"label_replace", "label_join"})


@dataclass
class Usage:
    """The metrics an expression names and, per metric, the labels it relies on."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    # Metrics that appear inside an aggregation with `by`, and that aggregation's labels.
    aggregated_by: dict[str, list[set[str]]] = field(default_factory=dict)
    made: set[str] = field(default_factory=set)  # labels made by label_replace & co.

    def use(self, metrics: Iterable[str], labels: Iterable[str]) -> None:
        for metric in metrics:
            self.labels.setdefault(metric, set()).update(labels)

    def merge(self, other: Usage) -> None:
        for metric, labels in other.labels.items():
            self.use([metric], labels)
        for metric, groups in other.aggregated_by.items():
            self.aggregated_by.setdefault(metric, []).extend(groups)
        self.made |= other.made

    def required(self) -> dict[str, set[str]]:
        return {metric: labels - self.made for metric, labels in self.labels.items()}


def analyse(expr: str) -> Usage:
    """Walk the expression's tokens, one parenthesised group at a time: a `by (...)` before
    or after an aggregation's group applies to the metrics inside that group; `on(...)` /
    `ignoring(...)` apply to every metric of the group they appear in."""
    tokens = TOKEN.findall(expr)
    usage = Usage()

    def label_list(i: int) -> tuple[list[str], int]:
        assert tokens[i] == "(", f"expected a label list at {tokens[i:]!r} in {expr!r}"
        labels: list[str] = []
        i += 1
        while tokens[i] != ")":
            if tokens[i] != ",":
                labels.append(tokens[i])
            i += 1
        return labels, i + 1

    def selector(metric: str, i: int) -> int:
        """Matchers of `metric{...}` starting at the `{`; returns the index after `}`."""
        i += 1
        while tokens[i] != "}":
            if tokens[i + 1] in MATCH_OPERATORS and tokens[i] != "__name__":
                usage.use([metric], [tokens[i]])
            i += 1
        return i + 1

    def group(i: int, end: str | None) -> tuple[set[str], int]:
        seen: set[str] = set()
        matching: list[str] = []
        pending_by: list[str] | None = None
        last_group: set[str] = set()
        previous = ""
        strings: list[str] = []
        while i < len(tokens) and tokens[i] != end:
            token = tokens[i]
            if token == "(":
                inner_start = i
                inner, i = group(i + 1, ")")
                function = tokens[inner_start - 1] if inner_start else ""
                if function in LABEL_MAKERS:
                    made, sources = _label_maker_args(tokens, inner_start + 1)
                    usage.made.add(made)
                    usage.use(inner, sources)
                if pending_by is not None:
                    _aggregate(usage, inner, pending_by)
                    pending_by = None
                seen |= inner
                last_group = inner
                previous = ")"
                continue
            if token in ("by", "without"):
                labels, i = label_list(i + 1)
                if previous == ")":
                    _aggregate(usage, last_group, labels)
                else:
                    pending_by = labels
                previous = token
                continue
            if token in ("on", "ignoring"):
                labels, i = label_list(i + 1)
                matching += labels
                previous = token
                continue
            if token in ("group_left", "group_right"):
                i += 1
                if i < len(tokens) and tokens[i] == "(":
                    # Labels copied from the "one" side: not required of the other.
                    _, i = label_list(i)
                previous = token
                continue
            if token[0] in "\"'`":
                strings.append(token)
            elif METRIC.match(token) and (i + 1 >= len(tokens) or tokens[i + 1] != "("):
                seen.add(token)
                usage.labels.setdefault(token, set())
                if i + 1 < len(tokens) and tokens[i + 1] == "{":
                    i = selector(token, i + 1)
                    previous = "}"
                    continue
            previous = token
            i += 1
        usage.use(seen, matching)
        return seen, i + 1

    group(0, None)
    return usage


def _aggregate(usage: Usage, metrics: set[str], labels: list[str]) -> None:
    usage.use(metrics, labels)
    for metric in metrics:
        usage.aggregated_by.setdefault(metric, []).append(set(labels))


def _label_maker_args(tokens: list[str], i: int) -> tuple[str, list[str]]:
    """label_replace(v, dst, replacement, src, regex) / label_join(v, dst, sep, src...):
    the label made and the labels read, from the top-level string arguments."""
    depth, strings = 0, []
    while depth or tokens[i] != ")":
        if tokens[i] in "({[":
            depth += 1
        elif tokens[i] in ")}]":
            depth -= 1
        elif depth == 0 and tokens[i][0] in "\"'`":
            strings.append(tokens[i][1:-1])
        i += 1
    if len(strings) < 3:
        return strings[0] if strings else "", []
    sources = [strings[2]] if len(strings) == 4 else strings[2:]
    return strings[0], [s for s in sources if s]


LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$")


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every label_values() variable query."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"panel {panel['id']} {panel['title']!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if isinstance(text, str) and text.startswith("label_values("):
            found.append((f"variable {variable['name']}", text))
    return found


def analyse_any(expr: str) -> Usage:
    """An expr, or a Grafana `label_values(expr, label)` query (the label is required)."""
    match = LABEL_VALUES.match(expr)
    if match is None:
        return analyse(expr)
    usage = analyse(match["expr"])
    usage.use(list(usage.labels), [match["label"]])
    return usage


def rule_exprs() -> list[tuple[str, str]]:
    document = yaml.safe_load(RULES.read_text())
    found = []
    for group in document["spec"]["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            found.append((f"rule {group['name']}/{name}", str(rule["expr"])))
    return found


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_the_tokenizer_finds_metrics_and_the_labels_they_need() -> None:
    usage = analyse(
        'histogram_quantile(0.99, sum by (le, route) (rate(sidecar_x_bucket{pod=~"$pod",'
        ' route!=""}[$__rate_interval]))) / on (route) group_left (kind) sum(rate('
        'sidecar_y_total[5m])) without (code) + label_replace(sidecar_z, "a", "$1",'
        ' "b", "(.*)") + max(sidecar:recorded:rate5m) + kube_pod_info'
    )
    assert usage.required() == {
        "sidecar_x_bucket": {"le", "route", "pod"},
        "sidecar_y_total": {"code", "route"},
        "sidecar_z": {"b", "route"},
    }
    assert analyse_any('label_values(sidecar_b{namespace=~"$ns"}, pod)').required() == {
        "sidecar_b": {"namespace", "pod"}
    }


# --- The dashboard's own structure -------------------------------------------------------


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod", "route"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["definition"].startswith("label_values("), name
    for name in ("pod", "route"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name

    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["id"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["id"]
        assert panel.get("description"), f"panel {panel['id']} has no description"
        assert panel["datasource"]["uid"] == "${datasource}", panel["id"]
        assert panel["targets"], panel["id"]
        for target in panel["targets"]:
            # Every query is scoped to the chosen namespace and pods.
            assert 'namespace=~"$namespace"' in target["expr"], (panel["id"], target["expr"])
            assert 'pod=~"$pod"' in target["expr"], (panel["id"], target["expr"])

    states = [p for p in panels if "sidecar_circuit_state" in json.dumps(p.get("targets"))]
    assert states
    for panel in states:
        mappings = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
        assert {k: v["text"] for k, v in mappings.items()} == {
            "0": "closed",
            "1": "half-open",
            "2": "open",
        }

    # The organisation label is unbounded in general: never one series per organisation.
    for where, expr in dashboard_exprs(dashboard):
        usage = analyse_any(expr)
        for labels in usage.required().values():
            assert "org" not in labels, f"{where} shows the org label: {expr}"
        for groups in usage.aggregated_by.values():
            assert all("org" not in labels for labels in groups), f"{where}: {expr}"
        if "sidecar_quota_usage_ratio" in usage.labels:
            assert usage.aggregated_by.get("sidecar_quota_usage_ratio"), f"{where}: {expr}"


# --- A real sidecar, a real Prometheus ---------------------------------------------------


class App:
    """The app behind the sidecar, and the OTLP collector its spans go to."""

    def __init__(self) -> None:
        self.spans_posted = 0

    def app(self) -> web.Application:
        async def ok(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=201, text="created")

        async def boom(request: web.Request) -> web.Response:
            return web.Response(status=500, text="boom")

        async def unavailable(request: web.Request) -> web.Response:
            return web.Response(status=503, text="down")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(1.0)
            return web.Response(text="late")

        async def traces(request: web.Request) -> web.Response:
            await request.read()
            self.spans_posted += 1
            return web.Response(status=200, content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_route("*", "/orders{tail:.*}", ok)
        app.router.add_route("*", "/boom", boom)
        app.router.add_route("*", "/flaky", unavailable)
        app.router.add_route("*", "/slow", slow)
        app.router.add_post("/v1/traces", traces)
        return app


def policies(redis_url: str, upstream: str) -> str:
    """Every policy on: quotas (per organisation), idempotency, breakers, retries,
    bulkheads, tracing with span export, all on the real Redis."""
    return f"""\
state:
  url: "{redis_url}"
  timeout: 500ms
tracing:
  sample_ratio: 1.0
  export:
    endpoint: {upstream}/v1/traces
    interval: 100ms
    timeout: 1s
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    max_in_flight: 50
    idempotency: {{methods: [POST], ttl: 1h}}
    quotas:
      limits: [{{name: hourly, kind: rate, limit: 4, window: 1h}}]
      near_limit_ratio: 0.5
      report_orgs: [acme]
      max_in_flight: 10
      on_store_error: local
    circuit_breaker: {{min_requests: 100}}
    retry: {{attempts: 2, backoff: 0s, on: [connect_error, 503]}}
  - name: flaky
    match: {{path_prefix: /flaky}}
    circuit_breaker: {{min_requests: 2, consecutive_failures: 2, open_for: 1m, failures: [503]}}
    retry: {{attempts: 2, backoff: 0s, on: [503], budget: 0.0, min_retries: 1}}
  - name: slow
    match: {{path_prefix: /slow}}
    timeout: 300ms
    max_in_flight: 1
  - name: default
    match: {{path_prefix: /}}
"""


@dataclass
class Stack:
    app: App
    sidecar: SidecarProcess
    prometheus: PrometheusServer
    config_path: Path


@pytest.fixture
async def stack(tmp_path: Path, redis_url: str) -> AsyncIterator[Stack]:
    app = App()
    async with run_app(app.app()) as upstream:
        config_path = tmp_path / "sidecar.yaml"
        port, admin_port = free_port(), free_port()
        write_config(
            str(config_path),
            upstream,
            port,
            admin_port,
            server={"reload_interval": "0s", "drain": "0s"},
            extra=policies(redis_url, upstream),
        )
        checker = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sidecar", "check-config", str(config_path)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(20):
            output, _ = await checker.communicate()
        assert checker.returncode == 0, output.decode()
        sidecar = SidecarProcess(str(config_path), port, admin_port)
        prometheus_dir = tmp_path / "prometheus"
        prometheus_dir.mkdir()
        prometheus = PrometheusServer(
            prometheus_dir, scrape_config(f"127.0.0.1:{admin_port}", TARGET_LABELS)
        )
        try:
            await sidecar.start()
            await prometheus.start()
            yield Stack(app, sidecar, prometheus, config_path)
        finally:
            await prometheus.stop()
            await sidecar.stop()


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **headers: str
) -> aiohttp.ClientResponse:
    async with session.request(method, url, headers=headers) as response:
        await response.read()
        return response


async def drive_traffic(stack: Stack, redis_server: RedisServer) -> None:
    base = stack.sidecar.url
    async with aiohttp.ClientSession() as session:
        # Idempotency: a POST claims its key, the same POST again is replayed.
        key = {"Idempotency-Key": "order-1", "X-Org-Id": "acme"}
        first = await call(session, "POST", base + "/orders", **key)
        assert first.status == 201
        again = await call(session, "POST", base + "/orders", **key)
        assert again.status == 201
        # Quotas: acme's hourly limit of 4 runs out (crossing near_limit_ratio on the way).
        statuses = [
            (await call(session, "GET", base + "/orders", **{"X-Org-Id": "acme"})).status
            for _ in range(5)
        ]
        assert 429 in statuses, statuses
        # An app 500 on the catch-all route.
        assert (await call(session, "GET", base + "/boom")).status == 500
        # The breaker: 503s (each retried once, while the budget lasts) until it opens.
        flaky = [(await call(session, "GET", base + "/flaky")).status for _ in range(4)]
        assert flaky == [503] * 4
        # The bulkhead: one slow request times out upstream, the one beside it is refused.
        slow = await asyncio.gather(
            call(session, "GET", base + "/slow"), call(session, "GET", base + "/slow")
        )
        assert sorted(r.status for r in slow) == [503, 504]
        # A state store outage: quotas decide locally, the store counts its errors.
        redis_server.stop()
        try:
            outage = await call(session, "GET", base + "/orders", **{"X-Org-Id": "globex"})
            assert outage.status == 201
        finally:
            redis_server.start()
    # Config reloads: one that works (SIGHUP forces it), one of a broken file.
    stack.sidecar.signal(signal.SIGHUP)
    await stack.sidecar.wait_event("config.reloaded")
    stack.config_path.write_text(stack.config_path.read_text() + "routes: []\n")
    stack.sidecar.signal(signal.SIGHUP)
    await stack.sidecar.wait_event("config.reload_failed")


async def scraped_after(stack: Stack, session: aiohttp.ClientSession, moment: float) -> None:
    """Poll until `up` is 1 in a scrape that began after `moment` (Unix time)."""
    while True:
        result = await stack.prometheus.api(session, "query", query='up{job="sidecar"}')
        if result["result"]:
            sample = result["result"][0]
            timestamp, value = sample["value"]
            if float(timestamp) > moment and value == "1":
                # The instant query's timestamp is "now"; the scrape itself must be newer.
                scrape = await stack.prometheus.api(
                    session, "query", query='timestamp(up{job="sidecar"})'
                )
                if float(scrape["result"][0]["value"][1]) > moment:
                    return
        await asyncio.sleep(0.1)


async def series_labels(
    stack: Stack, session: aiohttp.ClientSession, metric: str
) -> list[dict[str, str]]:
    return await stack.prometheus.api(session, "series", **{"match[]": metric})  # type: ignore[no-any-return]


def metadata_name(metric: str) -> list[str]:
    """Names Prometheus may keep the metadata under: the sample name, and for histogram
    series the family name."""
    names = [metric]
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            names.append(metric.removesuffix(suffix))
    return names


def exprs_to_check() -> list[tuple[str, str]]:
    return dashboard_exprs(load_dashboard()) + rule_exprs()


async def test_every_metric_the_dashboard_and_rules_query_is_scraped_with_its_labels(
    stack: Stack, redis_server: RedisServer
) -> None:
    exprs = exprs_to_check()
    assert any(where.startswith("rule ") for where, _ in exprs), "no rule expr to check"
    required: dict[str, set[str]] = {}
    used_in: dict[str, list[str]] = {}
    for where, expr in exprs:
        for metric, labels in analyse_any(expr).required().items():
            required.setdefault(metric, set()).update(labels)
            used_in.setdefault(metric, []).append(where)
    assert required, "no sidecar metric found in the exprs"

    async with asyncio.timeout(TEST_TIMEOUT), aiohttp.ClientSession() as session:
        await drive_traffic(stack, redis_server)
        await scraped_after(stack, session, time.time())

        up = await stack.prometheus.api(session, "query", query="up")
        assert [s["value"][1] for s in up["result"]] == ["1"], up
        assert {k: up["result"][0]["metric"][k] for k in TARGET_LABELS} == TARGET_LABELS

        metadata: dict[str, list[dict[str, str]]] = await stack.prometheus.api(session, "metadata")
        problems: list[str] = []
        for metric, labels in sorted(required.items()):
            where = "; ".join(sorted(set(used_in[metric])))
            if not any(name in metadata for name in metadata_name(metric)):
                problems.append(f"{metric}: no metadata (not exported?), used by {where}")
                continue
            series = await series_labels(stack, session, metric)
            if not series:
                if metric not in METADATA_ONLY:
                    problems.append(f"{metric}: metadata but no series, used by {where}")
                continue
            present = set().union(*(s.keys() for s in series))
            missing = labels - present
            if missing:
                problems.append(
                    f"{metric}: no series has label(s) {sorted(missing)} "
                    f"(has {sorted(present - {'__name__'})}), used by {where}"
                )
        assert not problems, "\n".join(problems)

        # The traffic did what it was for: the labelled series the panels are about.
        for selector in (
            'sidecar_requests_total{code="500"}',
            'sidecar_requests_total{code="429"}',
            'sidecar_idempotency_total{outcome="replayed"}',
            'sidecar_ratelimit_decisions_total{decision="denied"}',
            'sidecar_ratelimit_near_limit_total{route="orders"}',
            'sidecar_quota_usage_ratio{org="acme"}',
            'sidecar_circuit_transitions_total{route="flaky", to="open"}',
            'sidecar_circuit_rejected_total{route="flaky"}',
            'sidecar_retries_total{route="flaky", reason="503"}',
            'sidecar_upstream_errors_total{route="slow", kind="timeout"}',
            'sidecar_bulkhead_rejected_total{route="slow"}',
            'sidecar_store_errors_total{kind="unavailable"}',
            'sidecar_ratelimit_store_fallbacks_total{action="local"}',
            'sidecar_config_reloads_total{result="success"}',
            'sidecar_config_reloads_total{result="error"}',
        ):
            result = await stack.prometheus.api(session, "query", query=f"max({selector})")
            values = [float(s["value"][1]) for s in result["result"]]
            assert values and values[0] > 0, f"{selector} is not above 0: {result}"
