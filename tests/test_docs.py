"""The docs describe what the code does, in both directions: every config key, problem type,
metric, restart-only setting and admin endpoint the code has is documented where a reader
looks for it, and everything the reference documents exists in the code."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from sidecar import admin
from sidecar.app import _restart_only_changes
from sidecar.config import SidecarConfig, loader
from sidecar.errors import CATALOGUE
from sidecar.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def read(path: Path) -> str:
    return path.read_text()


def readme() -> str:
    return read(ROOT / "README.md")


def reference() -> str:
    return read(DOCS / "configuration.md")


# --- the config schemas, as the loader defines them ---------------------------------------


def _is_schema(value: object) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(key, str) and callable(conv) for key, conv in value.items())
    )


# Every schema dict of the loader (SERVER, UPSTREAM, ..., ROUTE, and any added later).
SCHEMAS: dict[str, Mapping[str, Any]] = {
    name: value
    for name, value in vars(loader).items()
    if name.isupper() and not name.startswith("_") and _is_schema(value)
}


def nested_schema(converter: Any) -> Mapping[str, Any] | None:
    """The schema a `section(...)` converter reads its mapping with (None for a plain key)."""
    for cell in getattr(converter, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if any(content is schema for schema in SCHEMAS.values()):
            return content  # type: ignore[no-any-return]
    return None


# Where the reference documents each schema: the heading (`## server`, `### match`...) whose
# table lists its keys. A nested section (`logging.access`, `tracing.b3`) is listed in its
# parent's table as dotted keys (`access.sample`), unless it has a heading of its own.
REFERENCE: dict[str, Mapping[str, Any]] = {
    "server": loader.SERVER,
    "upstream": loader.UPSTREAM,
    "state": loader.STATE,
    "identity": loader.IDENTITY,
    "logging": loader.LOGGING,
    "tracing": loader.TRACING,
    "routes": loader.ROUTE,
    "idempotency": loader.IDEMPOTENCY,
    "quotas": loader.QUOTAS,
    "limits": loader.LIMIT,
    "cost": loader.COST,
    "match": loader.MATCH,
}
# Keys of a table that are documented as one row there and in a heading of their own.
OWN_HEADING = {
    ("routes", "idempotency"): "idempotency",
    ("routes", "quotas"): "quotas",
    ("quotas", "limits"): "limits",
    ("limits", "cost"): "cost",
    ("routes", "match"): "match",
}


def schema_keys(heading: str, schema: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, converter in schema.items():
        inner = nested_schema(converter)
        if inner is None or (heading, key) in OWN_HEADING:
            yield prefix + key
        else:
            yield from schema_keys(heading, inner, f"{prefix}{key}.")


# --- the reference, as written ------------------------------------------------------------

_KEY_HEADING = re.compile(r"^(#{2,3}) `([a-z0-9_]+)`\s*$")
_ANY_HEADING = re.compile(r"^#{1,6} ")
_KEY_ROW = re.compile(r"^\|\s*`([a-z0-9_.]+)`\s*\|")


def documented_sections(text: str) -> dict[str, list[str]]:
    """Heading name -> the keys its table rows document (`| \\`key\\` | ...`), in order.

    A section runs to the next heading of any level; headings that are not a key name
    (`## Value syntax`, `### Catch-all ...`) end a section and start none.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        heading = _KEY_HEADING.match(line)
        if heading:
            current = sections.setdefault(heading.group(2), [])
            continue
        if _ANY_HEADING.match(line):
            current = None
            continue
        row = _KEY_ROW.match(line)
        if row and current is not None:
            current.append(row.group(1))
    return sections


def heading_levels(text: str) -> dict[str, int]:
    levels = {}
    for line in text.splitlines():
        heading = _KEY_HEADING.match(line)
        if heading:
            levels[heading.group(2)] = len(heading.group(1))
    return levels


def test_every_loader_schema_has_a_place_in_the_reference() -> None:
    # The top-level sections (headings, checked below), `defaults` (checked below), the
    # documented schemas, and every section nested in those, at any depth.
    reachable: list[Mapping[str, Any]] = [
        loader.SECTIONS,
        loader.ROUTE_POLICIES,
        *REFERENCE.values(),
    ]
    for schema in reachable:  # grows while it is walked
        for converter in schema.values():
            inner = nested_schema(converter)
            if inner is not None and not any(inner is known for known in reachable):
                reachable.append(inner)
    unplaced = [name for name, schema in SCHEMAS.items() if not any(schema is r for r in reachable)]
    assert unplaced == [], "add these schemas to REFERENCE in tests/test_docs.py"
    # REFERENCE follows the loader: each top-level section reads its mapping with it.
    for name, converter in loader.SECTIONS.items():
        assert nested_schema(converter) is REFERENCE[name], name
    for (heading, key), own in OWN_HEADING.items():
        inner = nested_schema(REFERENCE[heading][key])
        assert inner is None or inner is REFERENCE[own], (heading, key)


