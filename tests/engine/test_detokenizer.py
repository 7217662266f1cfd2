"""Streaming text: deltas never split a UTF-8 character and reassemble exactly; stop strings split across tokens
are caught, held back while they could still match, and never emitted."""

from __future__ import annotations

import pytest

from eoq.engine.detokenizer import IncrementalDetokenizer, TextStream
from eoq.engine.model.checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def tok(default_checkpoint):
    return load_tokenizer(default_checkpoint.path)


TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇩🇪 — done.",
    "中文测试：你好，世界！日本語も少し。한국어도.",
    "mixed 😀中文 text with accents: café naïve résumé",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_reassemble_exactly_and_never_split_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_tail=tok.encode("Question: ", add_special_tokens=False))
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)
    # multi-byte characters span several byte-level tokens here: some tokens complete no character yet
    if any(ord(c) > 0x7FF for c in text):
        assert "" in deltas[:-1]


def stream_all(tok, text: str, stop: tuple[str, ...]) -> tuple[list[tuple[str, list[int]]], bool, list[int]]:
    ids = tok.encode(text, add_special_tokens=False)
    s = TextStream(tok, stop)
    pieces = []
    stopped = False
    for t in ids:
        stopped = s.push(t)
        if stopped:
            break
        pieces.append(s.take())
    pieces.append(s.finish())
    return pieces, stopped, ids


def test_stop_string_split_across_tokens_is_caught_and_never_emitted(tok):
    text = "The answer is forty-two. END OF ANSWER and more text"
    stop = ("END OF ANSWER",)
    ids = tok.encode(text, add_special_tokens=False)
    # the stop string spans several tokens
    assert not any("END OF ANSWER" in tok.decode([t]) for t in ids)
    pieces, stopped, _ = stream_all(tok, text, stop)
    assert stopped
    out = "".join(p for p, _ in pieces)
    assert out == "The answer is forty-two. "
    assert "END" not in out


def test_text_that_could_become_a_stop_string_is_held_back(tok):
    s = TextStream(tok, ("<stop>",))
    for t in tok.encode("abc <st", add_special_tokens=False):
        assert not s.push(t)
    text, _ = s.take()
    assert text == "abc "  # "<st" might still become "<stop>"
    for t in tok.encode("ay", add_special_tokens=False):
        s.push(t)
    text, _ = s.take()
    assert text == "<stay"  # it did not
    assert s.finish() == ("", [])


def test_token_ids_travel_with_their_text(tok):
    text = "Bonjour 😀 le monde. STOP here"
    pieces, stopped, ids = stream_all(tok, text, ("STOP",))
    assert stopped
    all_ids = [t for _, p in pieces for t in p]
    assert all_ids == ids[: len(all_ids)]
    for piece_text, piece_ids in pieces[:-1]:
        if piece_ids:  # the tokens of a released piece decode to exactly its text
            assert tok.decode(piece_ids) == piece_text


def test_no_stop_strings_releases_everything_at_once(tok):
    pieces, stopped, ids = stream_all(tok, "plain text 中文", ())
    assert not stopped
    assert "".join(p for p, _ in pieces) == "plain text 中文"
    assert [t for _, p in pieces for t in p] == ids
