"""With identity.jwt set, idempotency records are scoped by the verified token's
organisation: a forged X-Org-Id cannot replay another organisation's response."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
from aiohttp import web

from tests.support import run_app, run_sidecar, sidecar_config

SECRET = "s" * 40


def token(org: str) -> str:
    return jwt.encode({"org_id": org, "sub": "u", "exp": int(time.time()) + 600}, SECRET)


async def test_a_forged_org_header_does_not_reach_another_orgs_records() -> None:
    runs = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal runs
        runs += 1
        return web.Response(status=201, text=f"run {runs}")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    yaml = (
        f"identity:\n  jwt: {{algorithms: [HS256], secret: {SECRET}}}\n"
        "routes:\n  - name: r\n    match: {path_prefix: /}\n    idempotency: {}\n"
    )
    async with (
        asyncio.timeout(10),
        run_app(app) as upstream,
        aiohttp.ClientSession() as s,
        run_sidecar(sidecar_config(upstream, yaml)) as sidecar,
    ):

        async def post(org: str, **headers: str) -> tuple[int, str]:
            headers |= {"Authorization": f"Bearer {token(org)}", "Idempotency-Key": "k1"}
            async with s.post(sidecar.url + "/orders", headers=headers) as response:
                return response.status, await response.text()

        assert await post("org-a", **{"X-Org-Id": "org-a"}) == (201, "run 1")
        assert await post("org-a") == (201, "run 1")  # replayed: the token's org
        # Org B claiming to be A by header: its own record, a run of its own.
        assert await post("org-b", **{"X-Org-Id": "org-a"}) == (201, "run 2")
        async with s.post(
            sidecar.url + "/orders",
            headers={"Authorization": "Bearer not.a.jwt", "Idempotency-Key": "k1"},
        ) as response:
            assert response.status == 401
            body = await response.json()
            assert body["type"].endswith("identity-invalid")
        assert runs == 2
