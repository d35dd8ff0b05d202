"""The observer hook both backends report to, and the operation labels they report.

It sits below the backends (it needs only `base`), so memory.py and redis.py can share it
without importing the factory that builds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeAlias

from sidecar.store.base import ScriptCall, StoreError

# Called after every execute/ping with (operation label, seconds, error kind or None).
# The label is the script name, "a+b" for a batch (each name once, in call order), or
# "ping". Scripts are a static set, so labels stay bounded and are safe as metric labels.
# Must not raise.
StoreObserver: TypeAlias = Callable[[str, float, str | None], None]


def batch_label(calls: Sequence[ScriptCall]) -> str:
    if len(calls) == 1:
        return calls[0].script.name
    # Each script named once, in order of first use: a batch of 200 releases is
    # "idempotency_release", so batch sizes never multiply the label values.
    return "+".join(dict.fromkeys(call.script.name for call in calls))


def report(
    observe: StoreObserver | None, label: str, started: float, error: StoreError | None
) -> None:
    """Tell the observer how an operation that began at perf_counter() `started` went."""
    if observe is not None:
        observe(label, time.perf_counter() - started, None if error is None else error.kind)
