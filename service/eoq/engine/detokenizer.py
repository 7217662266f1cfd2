"""Incremental detokenization and stop strings.

``IncrementalDetokenizer`` turns one token at a time into text deltas that never split a multi-byte UTF-8
character (a window of recent tokens is decoded; a delta ending in U+FFFD, the mark of an unfinished byte
sequence, is held until the next token completes it). It decodes a small window twice per token rather than
the whole output, so its cost does not grow with the answer. Concatenated deltas plus ``flush()`` equal
decoding all output tokens at once.

``TextStream`` adds stop strings on top: text that could still become a stop string is held back, a matched
stop string ends the stream and is never emitted, and each released piece of text comes with the tokens whose
text it completes.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs (SentencePiece leading spaces)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_tail: list[int] | tuple[int, ...] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_tail[-PROMPT_CONTEXT_TOKENS:])
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ('' while a character is unfinished)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever decoding all output tokens yields beyond what was emitted (e.g. a dangling
        invalid byte as U+FFFD)."""
        full = self._decode(self._ids[self._num_context :])
        emitted = "".join(self._emitted)
        rest = full[len(emitted) :] if full.startswith(emitted) else ""
        if rest:
            self._emitted.append(rest)
        return rest


class TextStream:
    """Generated text with stop-string handling, released in pieces together with their tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = (),
                 prompt_tail: list[int] | tuple[int, ...] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_tail)
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""  # text not released yet
        self._pending_tokens: list[list[int]] = []  # [token_id, chars of its text still pending]
        self.stopped = False  # a stop string matched; nothing more is accepted

    def push(self, token_id: int) -> bool:
        """Add a generated token. Returns True when a stop string has matched (the stream then ends)."""
        if self.stopped:
            raise RuntimeError("push after a stop string matched")
        delta = self._detok.push(token_id)
        self._pending_tokens.append([token_id, len(delta)])
        if not delta:
            return False
        start = max(0, len(self._pending) - self._max_stop + 1)
        self._pending += delta
        if self._stop:
            cut = self._find_stop(start)
            if cut is not None:
                self._pending = self._pending[:cut]
                self.stopped = True
        return self.stopped

    def push_silent(self, token_id: int) -> None:
        """A token that ends the stream without text (the end-of-answer token): it goes out with the last text."""
        self._pending_tokens.append([token_id, 0])

    def _find_stop(self, start: int) -> int | None:
        found = [i for s in self._stop if (i := self._pending.find(s, start)) >= 0]
        return min(found) if found else None

    def _holdback(self) -> int:
        """Length of the longest pending suffix that is a prefix of some stop string."""
        text = self._pending
        for k in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def take(self) -> tuple[str, list[int]]:
        """Release the text that can no longer become part of a stop string, with the tokens it completes."""
        if self.stopped:
            return self._release_all()
        n = len(self._pending) - (self._holdback() if self._stop else 0)
        if n <= 0:
            return "", []
        text, self._pending = self._pending[:n], self._pending[n:]
        return text, self._release_tokens(n)

    def finish(self) -> tuple[str, list[int]]:
        """The stream ends (stop token, length, stop string or abort): release everything still pending."""
        if not self.stopped:
            self._pending += self._detok.flush()
        return self._release_all()

    def _release_all(self) -> tuple[str, list[int]]:
        text, self._pending = self._pending, ""
        ids = [t for t, _ in self._pending_tokens]
        self._pending_tokens.clear()
        return text, ids

    def _release_tokens(self, num_chars: int) -> list[int]:
        """Pop the tokens whose text lies within the first ``num_chars`` pending characters. A token whose text
        straddles the cut stays pending (its id goes out with the rest of its text); a token with no text yet
        (an unfinished character) goes out with the token that completes it."""
        released = 0
        used = 0
        for i, (_, chars) in enumerate(self._pending_tokens):
            if used + chars > num_chars:
                self._pending_tokens[i][1] -= num_chars - used
                break
            used += chars
            if chars:
                released = i + 1
        ids = [t for t, _ in self._pending_tokens[:released]]
        del self._pending_tokens[:released]
        return ids
