"""The stateful routes: ``/v1/responses`` and ``/v1/conversations`` on eoq's conversation trees (the mapping is in
``eoq.api.http.responses``). Each handler parses, calls the chat service (``ChatService.chat`` / ``regenerate``
/ the detached answers' ``watch`` and ``cancel``), and shapes OpenAI's objects; the plumbing (auth, drain, body
limit, errors, metrics, server-sent events that cancel their generation when the client leaves) is ``HttpApi``'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from eoq.api.http import responses as R
from eoq.api.http import schemas, sse
from eoq.api.http.errors import InvalidParam, ModelNotFound, json_response
from eoq.api.servicer import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from eoq.chat import tree
from eoq.chat.events import AnswerEvent
from eoq.chat.conversations import ConversationView
from eoq.chat.store import Role
from eoq.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from eoq.api.http.app import HttpApi


class StatefulRoutes:
    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self.chat = api.chat

    def routes(self) -> list:
        r = self.api._route
        return [
            r("POST", "/v1/responses", self.create_response, write=True),
            r("GET", "/v1/responses/{response_id}", self.get_response, write=False),
            r("DELETE", "/v1/responses/{response_id}", self.delete_response, write=True),
            r("POST", "/v1/responses/{response_id}/cancel", self.cancel_response, write=True),
            r("GET", "/v1/conversations", self.list_conversations, write=False),
            r("POST", "/v1/conversations", self.create_conversation, write=True),
            r("GET", "/v1/conversations/{conversation_id}", self.get_conversation, write=False),
            r("DELETE", "/v1/conversations/{conversation_id}", self.delete_conversation, write=True),
            r("GET", "/v1/conversations/{conversation_id}/items", self.list_items, write=False),
            r("POST", "/v1/conversations/{conversation_id}/regenerate", self.regenerate, write=True),
            r("POST", "/v1/conversations/{conversation_id}/active", self.set_active, write=True),
        ]

    async def _body(self, request: Request, model_type: type):
        from eoq.api.http.app import read_body

        req = schemas.parse(model_type, await read_body(request, self.api.max_body_bytes))
        if getattr(req, "model", self.api.model) not in (self.api.model,):
            raise ModelNotFound(f"The model `{req.model}` does not exist: this server serves `{self.api.model}`")
        return req

    # --- responses ---
    async def create_response(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        req: R.ResponseRequest = await self._body(request, R.ResponseRequest)
        req.check()
        system, turns, question = req.messages()
        sampling = req.sampling(self.api.policy)
        store = req.store is not False
        if not store:
            return await self._stateless(request, tenant, request_id, label, req, system, turns, question, sampling)
        cid, parent, previous = "", "", req.previous_response_id
        if previous is not None:
            cid, parent = R.message_of_response(previous)
        elif req.conversation_id is not None:
            cid = req.conversation_id
            if req.parent_item_id is not None:
                parent = cid if req.parent_item_id == R.conversation_id(cid) else R.message_of_item(req.parent_item_id)[1]
        if turns:
            if cid:
                raise InvalidParam("input: earlier turns can only start a conversation (the stored one has its "
                                   "history); send the new user message alone", "input")
            cid = (await self.chat.conversations.create(tenant, system, tuple(turns))).id
        events = self.chat.chat(tenant, cid, question, sampling, system or "", parent, detach=bool(req.background))
        return await self._respond(request, label, request_id, req, events, previous, system)

    async def _respond(self, request: Request, label: str, request_id: str, req, events: AsyncIterator[AnswerEvent],
                       previous: str | None, instructions: str | None) -> Response:
        it = aiter(events)
        background = bool(req.background)

        def base(first: AnswerEvent) -> dict:
            return R.response_object(rid=R.response_id(first.message_id), model=self.api.model, created_at=R.now(),
                                     status="in_progress", text=None, message_id=first.message_id,
                                     conversation=first.conversation_id, previous=previous, usage=None,
                                     background=background, instructions=instructions, store=True,
                                     max_output_tokens=req.max_output_tokens, text_format=req.text_format)

        if req.stream:
            numbers: list[R.EventNumbers] = []

            def render(e: AnswerEvent) -> list[bytes]:
                if not numbers:
                    numbers.append(R.EventNumbers(base(e), e.message_id))
                    head = numbers[0].preamble()
                else:
                    head = []
                return [sse.named(x["type"], x) for x in head + numbers[0].of(e)]

            return await self.api._stream(request, label, request_id, it, [], render, done=False,
                                          cancelled_ok=True)
        if background:  # the answer goes on without us: say where it is
            first = await self.api._first(request, it)
            await it.aclose()  # only this reader goes away (a detached answer outlives its stream)
            return json_response(base(first))
        text, last = await self.api._collect(request, it, cancelled_ok=True)
        obj = base(last)
        obj.update(status=R.STATUS[last.finish_reason], output=[R.output_item(last.message_id, text, "completed")],
                   usage=R.usage_object(last.usage),
                   incomplete_details={"reason": "max_output_tokens"} if last.finish_reason.value == "length" else None)
        return json_response(obj)

    async def _stateless(self, request, tenant, request_id, label, req, system, turns, question, sampling) -> Response:
        path = []
        if req.previous_response_id is not None:
            cid, mid = R.message_of_response(req.previous_response_id)
            view = await self.chat.conversations.get(tenant, cid, whole_tree=True)
            tree.find(view.conversation.messages, mid, cid, "response")
            path = tree.path_to(view.conversation.messages, mid)
            system = system or view.conversation.system_prompt
        elif req.conversation_id is not None:
            view = await self.chat.conversations.get(tenant, req.conversation_id)
            path = list(view.conversation.messages)
            system = system or view.conversation.system_prompt
        messages = R.chat_messages(system, path, turns, question)
        events = self.chat.complete_messages(tenant, messages, sampling)
        rid = "resp_" + request_id
        obj = R.response_object(rid=rid, model=self.api.model, created_at=R.now(), status="in_progress", text=None,
                                message_id=request_id, conversation=None, previous=req.previous_response_id,
                                usage=None, background=False, instructions=system, store=False,
                                max_output_tokens=req.max_output_tokens, text_format=req.text_format)
        if req.stream:
            numbers = R.EventNumbers(obj, request_id)
            sequence = [0]

            def render(e: AnswerEvent) -> list[bytes]:
                sequence[0] += 1
                e.sequence = sequence[0]
                head = numbers.preamble() if sequence[0] == 1 else []
                return [sse.named(x["type"], x) for x in head + numbers.of(e)]

            return await self.api._stream(request, label, request_id, aiter(events), [], render, done=False)
        text, last = await self.api._collect(request, events)
        obj.update(status=R.STATUS[last.finish_reason], output=[R.output_item(request_id, text, "completed")],
                   usage=R.usage_object(last.usage))
        return json_response(obj)

    async def _find(self, tenant: str, rid: str):
        cid, mid = R.message_of_response(rid)
        view = await self.chat.conversations.get(tenant, cid, whole_tree=True)
        message = tree.find(view.conversation.messages, mid, cid, "response")
        if message.role is not Role.ASSISTANT:
            raise InvalidArgument(f"{rid} is not a response")
        return view, message

    def _object(self, view: ConversationView, message, *, status: str | None = None) -> dict:
        live = view.generating == message.id
        parent = next((m for m in view.conversation.messages if m.id == message.parent_id), None)
        previous = R.response_id(parent.parent_id) if parent is not None and parent.parent_id else None
        return R.response_object(rid=R.response_id(message.id), model=self.api.model, created_at=message.created_at,
                                 status=status or R.status_of(message, live), text=message.content,
                                 message_id=message.id, conversation=view.conversation.id, previous=previous,
                                 usage=None, background=live, instructions=view.conversation.system_prompt,
                                 store=True, max_output_tokens=None)

    async def get_response(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        rid = request.path_params["response_id"]
        view, message = await self._find(tenant, rid)
        if request.query_params.get("stream") not in ("true", "1"):
            return json_response(self._object(view, message))
        after = request.query_params.get("starting_after", "")
        if after and not after.isdigit():
            raise InvalidParam("starting_after must be a whole number (a sequence number)", "starting_after")
        starting_after = int(after) if after else -1
        # The answer's events after the one holding sequence number `starting_after` (see EventNumbers).
        answer_after = max(0, starting_after - (R.PREAMBLE - 1))
        events = self.chat.detached.watch(tenant, view.conversation.id, message.id, answer_after)
        numbers = R.EventNumbers(self._object(view, message, status="in_progress"), message.id)
        if answer_after:  # the text before the first event replayed, for the closing events' whole text
            logged = await self.chat.store.answers.read(message.id, 0, 0) or []
            numbers.texts = [e.text for e in logged if e.sequence <= answer_after]
        started = [False]

        def render(e: AnswerEvent) -> list[bytes]:
            out = []
            if not started[0]:
                started[0] = True
                out += numbers.preamble()
            out += numbers.of(e)
            return [sse.named(x["type"], x) for x in out if x["sequence_number"] > starting_after]

        return await self.api._stream(request, label, request_id, aiter(events), [], render, done=False,
                                      cancelled_ok=True)

    async def delete_response(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        rid = request.path_params["response_id"]
        view, message = await self._find(tenant, rid)
        await self.chat.conversations.delete_message(tenant, view.conversation.id, message.id)
        return json_response({"id": rid, "object": "response", "deleted": True})

    async def cancel_response(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        rid = request.path_params["response_id"]
        view, message = await self._find(tenant, rid)
        if view.generating != message.id:
            if message.finish_reason is None:
                raise FailedPrecondition(f"{rid} is not running")
            return json_response(self._object(view, message))
        await self.chat.detached.cancel(tenant, view.conversation.id, message.id)
        return json_response(self._object(view, message, status="cancelled"))

    # --- conversations ---
    async def list_conversations(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        limit = request.query_params.get("limit", str(DEFAULT_PAGE_SIZE))
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE_SIZE:
            raise InvalidParam(f"limit must be 1 to {MAX_PAGE_SIZE}", "limit")
        convs, token = await self.chat.store.list(tenant, int(limit), request.query_params.get("after", ""))
        data = [R.conversation_object(c) for c in convs]
        return json_response({"object": "list", "data": data, "has_more": bool(token), "next_after": token or None})

    async def create_conversation(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        req: R.ConversationCreateRequest = await self._body(request, R.ConversationCreateRequest)
        system, turns = req.turns()
        conv = await self.chat.conversations.create(tenant, system, tuple(turns))
        return json_response(R.conversation_object(await self.chat.store.get(tenant, conv.id)))

    async def get_conversation(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        cid = R.conversation_of(request.path_params["conversation_id"])
        view = await self.chat.conversations.get(tenant, cid)
        return json_response({**R.conversation_object(view.conversation),
                              "active_item_id": R.item_id(view.active_leaf) if view.active_leaf else None})

    async def delete_conversation(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        conv = request.path_params["conversation_id"]
        await self.chat.store.delete(tenant, R.conversation_of(conv))
        return json_response({"id": conv, "object": "conversation.deleted", "deleted": True})

    async def list_items(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        cid = R.conversation_of(request.path_params["conversation_id"])
        q = request.query_params
        whole = q.get("branch", "active") == "tree"
        order = q.get("order", "asc" if whole else "desc")
        if order not in ("asc", "desc"):
            raise InvalidParam("order must be 'asc' or 'desc'", "order")
        limit = q.get("limit", "100" if whole else "20")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise InvalidParam("limit must be 1 to 1000", "limit")
        view = await self.chat.conversations.get(tenant, cid, whole_tree=whole)
        items = [R.conversation_item(m, view.siblings.get(m.id, ()), m.id == view.generating)
                 for m in view.conversation.messages]
        if order == "desc":
            items.reverse()
        after = q.get("after")
        if after:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise InvalidParam(f"after: no item {after[:60]!r} in this conversation", "after")
            items = items[ids.index(after) + 1:]
        page = items[: int(limit)]
        return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page),
                              "active_item_id": R.item_id(view.active_leaf) if view.active_leaf else None})

    async def regenerate(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        cid = R.conversation_of(request.path_params["conversation_id"])
        req: R.RegenerateRequest = await self._body(request, R.RegenerateRequest)
        question = R.message_of_item(req.item_id)[1] if req.item_id else ""
        events = self.chat.regenerate(tenant, cid, question, req.sampling(self.api.policy), bool(req.background))
        return await self._respond(request, label, request_id, req, events, None, None)

    async def set_active(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        cid = R.conversation_of(request.path_params["conversation_id"])
        req: R.ActiveBranchRequest = await self._body(request, R.ActiveBranchRequest)
        view = await self.chat.conversations.set_active_branch(tenant, cid, R.message_of_item(req.item_id)[1])
        return json_response({"object": "list", "active_item_id": R.item_id(view.active_leaf),
                              "data": [R.conversation_item(m, view.siblings.get(m.id, ()), m.id == view.generating)
                                       for m in view.conversation.messages]})
