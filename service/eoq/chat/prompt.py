"""Prompts: the system prompt, the history and the new question, rendered with the model's chat template and
ending at its end-of-question marker (the template's generation prompt), so the model answers.

User text is never control tokens. The template is rendered with a placeholder for each message's content;
the template's own text is tokenized with special tokens recognized, each message's content with special tokens
split into plain text. ``<|im_start|>`` typed by a user is thus the characters, never the control token (the
tokenizer's default would turn it into the real token: a prompt-injection hole). Tokenizing each message on its
own also keeps earlier turns' tokens identical from one turn to the next, and an assistant answer reuses the
exact tokens the model generated, so a conversation's next prompt starts with the previous turn's tokens and
hits the prefix cache.

Checkpoints without a chat template get a built-in plain template whose questions end with ``<EOQ>``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from eoq.errors import InvalidArgument

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOQ_MARKER = "<EOQ>"

# For checkpoints without a chat template (e.g. GPT-2): questions end with the <EOQ> marker.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}" + EOQ_MARKER + "\n"
    "{% else %}Answer: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)
PLAIN_TEMPLATE_STOP = ("\nQuestion:",)

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def _placeholder(i: int) -> str:
    return f"\ue000{i}\ue001"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str
    token_ids: tuple[int, ...] | None = None  # assistant answers: the generated tokens, reused verbatim


@dataclass(frozen=True, slots=True)
class Turn:
    user: ChatMessage
    assistant: ChatMessage


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    token_ids: list[int]
    dropped_turns: int = 0  # oldest turns left out to fit the context window
    question_ids: tuple[int, ...] = ()  # the question's own tokens, to store with it


class PromptBuilder:
    """Renders conversations and completions into token ids for one tokenizer (not shared across threads)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._template = None if self.has_chat_template else PLAIN_TEMPLATE
        self.default_stop: tuple[str, ...] = () if self.has_chat_template else PLAIN_TEMPLATE_STOP
        # What ends a question: the template's generation prompt, or <EOQ> in the plain template.
        self.end_of_question_marker = (self._generation_prompt() or EOQ_MARKER) if self.has_chat_template else EOQ_MARKER
        self.end_of_turn_token_ids = self._end_of_turn_tokens()
        self.control_token_ids = self._control_tokens()  # special and added special tokens
        self.fingerprint = self._fingerprint()  # of the tokenizer: which stored token ids are this model's

    # --- public ---
    def token_texts(self, vocab_size: int) -> list[str]:
        """Each token id's own text (what logprobs show beside the id), special tokens included; ids past the
        tokenizer's (padding rows of the model's vocabulary) are ''."""
        n = min(vocab_size, len(self.tokenizer))
        texts = self.tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        return texts + [""] * (vocab_size - n)

    def build_chat(self, system_prompt: str | None, history: Sequence[Turn], question: str,
                   max_prompt_tokens: int) -> BuiltPrompt:
        """The prompt for ``question`` after ``history``; the oldest turns are dropped (never the system prompt)
        until it fits in ``max_prompt_tokens``. Raises ``InvalidArgument`` if even the question alone does not."""
        if not question.strip():
            raise InvalidArgument("the message is empty")
        encoded: dict[str, list[int]] = {}  # each message's text is tokenized once, whatever is dropped

        def render(dropped: int) -> list[int]:
            messages = [m for t in history[dropped:] for m in (t.user, t.assistant)]
            return self.render(system_prompt, [*messages, ChatMessage("user", question)], encoded=encoded)

        ids = render(0)
        question_ids = tuple(encoded.get(question, ()))
        if len(ids) <= max_prompt_tokens:
            return BuiltPrompt(ids, 0, question_ids)
        alone = render(len(history))
        if len(alone) > max_prompt_tokens:
            raise InvalidArgument(
                f"the message is too long: the prompt is {len(alone)} tokens even without history, and at most "
                f"{max_prompt_tokens} fit (the context window minus max_tokens)"
            )
        # Fewest dropped turns that fit: binary search (the length shrinks as more turns are dropped).
        lo, hi, best = 1, len(history), alone
        while lo < hi:
            mid = (lo + hi) // 2
            ids = render(mid)
            if len(ids) <= max_prompt_tokens:
                hi, best = mid, ids
            else:
                lo = mid + 1
        if hi < len(history):
            best = render(hi)
        return BuiltPrompt(best, hi, question_ids)

    def build_completion(self, prompt: str) -> list[int]:
        """Plain continuation of ``prompt``; a prompt ending in the literal ``<EOQ>`` is one question."""
        if prompt.rstrip().endswith(EOQ_MARKER):
            question = prompt.rstrip()[: -len(EOQ_MARKER)]
            if not question.strip():
                raise InvalidArgument("the prompt is empty before <EOQ>")
            return self.render(None, [ChatMessage("user", question)])
        if not prompt:
            raise InvalidArgument("the prompt is empty")
        # The tokenizer's usual framing (e.g. BOS), but user text never becomes control tokens.
        return self.tokenizer.encode(prompt, add_special_tokens=True, split_special_tokens=True)

    def render(self, system_prompt: str | None, messages: Sequence[ChatMessage],
               add_generation_prompt: bool = True, encoded: dict[str, list[int]] | None = None) -> list[int]:
        """Token ids of the chat template applied to ``messages``, safely (see the module docstring).
        ``encoded``: message texts already tokenized (text -> ids), filled as it goes."""
        contents: list[ChatMessage] = []
        rendered_messages = []
        if system_prompt:
            contents.append(ChatMessage("system", system_prompt))
            rendered_messages.append({"role": "system", "content": _placeholder(0)})
        for m in messages:
            rendered_messages.append({"role": m.role, "content": _placeholder(len(contents))})
            contents.append(m)
        text = self._apply_template(rendered_messages, add_generation_prompt)
        ids: list[int] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            ids.extend(self._encode_template_text(text[pos : match.start()]))
            m = contents[int(match.group(1))]
            if m.token_ids is not None:
                ids.extend(m.token_ids)
            elif encoded is None:
                ids.extend(self.encode_user_text(m.content))
            else:
                if m.content not in encoded:
                    encoded[m.content] = self.encode_user_text(m.content)
                ids.extend(encoded[m.content])
            pos = match.end()
        ids.extend(self._encode_template_text(text[pos:]))
        return ids

    def answer_token_ids(self, ids: Sequence[int], stopped_at_end: bool, length: bool,
                         end_token_ids: frozenset[int]) -> tuple[int, ...] | None:
        """The token ids to keep with a finished answer, for later turns to reuse (None: tokenize its text again).
        ``ids``: what was generated; ``stopped_at_end``: it stopped on its own (end token or stop string),
        ``length``: it ran out of max_tokens. An answer ended by an end token (``end_token_ids``) keeps its ids
        without it (the template writes its own end-of-turn), one cut by max_tokens all of them; one cut by a stop
        string or a cancel keeps none (its text is not its tokens), nor one holding a control token (generated
        past the end under ignore_eos): replayed, it would be a control token inside the history."""
        kept: tuple[int, ...] | None = None
        if length:
            kept = tuple(ids)
        elif stopped_at_end and ids and ids[-1] in end_token_ids:
            kept = tuple(ids[:-1])
        if kept is not None and not self.control_token_ids.isdisjoint(kept):
            return None
        return kept

    def encode_user_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []

    # --- internals ---
    def _encode_template_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self._template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (TemplateError, ValueError) as e:  # templates raise, e.g. "System role not supported"
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                # Fold the system prompt into the first user message, as such templates expect.
                first = dict(messages[1])
                first["content"] = messages[0]["content"] + "\n\n" + first["content"]
                return self._apply_template([first, *messages[2:]], add_generation_prompt)
            raise InvalidArgument(f"the model's chat template rejected the conversation: {e}") from None

    def _generation_prompt(self) -> str:
        """The text the template adds to make the model answer: the end-of-question marker."""
        msgs = [{"role": "user", "content": _placeholder(0)}]
        with_prompt = self._apply_template(msgs, True)
        without = self._apply_template(msgs, False)
        return with_prompt[len(without) :] if with_prompt.startswith(without) else ""

    def _end_of_turn_tokens(self) -> frozenset[int]:
        """The special token the template puts right after an assistant answer (e.g. <|im_end|>, <|eot_id|>)."""
        msgs = [{"role": "user", "content": _placeholder(0)}, {"role": "assistant", "content": _placeholder(1)}]
        text = self._apply_template(msgs, False)
        match = list(_PLACEHOLDER.finditer(text))
        if len(match) < 2:
            return frozenset()
        after = self._encode_template_text(text[match[1].end() :])
        return frozenset(after[:1]) if after and after[0] in self._control_tokens() else frozenset()

    def _fingerprint(self) -> str:
        """16 hex digits naming this tokenizer's vocabulary and template: equal only for the same tokenization."""
        digest = hashlib.sha256()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items()))
        for part in (vocab, str(getattr(self.tokenizer, "chat_template", "") or self._template)):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:16]

    def _control_tokens(self) -> frozenset[int]:
        special = set(self.tokenizer.all_special_ids)
        special.update(i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special)
        return frozenset(special)

    def build_messages(self, messages: Sequence[ChatMessage], max_prompt_tokens: int) -> list[int]:
        """The prompt for a whole conversation the client sends (stateless, as OpenAI's chat completions):
        ``messages`` rendered as given — system messages where they stand — then the end-of-question marker, so
        the model answers next. Nothing is dropped: raises ``InvalidArgument`` unless it fits in
        ``max_prompt_tokens``."""
        if not any(m.content.strip() for m in messages):
            raise InvalidArgument("the messages are empty")
        ids = self.render(None, messages)
        if len(ids) > max_prompt_tokens:
            raise InvalidArgument(f"the messages are too long: the prompt is {len(ids)} tokens, and at most "
                                  f"{max_prompt_tokens} fit (the context window minus max_tokens)")
        return ids
