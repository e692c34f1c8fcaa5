"""Opaque page tokens bound to the filters they were issued for."""

from __future__ import annotations

import base64
import binascii
import json

from pluggably.core.errors import FieldViolation

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def check_page_size(page_size: int, violations: list[FieldViolation]) -> int:
    """The effective page size; records a violation when out of range."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        violations.append(
            FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {page_size}")
        )
    return page_size or DEFAULT_PAGE_SIZE


def encode_page_token(after: str, filter_key: str) -> str:
    raw = json.dumps({"after": after, "filter": filter_key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(
    token: str, filter_key: str, violations: list[FieldViolation], rpc: str
) -> str:
    """The position a token continues after; records a violation for a foreign or stale token."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, used_filter = data["after"], data["filter"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        violations.append(FieldViolation("page_token", f"not a token returned by {rpc}"))
        return ""
    if used_filter != filter_key:
        violations.append(
            FieldViolation("page_token", "was issued for other filters; use the same filters")
        )
    return str(after)
