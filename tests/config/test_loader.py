"""Valid configs: defaults, conversions, env expansion, defaults merging, the shipped examples."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import time
from pathlib import Path

import pytest

from sidecar.config import (
    AccessLogConfig,
    Address,
    ConfigError,
    RouteConfig,
    RouteMatch,
    SidecarConfig,
    UpstreamConfig,
    describe_config,
    embedded_config,
    load_config,
    parse_config,
)
from sidecar.config.issues import IssueLog
from sidecar.config.loader import (
    ACCESS_LOG,
    B3,
    IDEMPOTENCY,
    IDENTITY,
    LOGGING,
    MATCH,
    ROUTE,
    ROUTE_TRACING,
    SECTIONS,
    SERVER,
    SPAN_EXPORT,
    STATE,
    TRACING,
    UPSTREAM,
    _deep_merge,
)
from sidecar.config.raw import RawMap, RawScalar, compose

REPO = Path(__file__).resolve().parents[2]
BUILTIN_REDACTED = {"authorization", "proxy-authorization", "cookie", "set-cookie"}


def parse(text: str, env: dict[str, str] | None = None) -> SidecarConfig:
    return parse_config(text, source="t.yaml", env=env or {})


def test_empty_mapping_gives_model_defaults_and_a_catch_all_route() -> None:
    config = parse("{}\n")
    assert config.server == SidecarConfig().server
    assert config.upstream == UpstreamConfig()
    assert config.state == SidecarConfig().state
    assert config.logging == SidecarConfig().logging
    assert config.routes == (
        RouteConfig(name="default", match=RouteMatch(path_prefix="/"), max_body=10 * 1024 * 1024),
    )
    assert config.routes[0].match.is_catch_all


def test_empty_sections_and_empty_routes_mean_defaults() -> None:
    config = parse("server:\nroutes: []\n")
    assert config.server == SidecarConfig().server
    assert [route.name for route in config.routes] == ["default"]


def test_source_sha256_and_loaded_at(tmp_path: Path) -> None:
    text = "upstream:\n  url: http://app:${PORT:-9000}\n"
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    before = time.time()
    config = load_config(path, env={})
    assert config.source == str(path)
    assert config.sha256 == hashlib.sha256(text.encode()).hexdigest()  # before expansion
    assert before <= config.loaded_at <= time.time()
    assert config.upstream.port == 9000
    assert parse_config(text, env={}).source == "<string>"
    assert parse_config(text, env={}).sha256 == config.sha256


def test_every_key_is_converted() -> None:
    config = parse(
        """
server:
  listen: "[::]:8080"
  admin_listen: 127.0.0.1:9000
  max_body: 2MiB
  drain: 0s
  shutdown_grace: 1m
  workers: 4
  keepalive_timeout: 30s
  trusted_proxies: [10.0.0.0/8, 192.168.1.1, "fd00::/8"]
  reload_interval: 0s
  ready_requires_state: true
upstream:
  url: https://App.internal:8443/api/v1/
  connect_timeout: 500ms
  max_connections: 32
  idle_timeout: 1s
  health_path: /health
  websocket_max_message: 1MiB
state:
  url: redis://redis:6379/2
  key_prefix: "app:"
  timeout: 50ms
  max_connections: 8
identity:
  org_header: X-Tenant
  user_header: X-Subject
logging:
  level: WARNING
  access:
    enabled: false
    sample: 0.25
    include_query: true
    headers: [User-Agent, Referer, user-agent]
    redact_headers: [X-Api-Key]
