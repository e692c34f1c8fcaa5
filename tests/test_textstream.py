"""Unit tests for the backend-agnostic streaming helpers (no model needed)."""

from __future__ import annotations

import itertools

import pytest

from pluggably.core.textstream import IncrementalDetokenizer, StopMatcher

# --- a byte-level "tokenizer": each token id is one byte, like the fallback of byte-level BPE


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream(detok: IncrementalDetokenizer, ids, step: int = 1) -> list[str]:
    out = []
    for i in range(0, len(ids), step):
        out.append(detok.push(ids[i : i + step]))
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 5])
@pytest.mark.parametrize("text", ["héllo wörld", "東京タワー", "a🙂b🙂🙂c", "ñ", "plain ascii"])
def test_detokenizer_never_emits_broken_characters(text: str, step: int) -> None:
    detok = IncrementalDetokenizer(byte_decode)
    pieces = stream(detok, byte_ids(text), step)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_holds_back_a_split_character() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    euro = byte_ids("€")  # 3 bytes
    assert detok.push(byte_ids("a")) == "a"
    assert detok.push(euro[:1]) == ""
    assert detok.pending
    assert detok.push(euro[1:2]) == ""
    assert detok.push(euro[2:]) == "€"
    assert not detok.pending
    assert detok.flush() == ""
    assert detok.token_ids == byte_ids("a€")


def test_detokenizer_flush_releases_invalid_bytes() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    assert detok.push(byte_ids("ok")) == "ok"
    assert detok.push([0xE2, 0x82]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_detokenizer_invalid_bytes_followed_by_text_are_emitted() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    assert detok.push([0x80]) == ""  # a lone continuation byte looks like an unfinished char
    assert detok.push(byte_ids("x")) == "\ufffdx"


def test_detokenizer_uses_context_ids_without_emitting_them() -> None:
    # A SentencePiece-like decoder that drops the leading space of a sequence.
    vocab = {1: "▁Hello", 2: "▁world", 3: "!"}

    def sp_decode(ids):
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    plain = IncrementalDetokenizer(sp_decode)
    assert plain.push([2]) == "world"  # no context: the leading space is lost
    with_context = IncrementalDetokenizer(sp_decode, context_ids=[1])
    assert with_context.push([2]) == " world"
    assert with_context.push([3]) == "!"
    assert with_context.token_ids == [2, 3]


def test_detokenizer_multi_token_pushes_and_special_tokens() -> None:
    vocab = {0: "", 1: "ab", 2: "cd"}  # 0 decodes to nothing, like a skipped special token
    detok = IncrementalDetokenizer(lambda ids: "".join(vocab[i] for i in ids))
    assert detok.push([0]) == ""
    assert detok.push([1, 0, 2]) == "abcd"
    assert detok.flush() == ""


# --- StopMatcher ---------------------------------------------------------------------------


def run_matcher(stops, pieces):
    m = StopMatcher(stops)
    out = []
    stop = None
    for piece in pieces:
        safe, stop = m.push(piece)
        out.append(safe)
        if stop is not None:
            break
    if stop is None:
        out.append(m.flush())
    return "".join(out), stop, out


def splits(text: str):
    """All ways to cut `text` into up to 3 pieces."""
    n = len(text)
    yield [text]
    for i in range(n + 1):
        yield [text[:i], text[i:]]
        for j in range(i, n + 1):
            yield [text[:i], text[i:j], text[j:]]


def test_stop_matcher_without_stops_passes_text_through() -> None:
    assert run_matcher([], ["abc", "def"]) == ("abcdef", None, ["abc", "def", ""])


def test_stop_matcher_simple_match() -> None:
    text, stop, _ = run_matcher(["END"], ["hello END world"])
    assert (text, stop) == ("hello ", "END")


@pytest.mark.parametrize("pieces", list(splits("say STOP now")))
def test_stop_matcher_stop_split_across_chunks(pieces) -> None:
    text, stop, _ = run_matcher(["STOP"], pieces)
    assert (text, stop) == ("say ", "STOP")


def test_stop_matcher_holds_back_possible_prefix_only() -> None:
    m = StopMatcher(["<end>"])
    assert m.push("abc<e") == ("abc", None)
    assert m.held == "<e"
    assert m.push("x") == ("<ex", None)  # the prefix did not continue: released at once
    assert m.held == ""
    assert m.push("<en") == ("", None)
    assert m.push("d>tail") == ("", "<end>")
    assert m.matched == "<end>"
    assert m.push("more") == ("", "<end>")  # ignores everything after the match
    assert m.flush() == ""


def test_stop_matcher_flush_releases_held_text_at_end() -> None:
    m = StopMatcher(["</answer>"])
    assert m.push("done </ans") == ("done ", None)
    assert m.flush() == "</ans"
    assert m.flush() == ""


@pytest.mark.parametrize("pieces", list(splits("xxabcdyy")))
def test_stop_matcher_first_completed_stop_wins(pieces) -> None:
    # "bc" completes (at index 4) before "abcd" (at index 6): "bc" wins however the text is cut.
    text, stop, _ = run_matcher(["abcd", "bc"], pieces)
    assert (text, stop) == ("xxa", "bc")


def test_stop_matcher_same_end_prefers_earliest_start() -> None:
    for stops in (["cd", "bcd"], ["bcd", "cd"]):
        assert run_matcher(stops, ["abcde"])[:2] == ("a", "bcd")


def test_stop_matcher_several_stops_any_order() -> None:
    stops = ["\n\n", "###", "User:"]
    for perm in itertools.permutations(stops):
        assert run_matcher(list(perm), ["Hi there", "\nUser", ": hello"])[:2] == (
            "Hi there\n",
            "User:",
        )


def test_stop_matcher_overlapping_self_prefix() -> None:
    # "aab" inside "aaab": a naive matcher that drops held text on mismatch would miss it.
    for pieces in splits("xaaab"):
        assert run_matcher(["aab"], pieces)[:2] == ("xa", "aab"), pieces


def test_stop_matcher_no_false_holdback_without_a_stop() -> None:
    text, stop, out = run_matcher(["zz"], ["abc", "def"])
    assert (text, stop) == ("abcdef", None)
    assert out == ["abc", "def", ""]  # nothing was held back: no stop could start there


def test_stop_matcher_ignores_empty_and_duplicate_stops() -> None:
    m = StopMatcher(["", "x", "x"])
    assert m.stops == ("x",)
    assert m.push("abxc") == ("ab", "x")
