"""What every policy's store keys share: the hash tag that keeps one organisation's keys
in one Redis Cluster slot, so one script can read and write all of them."""

from __future__ import annotations

import hashlib
import re

_SAFE_ORG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def org_tag(org: str) -> str:
    """The organisation as it appears in hash tags: itself if plain, else a hash of it.

    Braces or odd bytes in a client-sent org id must not change which slot a key lands in.
    """
    if _SAFE_ORG.fullmatch(org):
        return org
    return "h" + hashlib.sha256(org.encode("utf-8", "surrogateescape")).hexdigest()[:24]