"""
    )
    server = config.server
    assert server.listen == Address("::", 8080)
    assert str(server.listen) == "[::]:8080"
    assert server.admin_listen == Address("127.0.0.1", 9000)
    assert server.max_body == 2 * 1024 * 1024
    assert (server.drain, server.shutdown_grace, server.keepalive_timeout) == (0.0, 60.0, 30.0)
    assert server.workers == 4
    assert server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert server.reload_interval == 0.0
    assert server.ready_requires_state is True
    assert config.upstream == UpstreamConfig(
        url="https://App.internal:8443/api/v1/",
        scheme="https",
        host="app.internal",
        port=8443,
        base_path="/api/v1",
        connect_timeout=0.5,
        max_connections=32,
        idle_timeout=1.0,
        health_path="/health",
        websocket_max_message=1024 * 1024,
    )
    assert config.state.url == "redis://redis:6379/2"
    assert (config.state.key_prefix, config.state.timeout) == ("app:", 0.05)
    assert config.state.max_connections == 8
    assert (config.identity.org_header, config.identity.user_header) == ("x-tenant", "x-subject")
    assert config.logging.level == "warning"
    assert config.logging.access == AccessLogConfig(
        enabled=False,
        sample=0.25,
        include_query=True,
        headers=("user-agent", "referer"),
        redact_headers=frozenset(BUILTIN_REDACTED | {"x-api-key"}),
    )


def test_upstream_default_ports_and_no_path() -> None:
    assert parse("upstream: {url: 'http://app'}").upstream.port == 80
    assert parse("upstream: {url: 'https://app'}").upstream.port == 443
    assert parse("upstream: {url: 'http://[::1]:81/'}").upstream.host == "::1"
    assert parse("upstream: {url: 'http://app/'}").upstream.base_path == ""


def test_health_path_null_means_none() -> None:
    assert parse("upstream: {health_path: null}").upstream.health_path is None


def test_access_log_redaction_keeps_builtins_when_not_set() -> None:
    assert parse("{}").logging.access.redact_headers == BUILTIN_REDACTED


def test_sample_accepts_integer_bounds() -> None:
    assert parse("logging: {access: {sample: 0}}").logging.access.sample == 0.0
    assert parse("logging: {access: {sample: 1}}").logging.access.sample == 1.0


def test_route_match_conversions() -> None:
    config = parse(
        """
routes:
  - name: a
    match: {path_regex: "^/items/[0-9]+$", methods: [get, Post]}
  - name: b
    match: {host: "*.Example.COM", path_prefix: /static/}
  - name: c
    match: {host: api.example.com., path: /exact}
  - name: default
    match: {path_prefix: /}
"""
    )
    a, b, c, default = config.routes
    assert a.match.path_regex == re.compile("^/items/[0-9]+$")
    assert a.match.methods == frozenset({"GET", "POST"})
    assert b.match.host == "*.example.com"
    assert b.match.path_prefix == "/static/"
    assert c.match.host == "api.example.com"
    assert c.match.path == "/exact"
    assert [route.line for route in config.routes] == [3, 5, 7, 9]
    assert default.match.is_catch_all
    assert not b.match.is_catch_all


def test_route_max_body_defaults_to_server_max_body() -> None:
    config = parse(
        "server: {max_body: 1KiB}\n"
        "routes:\n  - {name: a, match: {path: /a}}\n  - {name: b, match: {path: /b}, max_body: 0}\n"
    )
    assert [route.max_body for route in config.routes] == [1024, 0]
    implicit = parse("server: {max_body: 2KiB}\n").routes[0]
    assert implicit.max_body == 2048


def test_defaults_apply_where_a_route_is_silent() -> None:
    config = parse(
        """
defaults:
  timeout: 5s
  max_body: 1KiB
routes:
  - name: a
    match: {path: /a}
  - name: b
    match: {path: /b}
    timeout: 30s
