"""The claim token reaches the app, so it can fence on it: the owner's request carries
`Idempotency-Claim` (or the configured `claim_header`) with the record's owner token;
a client can never send one of its own through; later claims of a key sort after earlier
ones. Every test runs on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.idempotency.conftest import TEST_TIMEOUT, Env, EnvFactory, Reply, eventually

CLAIM = "Idempotency-Claim"
FORGED = "0000000000000000-forged"


async def record_token(env: Env) -> str:
    """The owner token of the one record, which must still be in progress."""
    records = await env.records.all()
    assert len(records) == 1, f"expected one record, found {records}"
    [fields] = records.values()
    assert fields.get("s") == b"p", f"expected the record in progress, got {fields}"
    return fields["t"].decode()


async def running(env: Env, key: str, **kwargs: Any) -> asyncio.Task[Reply]:
    """A protected request held in the app (`/slow`), once the app has it."""
    request = asyncio.create_task(env.send("/slow", key=key, **kwargs))
    await env.wait_executions(1)
    return request


async def test_the_app_gets_the_claim_token_of_the_execution_it_runs(
    make_env: EnvFactory,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        first = await running(env, "fence")
        sent = env.upstream.calls[0].headers.getall(CLAIM, [])
        assert len(sent) == 1, f"expected one {CLAIM} header upstream, got {sent}"
        assert sent[0] == await record_token(env)
        env.upstream.gate.set()
        assert (await first).status == 201


@pytest.mark.parametrize("spelling", [CLAIM, "idempotency-claim"])
async def test_a_client_sent_claim_header_is_replaced_on_a_protected_request(
    make_env: EnvFactory, spelling: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        first = await running(env, "forged", headers={spelling: FORGED})
        sent = env.upstream.calls[0].headers.getall(CLAIM, [])
        assert sent == [await record_token(env)], f"the app got {sent}"
        assert FORGED not in sent
        env.upstream.gate.set()
        assert (await first).status == 201


@pytest.mark.parametrize(
    ("method", "key"),
    [("GET", None), ("PUT", "k-1"), ("POST", None)],
    ids=["unprotected-method", "unlisted-method-with-key", "no-key"],
)
async def test_a_client_sent_claim_header_never_reaches_the_app_unprotected(
    make_env: EnvFactory, method: str, key: str | None
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env()
        reply = await env.send(method=method, key=key, headers={CLAIM: FORGED})
        assert reply.status in (200, 201)
        assert env.upstream.executions == 1
        assert env.upstream.calls[0].headers.getall(CLAIM, []) == []


async def test_claim_header_renames_the_header(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s, claim_header: X-Fence}")
        first = await running(env, "renamed", headers={"X-Fence": FORGED})
        headers = env.upstream.calls[0].headers
        assert headers.getall("X-Fence", []) == [await record_token(env)]
        assert headers.getall(CLAIM, []) == []
        env.upstream.gate.set()
        assert (await first).status == 201
        # An unprotected request never carries a client's value of it either.
        await env.send(method="GET", key=None, headers={"X-Fence": FORGED})
        assert env.upstream.calls[1].headers.getall("X-Fence", []) == []


async def test_a_null_claim_header_sends_no_token(make_env: EnvFactory) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s, claim_header: null}")
        first = await running(env, "off")
        await record_token(env)  # claimed, in progress
        assert env.upstream.calls[0].headers.getall(CLAIM, []) == []
        env.upstream.gate.set()
        assert (await first).status == 201


async def test_tokens_of_successive_claims_of_a_key_sort_in_claim_order(
    make_env: EnvFactory,
) -> None:
    """503 releases the key, so each retry claims it anew: its token sorts after the last."""
    async with asyncio.timeout(TEST_TIMEOUT):
        env = await make_env("{lease: 5s}")
        tokens: list[str] = []
        for attempt in range(1, 4):
            reply = await env.send("/status/503", key="again")
            assert (reply.status, reply.n) == (503, attempt)
            assert env.upstream.executions == attempt
            sent = env.upstream.calls[-1].headers.getall(CLAIM, [])
            assert len(sent) == 1, f"claim {attempt}: expected one {CLAIM} header, got {sent}"
            tokens.append(sent[0])

            async def released() -> bool:
                return await env.records.all() == {}

            await eventually(released, f"the 503 of claim {attempt} to release the key")
        assert len(set(tokens)) == 3, tokens
        assert tokens == sorted(tokens), f"tokens out of claim order: {tokens}"
