"""Idempotency: a retried request with the same Idempotency-Key runs once, on any replica.

`policy.py` is the policy (lookup-and-claim, leased execution, replay); `records.py` the
record keys, fingerprints and store scripts it uses.
"""

from sidecar.policies.idempotency.policy import build

__all__ = ["build"]