def test_top_level_keys_are_the_top_level_headings() -> None:
    levels = heading_levels(reference())
    top = {name for name, level in levels.items() if level == 2}
    assert top == set(loader._TOP_LEVEL_KEYS)
    assert {name for name, level in levels.items() if level == 3} == set(OWN_HEADING.values())


@pytest.mark.parametrize("heading", REFERENCE)
def test_every_key_of_a_section_is_documented_under_its_heading(heading: str) -> None:
    documented = documented_sections(reference()).get(heading, [])
    in_code = list(schema_keys(heading, REFERENCE[heading]))
    missing = [key for key in in_code if key not in documented]
    assert missing == [], f"keys of `{heading}` missing from its table in configuration.md"


@pytest.mark.parametrize("heading", REFERENCE)
def test_every_key_documented_under_a_heading_exists_in_its_schema(heading: str) -> None:
    documented = documented_sections(reference()).get(heading, [])
    in_code = set(schema_keys(heading, REFERENCE[heading]))
    unknown = [key for key in documented if key not in in_code]
    assert unknown == [], f"configuration.md documents keys `{heading}` does not have"
    assert len(documented) == len(set(documented)), "a key documented twice"


def test_defaults_takes_every_route_key_but_the_per_route_ones() -> None:
    # "Route-level settings (every route key except `name` and `match`)"
    match = re.search(r"every route key except ([^)]*)\)", reference())
    assert match is not None
    excluded = set(re.findall(r"`([a-z_]+)`", match.group(1)))
    assert excluded == set(loader.ROUTE) - set(loader.ROUTE_POLICIES)
    assert excluded == set(loader._PER_ROUTE_ONLY)


# --- restart-only settings --------------------------------------------------------------


class _Changed:
    """A value equal to nothing: whatever the field held before, it is now different."""

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


def _with_changed(obj: Any, path: list[str]) -> Any:
    """`obj` (a frozen dataclass) with the field at dotted `path` replaced by _Changed().

    Keys map to fields by name; a nested key whose section the model keeps flat
    (`b3.accept` -> `b3_accept`) maps to the joined name.
    """
    names = {f.name for f in fields(obj)}
    head, rest = path[0], path[1:]
    if head in names:
        if not rest:
            return replace(obj, **{head: _Changed()})
        inner = getattr(obj, head)
        assert is_dataclass(inner), path
        return replace(obj, **{head: _with_changed(inner, rest)})
    joined = f"{head}_{rest[0]}" if rest else head
    assert joined in names, f"no model field for {'.'.join(path)}"
    return _with_changed(obj, [joined, *rest[1:]])


# The sections a reload reads (routes and defaults are rebuilt whole, always applied).
_RELOADED_SECTIONS = ("server", "upstream", "state", "identity", "logging", "tracing")


def all_section_keys() -> list[str]:
    return [
        f"{section}.{key}"
        for section in _RELOADED_SECTIONS
        for key in schema_keys(section, REFERENCE[section])
    ]


def restart_only_in_code() -> dict[str, list[str]]:
    """Each key whose change the running process cannot apply -> what needs_restart says."""
    base = SidecarConfig()
    flagged = {}
    for key in all_section_keys():
        changed = _with_changed(base, key.split("."))
        names = _restart_only_changes(base, changed)
        if names:
            flagged[key] = names
    return flagged


def covered(key: str, names: set[str]) -> bool:
    """Whether `key` is one of `names`, or inside a section one of them names."""
    return any(key == name or key.startswith(name + ".") for name in names)


def config_names(text: str) -> set[str]:
    """The backticked config paths in `text` (`server.workers`, `state`), nothing else."""
    top = set(loader._TOP_LEVEL_KEYS)
    return {name for name in re.findall(r"`([a-z0-9_.]+)`", text) if name.split(".")[0] in top}


def _hot_reload_section() -> str:
    text = reference()
    start = text.index("## Hot reload")
    return text[start : text.index("\n## ", start + 1)]


def documented_restart_only() -> set[str]:
    # The bullets after "These need a **restart**" ("- `state`: the whole section ...").
    section = _hot_reload_section()
    bullets = section[section.index("These need a **restart**") :].split("\n\n")[1]
    return config_names(bullets)


def documented_as_reloading() -> set[str]:
    section = _hot_reload_section()
    start = section.index("A valid new file takes effect")
    paragraph = section[start : section.index("These need a **restart**")]
    # "`tracing` (except `tracing.export`)": the exception is not said to reload.
    return config_names(re.sub(r"\(except [^)]*\)", "", paragraph))


def test_restart_only_settings_are_the_ones_the_reference_lists() -> None:
    in_code = restart_only_in_code()
    documented = documented_restart_only()
    undocumented = [key for key in in_code if not covered(key, documented)]
    assert undocumented == [], "restart-only in code, not in configuration.md's list"
    overstated = [key for key in all_section_keys() if covered(key, documented)]
    overstated = [key for key in overstated if key not in in_code]
    assert overstated == [], "configuration.md says these need a restart; they reload"
    # `needs_restart` names what changed as the list does (a whole section by its name).
    reported = {name for names in in_code.values() for name in names}
    assert reported == documented


