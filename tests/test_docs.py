"""The docs describe what the code does: every problem type, config key and metric."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.config import loader
from sidecar.errors import CATALOGUE
from sidecar.metrics import Metrics

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = (DOCS.parent / "README.md").read_text()


@pytest.mark.parametrize("problem", CATALOGUE, ids=lambda problem: problem.slug)
def test_every_problem_type_is_in_the_error_catalogue(problem: object) -> None:
    assert f"`{problem.slug}`" in (DOCS / "errors.md").read_text()  # type: ignore[attr-defined]


SCHEMAS = {
    name: getattr(loader, name)
    for name in (
        "SERVER",
        "UPSTREAM",
        "STATE",
        "IDENTITY",
        "LOGGING",
        "ACCESS_LOG",
        "TRACING",
        "B3",
        "SPAN_EXPORT",
        "ROUTE",
        "MATCH",
        "IDEMPOTENCY",
    )
}


@pytest.mark.parametrize(
    "key", sorted({key for schema in SCHEMAS.values() for key in schema}), ids=str
)
def test_every_config_key_is_in_the_reference(key: str) -> None:
    # Written as `key`, or within a dotted path such as `access.sample` or `b3.accept`.
    pattern = rf"`(?:[a-z0-9_]+\.)*{key}(?:\.[a-z0-9_]+)*`"
    assert re.search(pattern, (DOCS / "configuration.md").read_text())


def test_every_metric_is_in_the_readme() -> None:
    names = {
        metric.name for metric in Metrics().registry.collect() if metric.name.startswith("sidecar_")
    }
    missing = [
        name for name in names if f"`{name}`" not in README and f"`{name}_total`" not in README
    ]
    assert missing == []
