"""Redaction: no storage key, token or password is printed, logged, tracked or written to ``_meta/``.

A field is secret when it is ``storage_options`` (every value in it) or its name contains ``key``,
``secret``, ``token`` or ``password`` (except the spec's own non-secret fields, :data:`PUBLIC`);
its value becomes ``***`` wherever a spec is shown. URIs lose
their ``user:password@`` part. Fingerprints still hash the real values (a changed secret is a
changed spec), and a fingerprint is a one-way digest, so it never reveals them.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "PUBLIC", "is_secret", "redact", "redact_uri"]

MASK = "***"
_WORDS = ("key", "secret", "token", "password")
#: Spec fields whose names contain such a word but hold no secret: a pipeline's night key.
PUBLIC = frozenset({"run_key"})
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def is_secret(name: Any) -> bool:
    """Whether a field called ``name`` holds a secret."""
    if not isinstance(name, str) or name in PUBLIC:
        return False
    return name == "storage_options" or any(w in name.lower() for w in _WORDS)


def redact_uri(text: str) -> str:
    """``s3://KEY:SECRET@bucket/x`` -> ``s3://***@bucket/x``; other text is returned unchanged."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return value if value is None or value == "" else MASK


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with every secret field's value masked (see the module docstring)."""
    if isinstance(value, dict):
        return {k: _mask(v) if is_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value