def test_keys_said_to_reload_are_not_restart_only() -> None:
    # The most specific name wins: "`tracing` (except `tracing.export`)".
    restart, hot = documented_restart_only(), documented_as_reloading()
    assert hot and not hot & restart
    in_code = restart_only_in_code()
    contradicted = []
    for key in all_section_keys():
        names = [name for name in hot | restart if covered(key, {name})]
        if names and max(names, key=len) in hot and key in in_code:
            contradicted.append(key)
    assert contradicted == [], "said to apply on reload, but the code needs a restart"


def test_readme_lists_the_same_restart_only_settings() -> None:
    text = readme()
    start = text.index("**Hot reload**")
    sentence = text[start : text.index("need a restart", start)]
    # The names after the last ';' before "need a restart".
    assert config_names(sentence.rsplit(";", 1)[-1]) == documented_restart_only()


# --- problem types ------------------------------------------------------------------------


def problem_table() -> dict[str, dict[str, str]]:
    """errors.md's catalogue table: slug -> {column name: cell text}."""
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] | None = None
    for line in read(DOCS / "errors.md").splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if columns is None:
            columns = cells
            continue
        if set(line) <= set("|-: "):
            continue
        if columns and columns[0].startswith("`type`"):
            slug = cells[0].strip("`")
            assert slug not in rows, f"{slug} documented twice"
            assert len(cells) == len(columns), f"{slug}: {len(cells)} cells, {len(columns)} columns"
            rows[slug] = dict(zip(columns, cells, strict=True))
    return rows


# The code always sends these with another party's status (none at the moment: a refused
# WebSocket upgrade is relayed as the app's own answer).
STATUS_FROM_THE_APP: set[str] = set()


def test_the_error_catalogue_documents_exactly_the_problem_types() -> None:
    assert set(problem_table()) == {problem.slug for problem in CATALOGUE}


def test_the_admin_api_documents_exactly_its_problem_types_and_statuses() -> None:
    text = read(DOCS / "admin-api.md")
    section = text[text.index("## Status codes and problem types") :]
    section = section[: section.index("\n## ", 1)]
    documented = set(re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \|", section, re.MULTILINE))
    assert documented == {(str(problem.status), problem.slug) for problem in admin.ADMIN_PROBLEMS}


@pytest.mark.parametrize("problem", CATALOGUE, ids=lambda problem: problem.slug)
def test_each_problem_type_has_its_status_and_title(problem: Any) -> None:
    row = problem_table().get(problem.slug)
    assert row is not None, f"`{problem.slug}` is not in errors.md's table"
    status = row["Status"]
    if problem.slug in STATUS_FROM_THE_APP:
        assert "app's" in status
    else:
        first = re.match(r"\d{3}", status)
        assert first is not None and int(first.group()) == problem.status, status
    assert row["Title"] == problem.title
    assert problem.type == f"urn:sidecar:problem:{problem.slug}"


# --- metrics, admin endpoints, figures -----------------------------------------------------


def test_every_metric_is_in_the_readme() -> None:
    names = {
        metric.name for metric in Metrics().registry.collect() if metric.name.startswith("sidecar_")
    }
    text = readme()
    missing = [name for name in names if f"`{name}`" not in text and f"`{name}_total`" not in text]
    assert missing == []


def admin_paths() -> set[str]:
    """The paths the admin listener serves, as `Admin.app` registers them."""
    paths = set(re.findall(r"\.add_(?:get|route)\(\s*\"(/[a-z]*)\"", inspect.getsource(admin)))
    assert "/ready" in paths
    return paths


def test_admin_listen_names_every_admin_endpoint() -> None:
    row = next(line for line in reference().splitlines() if line.startswith("| `admin_listen`"))
    assert admin_paths() <= set(re.findall(r"`(/[a-z]+)`", row))


def test_the_readme_admin_table_has_every_admin_endpoint() -> None:
    rows = {m.group(1) for m in re.finditer(r"^\| `(/[a-z]+)` \|", readme(), re.MULTILINE)}
    assert rows == admin_paths()


def test_streaming_memory_figures_are_the_measured_ones() -> None:
    streaming = json.loads(read(ROOT / "bench" / "results" / "results.json"))["streaming"]
    results = streaming["proxies"]["passthrough"]  # the README quotes the pass-through's
    growth = {results[direction]["growth_mib"] for direction in ("upload", "download")}
    text = " ".join(readme().split())
    # "memory while streaming a 1 GiB upload or download grows by ≤ 5 MiB — **met** (+2.9 ...)"
    aim = re.search(
        r"streaming a 1 GiB upload or download grows by ≤ ([0-9.]+) MiB[^(]*\(([^)]*)\)", text
    )
    assert aim is not None
    stated = {float(value) for value in re.findall(r"\+([0-9.]+) MiB", aim.group(2))}
    assert stated == growth
    assert all(value <= float(aim.group(1)) for value in growth)
    # The forwarding section quotes the same measurement.
    forwarding = re.search(r"a 1 GiB upload or download passes with ([^;]*);", text)
    assert forwarding is not None
    assert {float(v) for v in re.findall(r"\+([0-9.]+) MiB", forwarding.group(1))} == growth
