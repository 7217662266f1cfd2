"""Scale-out through a real balancer: deploy/nginx/nginx.conf (rendered by ``balancer.py``: only addresses, ports
and file paths changed) in front of three ``eoq serve`` processes (the real default model) on one real
redis-server, all on loopback.

- Affinity: a conversation's turns land on one replica (nginx's access log says which), and its prompt is
  served from that replica's prefix cache as on a single server: each turn finds the previous turn's whole
  prompt cached. Calls without ``x-conversation-id`` (a new conversation's first turn) go round-robin; a
  conversation created first (CreateConversation) has even its first turn on its replica.
- A replica SIGKILLed: only its in-flight turn fails (UNAVAILABLE before the first token; after it nginx can
  only reset the stream, which gRPC reports as INTERNAL "RST_STREAM error code 2"), nothing of that turn is
  stored, nginx moves the replica's conversations to the others (each to one, consistently) and every
  conversation continues with its whole history.
- A replica drained: taken out of nginx (reload) and sent SIGTERM, it finishes its stream while every new call
  goes elsewhere; sent SIGTERM alone, its conversations get UNAVAILABLE ("shutting down") until it exits, then
  continue elsewhere.

The replicas run with one torch thread each, a 60 s drain grace (a stream must finish) and a 5 s lock TTL (a
killed replica's lock on the conversation it was answering frees in 5 s instead of 30). Each test is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from tests.conftest import RedisServer, _free_port, running_redis

from .balancer import Nginx
from .live import CALL_TIMEOUT_SECONDS, Answer, EoqServer, bearer, chat, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "nginx-key"
AUTH = bearer(API_KEY)
BLOCK = 16  # --block-size (the default): the prefix cache reuses whole blocks
LOCK_TTL_SECONDS = 5


def routed(conversation_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call in a conversation, as eoq's clients send it (clients/common.py ``metadata``)."""
    return (*AUTH, ("x-conversation-id", conversation_id))


@dataclass
class Fleet:
    work: Path
    redis: RedisServer
    replicas: list[EoqServer]
    nginx: Nginx
    stack: ExitStack
    started: int = field(default=0)

    def new_replica(self) -> EoqServer:
        self.started += 1
        http_port = _free_port()
        server = EoqServer(self.work, f"r{self.started}", redis_url=self.redis.url, api_keys=f"{API_KEY}:team",
                           extra_args=["--num-threads", "1", "--grace-period-seconds", "60",
                                       "--lock-ttl-seconds", str(LOCK_TTL_SECONDS), "--http-port", str(http_port)])
        server.http_port = http_port  # type: ignore[attr-defined]
        self.stack.callback(server.stop)
        return server

    def by_address(self, address: str) -> EoqServer:
        (found,) = [r for r in self.replicas if r.address == address]
        return found

    def replace_exited(self) -> None:
        """Bring the fleet back to three serving replicas (new processes for exited ones) and reload nginx,
        which also forgets the failures its passive detection counted."""
        dead = [r for r in self.replicas if r.process.exited]
        if not dead:
            return
        fresh = [self.new_replica() for _ in dead]
        for r in fresh:
            r.start()
        for r in fresh:
            r.wait_serving()
        self.replicas = [r for r in self.replicas if r not in dead] + fresh
        self.nginx.grpc_backends = [r.address for r in self.replicas]
        self.nginx.http_backends = [f"127.0.0.1:{r.http_port}" for r in self.replicas]
        self.nginx.reload()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("nginx")
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(work / "redis"))
        fleet = Fleet(work, redis, [], None, stack)  # type: ignore[arg-type]
        fleet.replicas = [fleet.new_replica() for _ in range(3)]
        for r in fleet.replicas:
            r.start()
        for r in fleet.replicas:
            r.wait_serving()
        fleet.nginx = Nginx(work / "nginx", [r.address for r in fleet.replicas],
                            [f"127.0.0.1:{r.http_port}" for r in fleet.replicas])
        stack.callback(fleet.nginx.stop)
        fleet.nginx.start()
        yield fleet


