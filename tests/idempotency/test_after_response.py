"""The completion write of a first execution goes to the store after the response is sent.

At one client connection, work done before the response's bytes go out is latency the
client waits for: the FINISH write (encoding the stored response, sending it, and on Redis
reading its reply) used to be started before the answer was written (measured with
bench/latency1.py: ~0.1 ms of p50 and ~1.5 ms of p99 on every-policy-on Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from sidecar.handler import ProxyHandler
from sidecar.policies.idempotency.records import BEGIN, FINISH
from sidecar.store import ScriptCall
from tests.idempotency.conftest import EnvFactory


async def test_the_outcome_is_stored_after_the_response_is_sent(
    make_env: EnvFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await make_env()
    order: list[str] = []
    store_type = type(env.sidecar.sidecar.store)
    execute = store_type.execute
    send = ProxyHandler._send

    async def recording_execute(self: Any, calls: Sequence[ScriptCall]) -> Any:
        for call in calls:
            if call.script is BEGIN:
                order.append("begin")
            elif call.script is FINISH:
                order.append("finish")
        return await execute(self, calls)

    async def recording_send(self: ProxyHandler, *args: Any, **kwargs: Any) -> Any:
        sent = await send(self, *args, **kwargs)
        order.append("sent")
        return sent

    monkeypatch.setattr(store_type, "execute", recording_execute)
    monkeypatch.setattr(ProxyHandler, "_send", recording_send)
    reply = await env.send(key="after-response")
    assert reply.status == 201
    assert await env.records.settled() == [b"c"]
    assert order == ["begin", "sent", "finish"]