"""
    )
    a, b = config.routes
    assert (a.timeout, a.max_body, a.idle_timeout) == (5.0, 1024, 300.0)
    assert (b.timeout, b.max_body) == (30.0, 1024)


def test_defaults_apply_to_the_implicit_route() -> None:
    (route,) = parse("defaults: {timeout: 2s, idle_timeout: 10s}\n").routes
    assert (route.name, route.timeout, route.idle_timeout) == ("default", 2.0, 10.0)


def raw_map(text: str) -> RawMap:
    log = IssueLog("t.yaml")
    node = compose(text, log, {})
    assert not log
    assert isinstance(node, RawMap)
    return node


def plain(node: object) -> object:
    """A raw tree as plain Python values, to compare merges by content."""
    if isinstance(node, RawMap):
        return {key: plain(entry.value) for key, entry in node.entries.items()}
    assert isinstance(node, RawScalar)
    return node.value


def test_defaults_deep_merge_nested_mappings_route_wins() -> None:
    # Route-level mappings (policy sections such as a future `idempotency:`) merge key by key.
    defaults = raw_map("timeout: 5s\npolicy: {ttl: 24h, header: Idempotency-Key, limits: {a: 1}}\n")
    route = raw_map("name: r\npolicy: {ttl: 1h, limits: {b: 2}}\ntimeout: 9s\n")
    merged = _deep_merge(defaults, route)
    assert plain(merged) == {
        "name": "r",
        "policy": {"ttl": "1h", "limits": {"b": 2, "a": 1}, "header": "Idempotency-Key"},
        "timeout": "9s",
    }
    # A scalar in the route replaces a mapping default outright (and vice versa).
    assert plain(_deep_merge(raw_map("policy: {ttl: 1h}\n"), raw_map("policy: off\n"))) == {
        "policy": False
    }


def test_env_expansion_with_default_escape_and_retyping() -> None:
    config = parse(
        """
server:
  workers: ${WORKERS:-2}
  ready_requires_state: ${READY_STATE:-false}
upstream:
  url: http://${APP_HOST}:${APP_PORT:-8080}/api
state:
  url: "redis://:${REDIS_PASSWORD}@redis:6379/0?client_name=$${literal}${SUFFIX:-}"
  key_prefix: "${PREFIX:-}"
logging:
  level: ${LOG_LEVEL:-info}
""",
        env={"APP_HOST": "app", "REDIS_PASSWORD": "s3cr:t", "WORKERS": "", "LOG_LEVEL": "debug"},
    )
    assert config.server.workers == 2  # set but empty: the default applies, as in the shell
    assert config.server.ready_requires_state is False
    assert config.upstream.url == "http://app:8080/api"
    assert (config.upstream.host, config.upstream.port) == ("app", 8080)
    assert config.state.url == "redis://:s3cr:t@redis:6379/0?client_name=${literal}"
    assert config.state.key_prefix == ""
    assert config.logging.level == "debug"


def test_env_value_is_text_where_text_is_expected() -> None:
    # Unquoted ${...} is re-typed after expansion, yet a number is still a fine string.
    config = parse("state:\n  key_prefix: ${PREFIX}\n", env={"PREFIX": "123"})
    assert config.state.key_prefix == "123"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TEST_UPSTREAM", "http://from-env:1234")
    config = parse_config("upstream: {url: '${SIDECAR_TEST_UPSTREAM}'}\n")
    assert config.upstream.host == "from-env"
    monkeypatch.delenv("SIDECAR_TEST_UPSTREAM")
    with pytest.raises(ConfigError):
        parse_config("upstream: {url: '${SIDECAR_TEST_UPSTREAM}'}\n")


def test_yaml_merge_keys_and_extension_keys() -> None:
    config = parse(
        """
x-timeouts: &fast {timeout: 1s, idle_timeout: 2s}
routes:
  - <<: *fast
    name: a
    match: {path: /a}
    timeout: 3s
