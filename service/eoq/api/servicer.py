"""The gRPC servicer: authenticates, translates protobuf to internal calls and back, nothing more."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api import adapter
from eoq.api.adapter import SamplingPolicy
from eoq.aio import wait_until
from eoq.api.auth import ApiKeys
from eoq.chat.service import ChatService
from eoq.errors import InvalidArgument, Unavailable

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, chat: ChatService, auth: ApiKeys, policy: SamplingPolicy, model_info: pb.ModelInfo) -> None:
        self.chat = chat
        self.auth = auth
        self.policy = policy
        self.model_info = model_info
        self.draining = False
        self._streams: set[asyncio.Task] = set()  # calls streaming an answer now

    # --- drain support ---
    @property
    def num_streaming(self) -> int:
        """Calls streaming an answer, and detached answers still generating here."""
        return len(self._streams) + self.chat.detached.num_running

    async def wait_streams(self, timeout: float) -> bool:
        """Wait until no answer is streaming or generating (True) or ``timeout`` passes (False)."""
        return await wait_until(lambda: not self.num_streaming, timeout)

    def _tenant(self, context: grpc.aio.ServicerContext, *, write: bool) -> str:
        return self.auth.authenticate(context.invocation_metadata(), write=write)

    def _admit(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry (another replica will answer)")

    async def _stream(self, events: AsyncIterator, convert) -> AsyncIterator:
        task = asyncio.current_task()
        self._streams.add(task)
        try:
            async with aclosing(events) as it:
                async for e in it:
                    yield convert(e)
        finally:
            self._streams.discard(task)

    async def _converter(self, to_pb, sampling):
        """``to_pb`` for this request's events: with the token texts when it asked for logprobs."""
        token_text = await self.chat.token_text(sampling)
        return to_pb if token_text is None else functools.partial(to_pb, token_text=token_text)

    # --- RPCs ---
    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatEvent]:
        tenant = self._tenant(context, write=True)
        self._admit()
        sampling = self.policy.sampling_from_pb(request.sampling)
        events = self.chat.chat(tenant, request.conversation_id, request.message, sampling, request.system_prompt,
                                request.parent_message_id, request.detach)
        async for event in self._stream(events, await self._converter(adapter.chat_event_to_pb, sampling)):
            yield event

    async def Regenerate(self, request: pb.RegenerateRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatEvent]:
        tenant = self._tenant(context, write=True)
        self._admit()
        sampling = self.policy.sampling_from_pb(request.sampling)
        events = self.chat.regenerate(tenant, request.conversation_id, request.message_id, sampling, request.detach)
        async for event in self._stream(events, await self._converter(adapter.chat_event_to_pb, sampling)):
            yield event

    async def WatchAnswer(self, request: pb.WatchAnswerRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatEvent]:
        tenant = self._tenant(context, write=False)
        _required(request, "conversation_id", "message_id")
        events = self.chat.detached.watch(tenant, request.conversation_id, request.message_id,
                                          request.after_sequence)
        convert = adapter.chat_event_to_pb
        async with aclosing(events) as it:  # a watcher is not an answer: the drain does not wait for it
            async for event in it:
                if event.logprobs and convert is adapter.chat_event_to_pb:  # the answer asked for logprobs
                    convert = functools.partial(convert, token_text=(await self.chat.token_texts()).__getitem__)
                yield convert(event)

    async def CancelAnswer(self, request: pb.CancelAnswerRequest,
                           context: grpc.aio.ServicerContext) -> pb.CancelAnswerResponse:
        tenant = self._tenant(context, write=True)
        _required(request, "conversation_id", "message_id")
        was_running = await self.chat.detached.cancel(tenant, request.conversation_id, request.message_id)
        return pb.CancelAnswerResponse(was_running=was_running)

    async def SetActiveBranch(self, request: pb.SetActiveBranchRequest,
                              context: grpc.aio.ServicerContext) -> pb.Conversation:
        tenant = self._tenant(context, write=True)
        _required(request, "conversation_id", "message_id")
        view = await self.chat.conversations.set_active_branch(tenant, request.conversation_id, request.message_id)
        return adapter.conversation_view_to_pb(view)

    async def DeleteMessage(self, request: pb.DeleteMessageRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteMessageResponse:
        tenant = self._tenant(context, write=True)
        _required(request, "conversation_id", "message_id")
        deleted, leaf = await self.chat.conversations.delete_message(tenant, request.conversation_id, request.message_id)
        return pb.DeleteMessageResponse(deleted_messages=deleted, active_message_id=leaf or "")

    async def Complete(self, request: pb.CompleteRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CompleteEvent]:
        tenant = self._tenant(context, write=True)
        self._admit()
        sampling = self.policy.sampling_from_pb(request.sampling)
        events = self.chat.complete(request.prompt, sampling, tenant)
        async for event in self._stream(events, await self._converter(adapter.complete_event_to_pb, sampling)):
            yield event

    async def CreateConversation(self, request: pb.CreateConversationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.Conversation:
        tenant = self._tenant(context, write=True)
        conv = await self.chat.store.create(tenant, request.system_prompt or None)
        return adapter.conversation_to_pb(conv)

    async def GetConversation(self, request: pb.GetConversationRequest,
                              context: grpc.aio.ServicerContext) -> pb.Conversation:
        tenant = self._tenant(context, write=False)
        _required(request, "id")
        return adapter.conversation_view_to_pb(await self.chat.conversations.get(tenant, request.id, request.tree))

    async def ListConversations(self, request: pb.ListConversationsRequest,
                                context: grpc.aio.ServicerContext) -> pb.ListConversationsResponse:
        tenant = self._tenant(context, write=False)
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}, got {request.page_size}")
        convs, token = await self.chat.store.list(tenant, request.page_size or DEFAULT_PAGE_SIZE, request.page_token)
        return pb.ListConversationsResponse(conversations=[adapter.conversation_to_pb(c) for c in convs],
                                            next_page_token=token)

    async def DeleteConversation(self, request: pb.DeleteConversationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.DeleteConversationResponse:
        tenant = self._tenant(context, write=True)
        _required(request, "id")
        await self.chat.store.delete(tenant, request.id)
        return pb.DeleteConversationResponse()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        self._tenant(context, write=False)
        return self.model_info


def _required(request, *names: str) -> None:
    """INVALID_ARGUMENT naming the first of the request's fields ``names`` that is empty."""
    for name in names:
        if not getattr(request, name):
            raise InvalidArgument(f"{name} is required")
