"""Protobuf <-> internal types, in one place. No other module below the API imports the generated code."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from google.protobuf.timestamp_pb2 import Timestamp

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq.chat.events import AnswerEvent, Usage
from eoq.chat.conversations import ConversationView
from eoq.chat.store import Conversation, Role, StoredMessage
from eoq.engine.types import (
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_N,
    MAX_STOP_STRINGS,
    Constraint,
    ConstraintKind,
    FinishReason,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
)
from eoq.config import Settings
from eoq.errors import InvalidArgument

FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
ROLE_TO_PB = {Role.SYSTEM: pb.ROLE_SYSTEM, Role.USER: pb.ROLE_USER, Role.ASSISTANT: pb.ROLE_ASSISTANT}


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """Server defaults and limits applied to every request's sampling parameters."""

    default_max_tokens: int
    max_tokens_limit: int
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_repetition_penalty: float = 1.0
    max_stop_strings: int = MAX_STOP_STRINGS
    max_n: int = MAX_N
    max_logit_bias_entries: int = MAX_LOGIT_BIAS_ENTRIES

    def validate(self, params: SamplingParams) -> SamplingParams:
        """``params`` checked against this server's limits (``SamplingParams.validate``)."""
        return params.validate(max_tokens_limit=self.max_tokens_limit, max_stop_strings=self.max_stop_strings,
                               max_n=self.max_n, max_logit_bias_entries=self.max_logit_bias_entries)

    @classmethod
    def from_settings(cls, settings: Settings, max_tokens_limit: int) -> SamplingPolicy:
        """The policy of ``settings``' sampling defaults and limits: every field of this class that is a setting
        (``default_*``, ``max_stop_strings``), by name; ``max_tokens_limit`` as the server resolved it."""
        shared = {f.name: getattr(settings, f.name) for f in fields(cls) if f.name in Settings.model_fields}
        shared.pop("max_tokens_limit", None)  # the setting may be unset (None = the context window)
        return cls(max_tokens_limit=max_tokens_limit, **shared)

    def sampling_from_pb(self, p: pb.SamplingParams) -> SamplingParams:
        """Fill 0 = default fields and validate; raises ``InvalidArgument`` naming the bad field."""
        if p.top_p < 0:
            raise InvalidArgument(f"top_p must be in (0, 1] (0 = off), got {p.top_p:g}")
        params = SamplingParams(
            temperature=p.temperature if p.temperature != 0 else self.default_temperature,
            top_p=p.top_p if p.top_p != 0 else self.default_top_p,
            top_k=p.top_k if p.top_k != 0 else self.default_top_k,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty != 0 else self.default_repetition_penalty,
            max_tokens=p.max_tokens if p.max_tokens != 0 else self.default_max_tokens,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            ignore_eos=p.ignore_eos,
            n=p.n or 1,
            logprobs=p.logprobs,
            top_logprobs=p.top_logprobs,
            prompt_logprobs=p.prompt_logprobs,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias=tuple(sorted(p.logit_bias.items())),
            min_tokens=p.min_tokens,
            stop_token_ids=tuple(p.stop_token_ids),
            constraint=_constraint_from_pb(p),
        )
        # validate may normalize (a temperature too small to divide by is greedy): use what it returns.
        return self.validate(params)


def _constraint_from_pb(p: pb.SamplingParams) -> Constraint | None:
    which = p.WhichOneof("constraint")
    if which is None:
        return None
    if which == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT) if p.json_object else None
    if which == "choice":
        return Constraint(ConstraintKind.CHOICE, choices=tuple(p.choice.choices))
    return Constraint(ConstraintKind(which), getattr(p, which))


def logprobs_to_pb(logprobs: list[TokenLogprob] | None, token_text) -> list[pb.TokenLogprob]:
    """``token_text(id)``: the token's text (``ChatService.token_text``)."""
    if not logprobs:
        return []
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token=token_text(lp.token_id),
                            top=[pb.TopLogprob(token_id=t, logprob=v, token=token_text(t)) for t, v in lp.top])
            for lp in logprobs]


def _timestamp(unix_seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_seconds * 1e9))
    return ts


def message_to_pb(m: StoredMessage, sibling_ids: tuple[str, ...] = (), generating: bool = False) -> pb.Message:
    return pb.Message(role=ROLE_TO_PB[m.role], content=m.content, finish_reason=FINISH_TO_PB[m.finish_reason],
                      created_at=_timestamp(m.created_at), id=m.id, parent_id=m.parent_id or "",
                      sibling_ids=sibling_ids, generating=generating)


def conversation_to_pb(c: Conversation) -> pb.Conversation:
    return pb.Conversation(
        id=c.id,
        system_prompt=c.system_prompt or "",
        messages=[message_to_pb(m) for m in c.messages],
        created_at=_timestamp(c.created_at),
        updated_at=_timestamp(c.updated_at),
        message_count=c.message_count,
        system_prompt_truncated=c.system_prompt_truncated,  # list rows: a preview (eoq.chat.store.listed)
    )


def conversation_view_to_pb(view: ConversationView) -> pb.Conversation:
    """A conversation with its messages (the active branch or the whole tree): an unfinished answer that no
    generation is writing any more (its server died) reads as cancelled."""
    conv = conversation_to_pb(replace(view.conversation, messages=()))
    conv.active_message_id = view.active_leaf or ""
    for m in view.conversation.messages:
        live = m.id == view.generating
        if m.role is Role.ASSISTANT and m.finish_reason is None and not live:
            m = replace(m, finish_reason=FinishReason.CANCELLED)
        conv.messages.append(message_to_pb(m, view.siblings.get(m.id, ()), live))
    return conv


def same_named(message_cls, *sources) -> dict:
    """The fields of the proto message ``message_cls`` taken from the attributes of the same names of
    ``sources`` (the first that has one): the internal types name their fields as the proto does."""
    out = {}
    for f in message_cls.DESCRIPTOR.fields:
        for source in sources:
            if hasattr(source, f.name):
                out[f.name] = getattr(source, f.name)
                break
    return out


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(**same_named(pb.Usage, u))


def chat_event_to_pb(e: AnswerEvent, token_text=str) -> pb.ChatEvent:
    event = pb.ChatEvent(conversation_id=e.conversation_id, delta=e.text, token_ids=e.token_ids,
                         finish_reason=FINISH_TO_PB[e.finish_reason], dropped_turns=e.dropped_turns,
                         user_message_id=e.user_message_id, message_id=e.message_id, sequence=e.sequence,
                         answer_index=e.index, logprobs=logprobs_to_pb(e.logprobs, token_text))
    if e.usage is not None:
        event.usage.CopyFrom(usage_to_pb(e.usage))
    return event


def complete_event_to_pb(e: AnswerEvent, token_text=str) -> pb.CompleteEvent:
    event = pb.CompleteEvent(delta=e.text, token_ids=e.token_ids, finish_reason=FINISH_TO_PB[e.finish_reason],
                             answer_index=e.index, logprobs=logprobs_to_pb(e.logprobs, token_text),
                             prompt_logprobs=logprobs_to_pb(e.prompt_logprobs, token_text))
    if e.usage is not None:
        event.usage.CopyFrom(usage_to_pb(e.usage))
    return event


def model_info_to_pb(info: ModelInfo, policy: SamplingPolicy, end_of_question_marker: str) -> pb.ModelInfo:
    """The model's facts, the policy's token limits and the marker that ends a question."""
    return pb.ModelInfo(end_of_question_marker=end_of_question_marker, **same_named(pb.ModelInfo, info, policy))