"""
    )
    (route,) = config.routes
    assert (route.timeout, route.idle_timeout) == (3.0, 2.0)


def test_result_is_frozen() -> None:
    config = parse("{}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.workers = 2  # type: ignore[misc]


@pytest.mark.parametrize("name", ["sidecar.example.yaml", "minimal.yaml"])
def test_shipped_configs_load_cleanly(name: str) -> None:
    config = load_config(REPO / "config" / name, env={})
    assert config.routes[-1].match.is_catch_all


def test_example_config_uses_every_key() -> None:
    from sidecar.config.resilience import BREAKER, FALLBACK, HALF_OPEN, RETRY, SLOW_CALL

    text = (REPO / "config" / "sidecar.example.yaml").read_text()
    schemas = (
        *(SECTIONS, SERVER, UPSTREAM, STATE, IDENTITY, LOGGING, ACCESS_LOG, ROUTE, MATCH),
        *(TRACING, B3, SPAN_EXPORT, ROUTE_TRACING, IDEMPOTENCY),
        *(BREAKER, SLOW_CALL, HALF_OPEN, FALLBACK, RETRY),
    )
    keys = {"defaults", "routes"}.union(*schemas)
    written = set(re.findall(r"(?:^\s*(?:- )?|[{ ])([a-z_][a-z0-9_]*):", text, re.MULTILINE))
    assert sorted(keys - written) == []


def test_example_config_values() -> None:
    config = load_config(REPO / "config" / "sidecar.example.yaml", env={})
    assert [route.name for route in config.routes] == [
        "orders-create",
        "order-by-id",
        "admin-site",
        "health",
        "events",
        "default",
    ]
    assert config.routes[0].max_body == 1024 * 1024
    assert config.routes[4].idle_timeout == 3600.0
    assert config.state.url == "memory://"
    redis = load_config(
        REPO / "config" / "sidecar.example.yaml", env={"STATE_URL": "redis://:pw@r:6379/0"}
    )
    assert redis.state.url == "redis://:pw@r:6379/0"


def test_embedded_config() -> None:
    before = time.time()
    config = embedded_config()
    assert config.source == "<embedded>"
    assert before <= config.loaded_at <= time.time()
    assert config.server == SidecarConfig().server
    assert config.upstream == UpstreamConfig()
    assert config.state.url == "memory://"
    assert config.routes == (
        RouteConfig(name="default", match=RouteMatch(path_prefix="/"), max_body=10 * 1024 * 1024),
    )


def test_embedded_config_with_upstream_url() -> None:
    upstream = embedded_config("http://127.0.0.1:5000/base/").upstream
    assert (upstream.url, upstream.host, upstream.port) == (
        "http://127.0.0.1:5000/base/",
        "127.0.0.1",
        5000,
    )
    assert upstream.base_path == "/base"
    with pytest.raises(ConfigError) as caught:
        embedded_config("ftp://x")
    assert str(caught.value) == (
        "<embedded>:0: upstream.url: expected a URL like http://127.0.0.1:8080 or"
        " http://app:8080/api, got 'ftp://x' (the scheme must be http or https)"
    )


def test_describe_config_masks_the_redis_password() -> None:
    config = parse(
        """
server: {listen: 0.0.0.0:8001, admin_listen: "[::1]:9001"}
upstream: {url: "http://app:8080/api"}
state: {url: "redis://:${REDIS_PASSWORD}@redis:6379/0"}
routes:
  - name: orders-create
    match: {path_prefix: /orders, methods: [POST, PUT]}
    timeout: 12s
    max_body: 1MiB
  - name: default
    match: {path_prefix: /}
""",
        env={"REDIS_PASSWORD": "hunter2"},
    )
    text = describe_config(config)
    assert "hunter2" not in text
    assert text == "\n".join(
        [
            "source:   t.yaml",
            f"sha256:   {config.sha256}",
            "listen:   0.0.0.0:8001 (admin [::1]:9001), workers: 1",
            "upstream: http://app:8080/api (base path /api)",
            "state:    redis://:****@redis:6379/0",
            "routes (first match wins):",
            "  #  name           match                         timeout  idle_timeout  max_body",
            "  1  orders-create  POST,PUT path_prefix=/orders  12s      5m            1MiB",
            "  2  default        path_prefix=/                 15s      5m            10MiB",
        ]
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("memory://", "memory://"),
        ("redis://user:pw@redis:6379/0", "redis://user:****@redis:6379/0"),
        ("redis://user@redis:6379/0", "redis://user@redis:6379/0"),
        ("rediss://:pw@redis:6380/0?password=pw2&ssl_cert_reqs=none", None),
        ("redis+sentinel://:pw@h1:26379,h2:26379/mymaster/0", None),
        ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=****"),
    ],
)
def test_describe_config_masks_every_password_form(url: str, shown: str | None) -> None:
    config = parse(f"state: {{url: '{url}'}}\n")
    state_line = next(
        line for line in describe_config(config).splitlines() if line.startswith("state:")
    )
    assert "pw" not in state_line.replace("password", "")
    if shown is not None:
        assert state_line == f"state:    {shown}"
