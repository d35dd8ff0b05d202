"""Every kind of config mistake, one fixture each, down to the exact FILE:LINE: path: message."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from sidecar.config import ConfigError, ConfigIssue, load_config, parse_config

FIXTURES = Path(__file__).parent / "fixtures"

# fixture -> the exact issue lines, with FILE standing for the fixture's path as given.
EXPECTED: dict[str, list[str]] = {
    "unknown_key.yaml": [
        "FILE:4: server.colour: unknown key 'colour'; expected one of: listen, admin_listen,"
        " max_body, drain, shutdown_grace, workers, keepalive_timeout, trusted_proxies,"
        " reload_interval, ready_requires_state, header_timeout, max_connections",
    ],
    "typo_suggestion.yaml": [
        "FILE:4: routes[0].maxbody: unknown key 'maxbody'; did you mean 'max_body'?",
    ],
    "wrong_type.yaml": [
        "FILE:2: server.workers: expected an integer >= 1, got '4'",
        "FILE:5: logging.access.enabled: expected true or false, got 'yes'",
    ],
    "bad_duration.yaml": [
        "FILE:3: upstream.connect_timeout: expected a duration like 250ms, 15s or 24h, got 'fast'",
        "FILE:7: routes[0].timeout: expected a duration like 250ms, 15s or 24h, got 30"
        " (a duration needs a unit, e.g. 30s)",
    ],
    "bad_size.yaml": [
        "FILE:2: server.max_body: expected a size like 512B, 64KiB or 10MiB, got '10mb'"
        " (units are case-sensitive: did you mean 10MB?)",
    ],
    "bad_regex.yaml": [
        "FILE:6: routes[1].match.path_regex: invalid regular expression '^/items/([0-9+$':"
        " unterminated character set at position 9",
    ],
    "duplicate_route_name.yaml": [
        "FILE:4: routes[1].name: duplicate route name 'orders' (first used at line 2)",
    ],
    "unreachable_route.yaml": [
        "FILE:4: routes[1]: unreachable: route 'default' at line 2 matches every request",
    ],
    "duplicate_mapping_key.yaml": [
        "FILE:4: server.listen: duplicate key 'listen' (first set at line 2)",
    ],
    "unset_env_var.yaml": [
        "FILE:2: state.url: environment variable REDIS_PASSWORD is not set and has no default",
    ],
    "bad_listen_address.yaml": [
        "FILE:2: server.listen: expected an address like 0.0.0.0:8000 or '[::]:8000',"
        " got '0.0.0.0' (host and port are both required)",
    ],
    "bad_upstream_url.yaml": [
        "FILE:2: upstream.url: expected a URL like http://127.0.0.1:8080 or http://app:8080/api,"
        " got 'http://app:8080/api?debug=1' (a query or fragment is not allowed)",
    ],
    "bad_state_url_scheme.yaml": [
        "FILE:2: state.url: expected a URL like memory:// or redis://host:6379/0,"
        " got 'memcached://cache:11211'"
        " (the scheme must be one of memory, redis, rediss, redis+sentinel, unix)",
    ],
    "empty.yaml": [
        "FILE:1: (document): the file is empty; expected a mapping like 'upstream: {url: ...}'",
    ],
    "syntax_error.yaml": [
        "FILE:3: (document): invalid YAML: while parsing a block mapping, expected <block end>,"
        " but found '<block mapping start>' (check the indentation)",
    ],
    # Several mistakes at once: all of them, in file order, not just the first.
    "several_errors.yaml": [
        "FILE:2: server.workers: expected an integer >= 1, got 0",
        "FILE:3: server.drain: expected a duration like 250ms, 15s or 24h, got 5"
        " (a duration needs a unit, e.g. 5s)",
        "FILE:5: upstream.url: expected a URL like http://127.0.0.1:8080 or"
        " http://app:8080/api, got 'ftp://files' (the scheme must be http or https)",
        "FILE:7: logging.level: expected one of debug, info, warning, error, got 'verbose'",
        "FILE:10: routes[0].match.path_prefix: expected a path starting with '/', got 'orders'",
        "FILE:11: routes[1].name: expected a name of 1 to 64 letters, digits, '_', '.' or '-',"
        " got 'has space'",
    ],
}


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_fixture_reports_exact_issues(fixture: str) -> None:
    path = FIXTURES / fixture
    expected = [line.replace("FILE", str(path), 1) for line in EXPECTED[fixture]]
    assert issues_of(path) == expected


def test_every_fixture_has_expectations() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.yaml")) == sorted(EXPECTED)


def test_issue_fields_and_error_text() -> None:
    path = FIXTURES / "wrong_type.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    first = caught.value.issues[0]
    assert first == ConfigIssue(str(path), 2, "server.workers", "expected an integer >= 1, got '4'")
    assert str(caught.value) == "\n".join(str(issue) for issue in caught.value.issues)
    assert len(caught.value.issues) == 2


def error_lines(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.yaml", env=env or {})
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "- server\n",
            "t.yaml:1: (document): expected a mapping of sections like server:, upstream:,"
            " routes: at the top level, got a list",
        ),
        (
            "sever: {}\n",
            "t.yaml:1: sever: unknown key 'sever'; did you mean 'server'?",
        ),
        (
            "server:\n  workers: true\n",
            "t.yaml:2: server.workers: expected an integer >= 1, got true",
        ),
        (
            "server:\n  ready_requires_state: 1\n",
            "t.yaml:2: server.ready_requires_state: expected true or false, got 1",
        ),
        (
            "server:\n  drain: -1s\n",
            "t.yaml:2: server.drain: expected a duration like 250ms, 15s or 24h, got '-1s'"
            " (durations cannot be negative)",
        ),
        (
            "state:\n  timeout: 0s\n",
            "t.yaml:2: state.timeout: expected a duration greater than zero, got '0s'",
        ),
        (
            "server:\n  max_body: -1\n",
            "t.yaml:2: server.max_body: expected a size like 512B, 64KiB or 10MiB, got -1"
            " (sizes cannot be negative)",
        ),
        (
            "server:\n  listen: ':::8000'\n",
            "t.yaml:2: server.listen: expected an address like 0.0.0.0:8000 or '[::]:8000',"
            " got ':::8000' (IPv6 addresses go in brackets, e.g. '[::]:8000')",
        ),
        (
            "server:\n  listen: 0.0.0.0:99999\n",
            "t.yaml:2: server.listen: expected an address like 0.0.0.0:8000 or '[::]:8000',"
            " got '0.0.0.0:99999' (port must be a number from 0 to 65535, got '99999')",
        ),
        (
            "server:\n  admin_listen: 0.0.0.0:8000\n",
            "t.yaml:2: server.admin_listen: admin_listen 0.0.0.0:8000 collides with listen"
            " 0.0.0.0:8000",
        ),
        (
            "server:\n  trusted_proxies: [10.0.0.0/8, 10.0.0.1/8]\n",
            "t.yaml:2: server.trusted_proxies[1]: expected an IP address or CIDR like 10.0.0.0/8,"
            " got '10.0.0.1/8' (10.0.0.1/8 has host bits set)",
        ),
        (
            "server:\n  trusted_proxies: 10.0.0.0/8\n",
            "t.yaml:2: server.trusted_proxies: expected a list of IP addresses or CIDRs like"
            " [10.0.0.0/8], got '10.0.0.0/8'",
        ),
        (
            "upstream:\n  url: http://user:pw@app:8080\n",
            "t.yaml:2: upstream.url: expected a URL like http://127.0.0.1:8080 or"
            " http://app:8080/api, got 'http://user:pw@app:8080'"
            " (credentials in the URL are not supported)",
        ),
        (
            "upstream:\n  health_path: healthz\n",
            "t.yaml:2: upstream.health_path: expected a path starting with '/', got 'healthz'",
        ),
        (
            "state:\n  key_prefix: '{app}:'\n",
            "t.yaml:2: state.key_prefix: a key prefix cannot contain '{' or '}', got '{app}:'",
        ),
        (
            "identity:\n  org_header: X Org\n",
            "t.yaml:2: identity.org_header: expected a header name like X-Org-Id, got 'X Org'",
        ),
        (
            "logging:\n  access:\n    sample: 1.5\n",
            "t.yaml:3: logging.access.sample: expected a number from 0.0 to 1.0, got 1.5",
        ),
        (
            "logging:\n  access: [enabled]\n",
            "t.yaml:2: logging.access: expected a mapping, got a list",
        ),
        (
            "routes:\n  name: x\n",
            "t.yaml:2: routes: expected a list of routes (- name: ..., match: ...), got a mapping",
        ),
        (
            "routes:\n  - orders\n",
            "t.yaml:2: routes[0]: expected a route mapping with name: and match:, got 'orders'",
        ),
        (
            "routes:\n  - match: {path: /x}\n",
            "t.yaml:2: routes[0]: missing required key 'name'",
        ),
        (
            "routes:\n  - name: x\n",
            "t.yaml:2: routes[0]: missing required key 'match'",
        ),
        (
            "routes:\n  - name: x\n    match: {}\n",
            "t.yaml:3: routes[0].match: expected at least one of path, path_prefix, path_regex,"
            " host, methods (path_prefix: / matches everything)",
        ),
        (
            "routes:\n  - name: x\n    match:\n      path: /a\n      path_regex: ^/b\n",
            "t.yaml:5: routes[0].match.path_regex: only one of path, path_prefix and path_regex"
            " can be set (path is already set at line 4)",
        ),
        (
            "routes:\n  - name: x\n    match: {host: 'api.example.com:443'}\n",
            "t.yaml:3: routes[0].match.host: expected a host without a port, got"
            " 'api.example.com:443' (host matching ignores the port)",
        ),
        (
            "routes:\n  - name: x\n    match: {methods: GET}\n",
            "t.yaml:3: routes[0].match.methods: expected a list of HTTP methods like [GET, POST],"
            " got 'GET'",
        ),
        (
            "routes:\n  - name: x\n    match: {methods: []}\n",
            "t.yaml:3: routes[0].match.methods: expected at least one HTTP method, got an empty"
            " list",
        ),
        (
            "routes:\n  - name: x\n    match: {path: /a, pth: /b}\n",
            "t.yaml:3: routes[0].match.pth: unknown key 'pth'; did you mean 'path'?",
        ),
        (
            "routes:\n  - {name: a, match: {path: /x}}\n  - {name: b, match: {path: /x}}\n",
            "t.yaml:3: routes[1]: unreachable: route 'a' at line 2 has the same match",
        ),
        (
            "defaults:\n  match: {path: /}\n",
            "t.yaml:2: defaults.match: 'match' is set per route and cannot have a default",
        ),
        (
            "defaults:\n  timout: 1s\n",
            "t.yaml:2: defaults.timout: unknown key 'timout'; did you mean 'timeout'?",
        ),
        (
            "state:\n  key_prefix: ${BAD NAME}\n",
            "t.yaml:2: state.key_prefix: malformed reference '${BAD NAME}': expected ${NAME} or"
            " ${NAME:-default} (write $${ for a literal ${)",
        ),
        (
            "state:\n  key_prefix: ${UNCLOSED\n",
            "t.yaml:2: state.key_prefix: malformed reference '${UNCLOSED': expected ${NAME} or"
            " ${NAME:-default} (write $${ for a literal ${)",
        ),
        (
            "server: !!python/object:os.system {}\n",
            "t.yaml:1: server: unsupported YAML tag '!!python/object:os.system'",
        ),
        (
            "a: &loop [*loop]\nx-ok: 1\n",
            "t.yaml:1: a[0]: recursive YAML alias",
        ),
    ],
)
def test_single_issue(text: str, expected: str) -> None:
    assert error_lines(text)[0] == expected


def test_bad_default_is_reported_once_not_per_route() -> None:
    text = (
        "defaults:\n  timeout: soon\n"
        "routes:\n  - {name: a, match: {path: /a}}\n  - {name: b, match: {path: /b}}\n"
    )
    assert error_lines(text) == [
        "t.yaml:2: defaults.timeout: expected a duration like 250ms, 15s or 24h, got 'soon'",
    ]


def test_unset_variable_is_not_also_a_type_error() -> None:
    assert error_lines("server:\n  workers: ${WORKERS}\n") == [
        "t.yaml:2: server.workers: environment variable WORKERS is not set and has no default",
    ]


def test_route_with_a_bad_match_still_claims_its_name() -> None:
    text = "routes:\n  - {name: a, match: {path: nope}}\n  - {name: a, match: {path: /b}}\n"
    assert error_lines(text) == [
        "t.yaml:2: routes[0].match.path: expected a path starting with '/', got 'nope'",
        "t.yaml:3: routes[1].name: duplicate route name 'a' (first used at line 2)",
    ]


def test_every_route_behind_a_catch_all_is_reported() -> None:
    text = (
        "routes:\n"
        "  - {name: all, match: {path_prefix: /}}\n"
        "  - {name: a, match: {path: /a}}\n"
        "  - {name: b, match: {host: example.com}}\n"
    )
    assert error_lines(text) == [
        "t.yaml:3: routes[1]: unreachable: route 'all' at line 2 matches every request",
        "t.yaml:4: routes[2]: unreachable: route 'all' at line 2 matches every request",
    ]


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server:\n  listen: caf\xe9:80\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert [str(i) for i in caught.value.issues] == [
        f"{path}:2: (document): the file is not valid UTF-8 (invalid continuation byte at byte 21)",
    ]


def test_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_config_error_survives_pickling() -> None:
    # Exception pickles only its message by default; issues must survive a process boundary.
    issue = ConfigIssue("a.yaml", 3, "server.workers", "expected an integer >= 1, got 0")
    copy = pickle.loads(pickle.dumps(ConfigError([issue])))
    assert copy.issues == (issue,)
    assert str(copy) == "a.yaml:3: server.workers: expected an integer >= 1, got 0"