@pytest.fixture
def serving(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet with three serving replicas (one a test killed or drained is replaced first)."""
    fleet.replace_exited()
    yield fleet


@pytest.fixture
def stub(fleet: Fleet) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(fleet.nginx.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def served(fleet: Fleet, since: int) -> list:
    """Access-log lines after the first ``since``."""
    return fleet.nginx.access_log()[since:]


def turn(fleet: Fleet, stub, message: str, conversation_id: str = "", max_tokens: int = 8) -> tuple[Answer, str]:
    """One Chat through nginx (routed when it continues a conversation) and the replica that answered it."""
    before = len(fleet.nginx.access_log())
    metadata = routed(conversation_id) if conversation_id else AUTH
    answer = chat(stub, message, conversation_id, metadata=metadata, max_tokens=max_tokens)
    return answer, logged(fleet, before, "/Chat ", conversation=conversation_id or "-")[0].upstream


def logged(fleet: Fleet, since: int, request: str, count: int = 1, conversation: str | None = None) -> list:
    """The ``count`` access-log lines of ``request`` (with that ``x-conversation-id``, "-" for none) after the
    first ``since`` lines; nginx writes a line when it has finished the request, which may be just after the
    client read the end of the answer."""
    found: list = []

    def written() -> bool:
        found[:] = [line for line in served(fleet, since) if request in line.request
                    and (conversation is None or line.conversation == conversation)]
        return len(found) >= count

    wait_until(written, 5, f"nginx logging {count} {request.strip()}", interval=0.02)
    assert len(found) == count, found
    return found


def conversation(stub, conversation_id: str) -> pb.Conversation:
    return stub.GetConversation(pb.GetConversationRequest(id=conversation_id), metadata=routed(conversation_id),
                                timeout=30)


def whole_prefix_cached(answer: Answer, previous: Answer) -> bool:
    """This turn's cached prompt covers every whole block of the previous turn's prompt: what one server's
    prefix cache gives a conversation."""
    return answer.last.usage.cached_prompt_tokens >= previous.last.usage.prompt_tokens // BLOCK * BLOCK


@pytest.mark.timeout(300)
def test_the_hash_spreads_conversations_evenly(serving: Fleet) -> None:
    before = len(serving.nginx.access_log())
    with grpc.insecure_channel(serving.nginx.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            reply = health.Check(health_pb2.HealthCheckRequest(), metadata=(("x-conversation-id", uuid.uuid4().hex),),
                                 timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    counts = {r.address: 0 for r in serving.replicas}
    for line in logged(serving, before, "/grpc.health.v1.Health/Check ", 300):
        counts[line.upstream] += 1
    assert sum(counts.values()) == 300
    assert all(60 <= n <= 140 for n in counts.values()), counts  # about 100 each (binomial: far outside is broken)


@pytest.mark.timeout(400)
def test_a_conversations_turns_land_on_one_replica_whose_cache_grows(serving: Fleet, stub) -> None:
    # New conversations (no x-conversation-id yet) go round-robin: six of them reach all three replicas.
    firsts = [turn(serving, stub, f"Name a colour. ({i})") for i in range(6)]
    assert {replica for _, replica in firsts} == {r.address for r in serving.replicas}
    for first, _ in firsts:
        answers, replicas = [first], []
        for question in ("Another one?", "And one more?", "Which of them do you like best?"):
            answer, replica = turn(serving, stub, question, first.conversation_id)
            answers.append(answer)
            replicas.append(replica)
        # Every routed turn on the replica the conversation hashes to ...
        assert len(set(replicas)) == 1, replicas
        # ... whose prefix cache holds the previous turn's prompt, as on a single server (turn 2 is routed for
        # the first time: its replica may not be the first turn's, which only chance would have chosen).
        for previous, answer in zip(answers[1:], answers[2:]):
            assert whole_prefix_cached(answer, previous), (previous.last.usage, answer.last.usage)
        assert conversation(stub, first.conversation_id).message_count == 8


@pytest.mark.timeout(300)
def test_a_conversation_created_first_has_every_turn_on_its_replica(serving: Fleet, stub) -> None:
    for i in range(3):
        created = stub.CreateConversation(pb.CreateConversationRequest(), metadata=AUTH, timeout=30)
        first, replica1 = turn(serving, stub, f"What is {i} plus two?", created.id)
        second, replica2 = turn(serving, stub, "And times three?", created.id)
        assert first.conversation_id == created.id
        assert replica1 == replica2
        assert whole_prefix_cached(second, first), (first.last.usage, second.last.usage)


def _post(url: str, body: dict, headers: dict[str, str]) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "content-type": "application/json", "authorization": f"Bearer {API_KEY}", **headers})
    with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_SECONDS) as response:
        return json.loads(response.read())


def _model(nginx: Nginx) -> str:
    models = urllib.request.Request(f"{nginx.http_url}/v1/models", headers={"authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(models, timeout=30) as response:
        return json.loads(response.read())["data"][0]["id"]


@pytest.mark.timeout(300)
def test_http_chat_completions_are_routed_by_the_clients_conversation_header(serving: Fleet) -> None:
    nginx = serving.nginx
    model = _model(nginx)
    # Stateless chat completions: the client's own stable id in x-conversation-id.
    thread = uuid.uuid4().hex
    messages = [{"role": "user", "content": "Name a fruit."}]
    cached, before = [], len(nginx.access_log())
    for question in ("Another one?", "And one more?"):
        reply = _post(f"{nginx.http_url}/v1/chat/completions",
                      {"model": model, "messages": messages, "max_tokens": 8},
                      {"x-conversation-id": thread})
        cached.append((reply["usage"]["prompt_tokens"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]))
        messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                     {"role": "user", "content": question}]
    lines = logged(serving, before, "/v1/chat/completions ", 2)
    assert len({line.upstream for line in lines}) == 1, [line.upstream for line in lines]
    assert cached[1][1] >= cached[0][0] // BLOCK * BLOCK, cached


@pytest.mark.timeout(300)
def test_http_responses_are_routed_by_the_conversation_their_ids_name(serving: Fleet) -> None:
    nginx = serving.nginx
    model = _model(nginx)
    before = len(nginx.access_log())
    try:
        first = _post(f"{nginx.http_url}/v1/responses", {"model": model, "input": "Name a tree.",
                                                         "max_output_tokens": 8}, {})
    except urllib.error.HTTPError as e:
        if e.code == 404 and b"unknown_url" in e.read():
            pytest.skip("this build's HTTP API has no /v1/responses route yet")
        raise
    # Routed by the conversation that previous_response_id names (in the JSON body), no header needed.
    previous, usages = first["id"], [first["usage"]]
    for question in ("Another one?", "And one more?"):
        reply = _post(f"{nginx.http_url}/v1/responses", {"model": model, "input": question,
                                                         "previous_response_id": previous,
                                                         "max_output_tokens": 8}, {})
        previous = reply["id"]
        usages.append(reply["usage"])
    # The first (a new conversation: round-robin) anywhere, the two that continue it on one replica.
    lines = logged(serving, before, "/v1/responses ", 3)
    assert lines[1].upstream == lines[2].upstream, ([line.upstream for line in lines], first["id"], previous)
    assert usages[2]["input_tokens_details"]["cached_tokens"] >= usages[1]["input_tokens"] // BLOCK * BLOCK, usages


def _retry_busy(call, timeout: float = LOCK_TTL_SECONDS + 15.0):
    """``call()``, again while it ends ABORTED: the conversation a killed replica was answering stays locked
    until the lock's TTL passes. Any other failure fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(500)
def test_a_killed_replicas_conversations_continue_on_the_others(serving: Fleet, stub) -> None:
    conversations: dict[str, str] = {}  # id -> replica
    for i in range(6):
        first, _ = turn(serving, stub, f"Name an animal. ({i})")
        _, replica = turn(serving, stub, "Another one?", first.conversation_id)
        conversations[first.conversation_id] = replica
    busy_id, victim_address = next(iter(conversations.items()))
    victim = serving.by_address(victim_address)
    victims = [cid for cid, replica in conversations.items() if replica == victim_address]

    # A turn streaming on the victim when it dies.
    request = pb.ChatRequest(conversation_id=busy_id, message="Tell me a long story about a ship.",
                             sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
    stream = stub.Chat(request, metadata=routed(busy_id), timeout=CALL_TIMEOUT_SECONDS)
    events = iter(stream)
    next(events)
    next(events)
    os.killpg(victim.process._process.pid, signal.SIGKILL)  # the server and its engine process
    killed_at = time.time()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in events:
            pass
    # Cut after its first token: nginx can only reset the stream (RST_STREAM INTERNAL_ERROR). Before the first
    # token it would have been a 502, UNAVAILABLE. Either way nothing of the turn was stored (below).
    assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), failed.value
    if failed.value.code() == grpc.StatusCode.INTERNAL:
        assert "RST_STREAM" in failed.value.details(), failed.value.details()
    wait_until(lambda: victim.process.exited, 10, "the killed replica gone")

    # Every conversation continues, on a live replica, with its whole history; the in-flight turn left nothing.
    for cid in conversations:
        assert conversation(stub, cid).message_count == 4, cid
    moved: dict[str, set[str]] = {}
    for cid in conversations:
        a, replica_a = _retry_busy(lambda: turn(serving, stub, "What was the first animal you named?", cid))
        b, replica_b = turn(serving, stub, "And the second?", cid)
        assert replica_a == replica_b != victim_address
        if cid in victims:
            moved.setdefault(replica_a, set()).add(cid)
            # A cache miss on the first turn there, then the new replica's cache serves the conversation.
            assert whole_prefix_cached(b, a), (a.last.usage, b.last.usage)
        else:
            assert replica_a == conversations[cid]  # the others' conversations did not move
        stored = conversation(stub, cid)
        assert stored.message_count == 8
        assert [m.role for m in stored.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT] * 4
    assert sum(len(c) for c in moved.values()) == len(victims)

    # Passive detection: after the kill nginx tried the dead replica at most once per fail_timeout (10 s), each
    # time moving the call on to a live one at once (its port refuses: safe to retry), and never got an answer
    # from it.
    after = [line for line in serving.nginx.access_log() if "/Chat " in line.request][-(2 * len(conversations)):]
    attempts = [line for line in after if victim_address in line.upstreams]
    assert all(line.upstream != victim_address and line.status == 200 for line in after), after
    assert len(attempts) <= 1 + int((time.time() - killed_at) // 10), attempts


def _drain_scenario(fleet: Fleet, stub, *, take_out_first: bool) -> None:
    # Two conversations on one replica (the victim): one streams through the drain, one asks meanwhile.
    by_replica: dict[str, list[str]] = {}
    while not any(len(ids) >= 2 for ids in by_replica.values()):
        first, _ = turn(fleet, stub, "Name a city.")
        _, replica = turn(fleet, stub, "Another one?", first.conversation_id)
        by_replica.setdefault(replica, []).append(first.conversation_id)
        assert sum(len(ids) for ids in by_replica.values()) <= 8, "no two conversations on one replica"
    victim_address, (streaming_id, waiting_id, *_) = next((r, ids) for r, ids in by_replica.items() if len(ids) >= 2)
    victim = fleet.by_address(victim_address)
    others = {r.address for r in fleet.replicas} - {victim_address}

    request = pb.ChatRequest(conversation_id=streaming_id, message="Tell me a long story about a garden.",
                             sampling=pb.SamplingParams(max_tokens=120, ignore_eos=True))
    stream = stub.Chat(request, metadata=routed(streaming_id), timeout=CALL_TIMEOUT_SECONDS)
    events = iter(stream)
    received = [next(events)]
    reader = threading.Thread(target=lambda: received.extend(events))
    reader.start()
    if take_out_first:
        fleet.nginx.reload(down=[victim_address])  # the old worker keeps the stream; new calls avoid the victim
    os.kill(victim.process._process.pid, signal.SIGTERM)  # eoq serve itself, as docker stop / the kubelet

    outcomes = []
    while reader.is_alive():
        for cid in (waiting_id, ""):
            try:
                _, replica = turn(fleet, stub, "One more?", cid)
                outcomes.append((cid, "OK", replica))
            except grpc.RpcError as e:
                outcomes.append((cid, e.code().name, e.details()))
    reader.join(CALL_TIMEOUT_SECONDS)
    answer = Answer(received)
    assert stream.code() == grpc.StatusCode.OK
    assert (answer.last.finish_reason, answer.last.usage.completion_tokens) == (pb.FINISH_REASON_LENGTH, 120)
    wait_until(lambda: victim.process.exited, 30, "the drained replica exiting")
    assert victim.process._process.returncode == 0

    stored = conversation(stub, streaming_id)
    assert stored.messages[-1].content == answer.text and stored.message_count == 6
    if take_out_first:
        assert outcomes and all(code == "OK" and replica in others for _, code, replica in outcomes), outcomes
    else:
        # Its conversations are refused while it drains, cleanly (nothing was run or stored: retry), never
        # anything else; new conversations that round-robin brings to it too; nothing else breaks.
        for _, code, detail in outcomes:
            assert code == "OK" or (code == "UNAVAILABLE" and "shutting down" in detail), (code, detail)
        assert any(cid == waiting_id and code == "UNAVAILABLE" for cid, code, _ in outcomes), outcomes
    # Once it is gone, its conversations continue elsewhere with their whole history.
    answer, replica = turn(fleet, stub, "Which city did you name first?", waiting_id)
    assert replica in others
    assert conversation(stub, waiting_id).message_count >= 6


@pytest.mark.timeout(500)
def test_a_replica_taken_out_then_drained_finishes_its_stream_while_calls_go_elsewhere(serving: Fleet, stub) -> None:
    _drain_scenario(serving, stub, take_out_first=True)


@pytest.mark.timeout(500)
def test_a_replica_drained_by_sigterm_alone_refuses_cleanly_until_it_exits(serving: Fleet, stub) -> None:
    _drain_scenario(serving, stub, take_out_first=False)
