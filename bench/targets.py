"""The target table: what is measured, as data. One entry per target.

A target names the proxy in front of the backend (none, nginx, the naive aiohttp proxy of
bench/naive_proxy.py, or the sidecar with some configuration), the request wrk sends, and
the backend path (which fixes the body size).
Sidecar targets list the policy fragments they switch on by name; the fragments live in
bench/policies.yaml, the one file to edit when a policy lands with other key names.

`requires` names the feature a target waits for. Such a target is measured only when
`sidecar check-config` accepts its generated config; otherwise the report says "not
available yet". Targets without `requires` must always work: a rejected config there is a
harness bug and stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BENCH_DIR = Path(__file__).resolve().parent
POLICIES_FILE = BENCH_DIR / "policies.yaml"

Kind = Literal["direct", "nginx", "naive", "sidecar"]
Pinning = Literal["pinned", "unpinned"]
BOTH: frozenset[Pinning] = frozenset({"pinned", "unpinned"})
PINNED_ONLY: frozenset[Pinning] = frozenset({"pinned"})
UNPINNED_ONLY: frozenset[Pinning] = frozenset({"unpinned"})

# Backend paths and the body each returns (see templates/nginx-backend.conf).
BODY_PATHS = {"100B": "/", "16KiB": "/16k", "1MiB": "/1m"}
ALL_POLICIES = ("tracing", "quota", "breaker", "idempotency")


@dataclass(frozen=True)
class Target:
    name: str
    kind: Kind
    title: str
    # Response body size; ratios compare a target with the references of the same size.
    body: str = "100B"
    # wrk script in bench/wrk/ (without .lua).
    script: str = "get"
    # Policy fragment names from bench/policies.yaml, merged into the route.
    policies: tuple[str, ...] = ()
    # Feature this target waits for (None: must work today).
    requires: str | None = None
    state: Literal["memory", "redis"] = "memory"
    access_log: bool = False
    # True: the policies that are on by default stay on (no `disable:` fragments), as the
    # sidecar's embedded default config ships them; False: every policy not listed is off.
    shipped_defaults: bool = False
    workers: int = 1
    # In which pinning modes the full run measures it (the unpinned run is the short list
    # the aims need, to keep the full run within its time budget).
    pinnings: frozenset[Pinning] = BOTH
    smoke: bool = False
    # Extra sidecar settings merged into the generated config (a nested mapping).
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return BODY_PATHS[self.body]

    @property
    def method(self) -> str:
        return "GET" if self.script == "get" else "POST"


def _sizes(prefix: str, kind: Kind, title: str) -> list[Target]:
    """The 16 KiB and 1 MiB variants of a reference target (pinned run only)."""
    return [
        Target(
            f"{prefix}-{size.lower()}",
            kind,
            f"{title}, {size} body",
            body=size,
            pinnings=PINNED_ONLY,
        )
        for size in ("16KiB", "1MiB")
    ]


TARGETS: tuple[Target, ...] = (
    # The references: the limit, the peer to beat, and the sidecar's own floor.
    Target("direct", "direct", "wrk straight to the backend (the limit)", smoke=True),
    Target("nginx", "nginx", "nginx proxy_pass, upstream keepalive 64, 1 worker", smoke=True),
    Target(
        "naive",
        "naive",
        "naive aiohttp proxy (bench/naive_proxy.py): one route, one ClientSession, uvloop",
        smoke=True,
    ),
    # The same POST with a fresh Idempotency-Key as the every-policy targets send: the naive
    # proxy's cost on their workload (a body read and forwarded), what their aim is judged on.
    Target(
        "naive-post",
        "naive",
        "naive aiohttp proxy, POST with fresh keys (the every-policy workload)",
        script="post_fresh_key",
        pinnings=PINNED_ONLY,
    ),
    Target("passthrough", "sidecar", "sidecar, no policies, access log off", smoke=True),
    # What a user gets without writing a config: the defaults of the embedded config
    # (tracing on every route, the access log on), the access log to the process's log file.
    Target(
        "default",
        "sidecar",
        "sidecar as shipped: default config, tracing and access log on",
        access_log=True,
        shipped_defaults=True,
        smoke=True,
    ),
    Target(
        "passthrough-log",
        "sidecar",
        "sidecar, no policies, access log on",
        access_log=True,
        pinnings=PINNED_ONLY,
    ),
    Target(
        "passthrough-post",
        "sidecar",
        "sidecar, no policies, POST (baseline for idempotency)",
        script="post",
        pinnings=PINNED_ONLY,
    ),
    # Each policy alone.
    Target(
        "tracing",
        "sidecar",
        "sidecar + tracing (export off)",
        policies=("tracing",),
        requires="tracing",
        pinnings=PINNED_ONLY,
    ),
    Target(
        "quota",
        "sidecar",
        "sidecar + quota (memory store)",
        policies=("quota",),
        requires="quota",
        pinnings=PINNED_ONLY,
    ),
    # One admission script per request on Redis: the quota's round trip on the latency path.
    Target(
        "quota-redis",
        "sidecar",
        "sidecar + quota (Redis)",
        policies=("quota",),
        requires="quota",
        pinnings=PINNED_ONLY,
        state="redis",
    ),
    Target(
        "breaker",
        "sidecar",
        "sidecar + breaker",
        policies=("breaker",),
        requires="breaker",
        pinnings=PINNED_ONLY,
    ),
    Target(
        "idem-fresh",
        "sidecar",
        "sidecar + idempotency, POST with fresh keys (memory)",
        script="post_fresh_key",
        policies=("idempotency",),
        requires="idempotency",
        pinnings=PINNED_ONLY,
    ),
    Target(
        "idem-replay",
        "sidecar",
        "sidecar + idempotency, POST replays (memory)",
        script="post_replay",
        policies=("idempotency",),
        requires="idempotency",
        pinnings=PINNED_ONLY,
    ),
    # The same on Redis: the store commands per request show the round trips.
    Target(
        "idem-fresh-redis",
        "sidecar",
        "sidecar + idempotency, POST with fresh keys (Redis)",
        script="post_fresh_key",
        policies=("idempotency",),
        requires="idempotency",
        pinnings=PINNED_ONLY,
        state="redis",
    ),
    Target(
        "idem-replay-redis",
        "sidecar",
        "sidecar + idempotency, POST replays (Redis)",
        script="post_replay",
        policies=("idempotency",),
        requires="idempotency",
        pinnings=PINNED_ONLY,
        state="redis",
    ),
    # Every policy on, fresh idempotency keys: the full latency path of a first execution.
    Target(
        "all-redis",
        "sidecar",
        "sidecar, every policy, Redis store, POST fresh keys",
        script="post_fresh_key",
        policies=ALL_POLICIES,
        requires="every policy",
        state="redis",
    ),
    Target(
        "all-memory",
        "sidecar",
        "sidecar, every policy, memory store, POST fresh keys",
        script="post_fresh_key",
        policies=ALL_POLICIES,
        requires="every policy",
    ),
    # Two worker processes on one port: only meaningful with both cores free.
    Target(
        "workers2",
        "sidecar",
        "sidecar, no policies, server.workers: 2",
        workers=2,
        pinnings=UNPINNED_ONLY,
    ),
    # Body-size variants of the references.
    *_sizes("direct", "direct", "wrk straight to the backend"),
    *_sizes("nginx", "nginx", "nginx proxy_pass"),
    *_sizes("naive", "naive", "naive aiohttp proxy"),
    *_sizes("passthrough", "sidecar", "sidecar, no policies"),
)

# What the aims and ratios are measured against.
DIRECT, NGINX, NAIVE, PASSTHROUGH = "direct", "nginx", "naive", "passthrough"
NAIVE_POST = "naive-post"
REFERENCES = (("direct", DIRECT), ("nginx", NGINX), ("naive", NAIVE), ("passthrough", PASSTHROUGH))
# The streaming check sends its bytes through these, one after the other: the two sidecar
# configurations its aim is judged on, then the naive proxy for reference.
STREAM_TARGETS = (PASSTHROUGH, "default", NAIVE)


def reference_names(target: Target) -> dict[str, str]:
    """The direct, nginx, naive and pass-through targets with the same body size as `target`.

    A target that POSTs with fresh idempotency keys is compared with the naive proxy on the
    same requests (naive-post): a body read and forwarded costs either proxy the same.
    """
    suffix = "" if target.body == "100B" else f"-{target.body.lower()}"
    names = {role: f"{role_name}{suffix}" for role, role_name in REFERENCES}
    if target.script == "post_fresh_key" and target.body == "100B":
        names["naive"] = NAIVE_POST
    return names


def policy_fragments() -> dict[str, dict[str, Any]]:
    """bench/policies.yaml: {"enable": {policy: fragment}, "disable": {policy: fragment}}."""
    import yaml  # here, so report.py (which needs targets) also runs on a python without it

    with POLICIES_FILE.open() as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise SystemExit(f"{POLICIES_FILE}: expected a mapping of policy fragments")
    return data


def select(names: list[str] | None, smoke: bool) -> list[Target]:
    """The targets of this run, in table order (interleaving follows this order)."""
    chosen = [t for t in TARGETS if t.smoke] if smoke else list(TARGETS)
    if names:
        known = {t.name for t in TARGETS}
        unknown = sorted(set(names) - known)
        if unknown:
            raise SystemExit(f"unknown target(s): {', '.join(unknown)}; see --list")
        chosen = [t for t in TARGETS if t.name in names]
    return chosen
