"""Opaque page tokens bound to the filters they were issued for.

A token is URL-safe base64 (unpadded) of a flat byte string: a version byte, the first bytes of a
SHA-256 of the filters, then the position (the last id of the previous page) as UTF-8. Nothing in
it nests, so decoding costs one pass over at most `MAX_PAGE_TOKEN_CHARS` characters whatever a
client sends, and anything else is rejected before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from pluggably.core.errors import FieldViolation

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Room for a position of about 370 bytes: longer than any real model id.
MAX_PAGE_TOKEN_CHARS = 512

_VERSION = b"\x01"
_FILTER_BYTES = 8
_HEADER_BYTES = len(_VERSION) + _FILTER_BYTES
_BASE64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def check_page_size(page_size: int, violations: list[FieldViolation]) -> int:
    """The effective page size; records a violation when out of range."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        violations.append(
            FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {page_size}")
        )
    return page_size or DEFAULT_PAGE_SIZE


def _filter_digest(filter_key: str) -> bytes:
    # Only the digest travels: the filters may be long (a provider name is any string), and the
    # token must stay within MAX_PAGE_TOKEN_CHARS.
    return hashlib.sha256(filter_key.encode()).digest()[:_FILTER_BYTES]


def encode_page_token(after: str, filter_key: str) -> str:
    raw = _VERSION + _filter_digest(filter_key) + after.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(
    token: str, filter_key: str, violations: list[FieldViolation], rpc: str
) -> str:
    """The position a token continues after; records a violation for a foreign or stale token."""
    after = _decode(token)
    if after is None:
        violations.append(FieldViolation("page_token", f"not a token returned by {rpc}"))
        return ""
    digest, position = after
    if digest != _filter_digest(filter_key):
        violations.append(
            FieldViolation("page_token", "was issued for other filters; use the same filters")
        )
    return position


def _decode(token: str) -> tuple[bytes, str] | None:
    """(filter digest, position), or None for anything this module did not write."""
    if len(token) > MAX_PAGE_TOKEN_CHARS or not token.isascii():
        return None
    data = token.encode()
    # urlsafe_b64decode would skip characters outside the alphabet instead of refusing them.
    if not _BASE64URL.issuperset(data):
        return None
    try:
        raw = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
        position = raw[_HEADER_BYTES:].decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    if len(raw) < _HEADER_BYTES or raw[:1] != _VERSION:
        return None
    return raw[1:_HEADER_BYTES], position
