"""The policy chain: order, short-circuit, and response handling in reverse order."""

from __future__ import annotations

from typing import Any, cast

from multidict import CIMultiDict

from sidecar.chain import Next, Policy, ProxyRequest, ProxyResponse, build_chain


class Recorder:
    """A policy that records when it sees the request and the response."""

    def __init__(self, name: str, trace: list[str], answer: int | None = None) -> None:
        self.name = name
        self.trace = trace
        self.answer = answer

    async def __call__(self, request: ProxyRequest, call_next: Next) -> ProxyResponse:
        self.trace.append(f"{self.name}:request")
        if self.answer is not None:
            return ProxyResponse(self.answer, CIMultiDict(), b"")
        response = await call_next(request)
        response.headers.add("X-Seen-By", self.name)
        self.trace.append(f"{self.name}:response")
        return response


def terminal(trace: list[str]) -> Next:
    async def forward(request: ProxyRequest) -> ProxyResponse:
        trace.append("upstream")
        return ProxyResponse(200, CIMultiDict(), b"ok")

    return forward


REQUEST = cast(ProxyRequest, cast(Any, object()))


async def test_policies_see_the_request_in_order_and_the_response_in_reverse() -> None:
    trace: list[str] = []
    policies: list[Policy] = [Recorder("a", trace), Recorder("b", trace)]
    response = await build_chain(policies, terminal(trace))(REQUEST)
    assert trace == ["a:request", "b:request", "upstream", "b:response", "a:response"]
    assert response.headers.getall("X-Seen-By") == ["b", "a"]


async def test_a_policy_that_answers_itself_stops_the_chain() -> None:
    trace: list[str] = []
    policies: list[Policy] = [Recorder("a", trace), Recorder("quota", trace, answer=429)]
    response = await build_chain(policies, terminal(trace))(REQUEST)
    assert response.status == 429
    assert trace == ["a:request", "quota:request", "a:response"]


async def test_no_policies_means_the_chain_is_the_forwarder_itself() -> None:
    trace: list[str] = []
    forward = terminal(trace)
    assert build_chain([], forward) is forward
