"""Backend-agnostic helpers for streaming text: incremental detokenization and stop sequences.

Both are small, synchronous and free of heavy imports, so any backend (local runners, adapters
that receive token ids) can use them on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never end in a broken character.

    TGI-style offsets: `prefix_offset..read_offset` are ids already turned into text and kept as
    context (some tokenizers decode a token differently at the start of a sequence, e.g. the
    leading space of SentencePiece); `read_offset..` are ids whose text is not emitted yet. A
    delta is emitted only when decoding the window gives more text than the context alone and the
    result does not end in U+FFFD (an incomplete multi-byte UTF-8 sequence): byte-level tokens
    that split a character are held back until the character is complete. `flush` releases
    whatever is still held (then possibly with U+FFFD, for output that really is invalid).

    `decode` maps ids to text, e.g. `lambda ids: tok.decode(ids, skip_special_tokens=True)`.
    `context_ids` (usually the tail of the prompt) are decoded as context but never emitted.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        context_ids: Sequence[int] = (),
        *,
        context_window: int = 5,
    ) -> None:
        self._decode = decode
        self._ids: list[int] = list(context_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - context_window, 0)
        self._context_len = self._read_offset

    @property
    def token_ids(self) -> list[int]:
        """The ids pushed so far (without the context ids)."""
        return self._ids[self._context_len :]

    @property
    def pending(self) -> bool:
        """Whether some pushed ids have not been turned into emitted text yet."""
        return self._read_offset < len(self._ids)

    def push(self, ids: Iterable[int]) -> str:
        """Adds ids; returns the text that became complete (possibly empty)."""
        self._ids.extend(ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """Returns the held-back text, even if it ends in an incomplete character."""
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(REPLACEMENT_CHAR)):
            if final:
                self._prefix_offset = self._read_offset = len(self._ids)
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text) :]
        else:
            # The context decodes differently once more ids follow (rare: invalid bytes that
            # merge differently). Emitting the differing tail is the best we can do.
            common = _common_prefix_len(prefix_text, new_text)
            delta = new_text[common:]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StopMatcher:
    """Finds stop sequences in streamed text (OpenAI semantics: the stop and what follows it are
    not returned).

    `push(text)` returns `(safe_text, stop)`: `safe_text` can be emitted now; text that could be
    the beginning of a stop sequence is held back until it is decided. When a stop sequence
    completes, `stop` is that sequence, `safe_text` ends right before it and the matcher ignores
    any further input. The match is the first one to complete in the stream (smallest end
    position; among those ending at the same position, the one starting earliest, i.e. the
    longest): the result is the same however the text is split into pushes. `flush()` returns
    the held-back text once the stream ends without a match.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        # Longest first, so that at equal end the earliest start wins; empty stops mean nothing.
        unique = dict.fromkeys(s for s in stops if s)
        self._stops: tuple[str, ...] = tuple(sorted(unique, key=len, reverse=True))
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.matched: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def held(self) -> str:
        """Text received but not returned yet."""
        return self._held

    def push(self, text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        if not self._stops:
            return text, None
        if not text:
            return "", None
        buf = self._held + text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            # A stop can only complete inside the new text: earlier matches were found before.
            start = buf.find(stop, max(0, len(self._held) - len(stop) + 1))
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is not None:
            _, start, stop = best
            self.matched = stop
            self._held = ""
            return buf[:start], stop
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Releases the held-back text (call when the stream ended without a match)."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop."""
        limit = min(self._longest - 1, len(buf))
        for k in range(limit, 0, -1):
            tail = buf[len(buf) - k :]
            if any(len(s) > k and s.startswith(tail) for s in self._stops):
                return k
        return 0
