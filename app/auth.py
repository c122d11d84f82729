"""API keys: which configured key, by name, a request's ``Authorization: Bearer`` header carries.

The name, never the key, is what logs and /metrics show. Keys are compared as SHA-256 digests
with hmac.compare_digest, against every configured key without stopping at a match, so the time a
check takes says nothing about how much of a key was right, nor which key matched.
"""

from __future__ import annotations

import hashlib
import hmac

BEARER = "Bearer "


def _digest(text: str) -> bytes:
    # Header values reach WSGI as latin-1 strings; any text encodes, so no input raises here.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class APIKeys:
    def __init__(self, named: dict[str, str]):
        self._digests = [(name, _digest(key)) for name, key in named.items()]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def name_for(self, authorization: str) -> str | None:
        """The name of the key in an Authorization header's value, or None for no key or a wrong one."""
        token = authorization[len(BEARER):] if authorization.startswith(BEARER) else ""
        presented = _digest(token)
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found
