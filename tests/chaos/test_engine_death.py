"""The engine dies — SIGKILLed as the OOM killer would, during a stream or while loading, or its steps keep
failing — and the server notices at once: streams end UNAVAILABLE (retry-safe), health goes NOT_SERVING, a new
engine starts, health returns to SERVING, the conversation goes on with nothing half-written; past the restart
budget the server exits non-zero. Ctrl-C (SIGINT to the whole process group) drains instead of killing the engine."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client import generate_latest

from grpc_health.v1 import health_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.engine.async_engine import AsyncEngine, EngineState
from eoq.engine.backends import MAX_FAILED_STEPS
from eoq.engine.model.checkpoint import resolve_checkpoint
from eoq.engine.types import EngineConfig, EngineRequest, SamplingParams
from eoq.errors import ConfigError
from tests.api.client import FRANCE, ask, rpc_error, sampling, serving
from tests.chaos.conftest import NOT_SERVING, SERVING, engine_children, eoq_serve, health_of, wait_health
from tests.conftest import model_cache_dir

STORY = "Tell me a long story about a lighthouse keeper."


async def first_event(call):
    events = call.__aiter__()
    return events, await events.__anext__()


async def test_engine_killed_mid_stream_fails_fast_restarts_and_the_conversation_goes_on(redis_server) -> None:
    async with serving(redis_url=redis_server.url) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub, health = chat_pb2_grpc.ChatServiceStub(channel), health_pb2_grpc.HealthStub(channel)
            first = await ask(stub, FRANCE, max_tokens=24)
            cid = first.conversation_id
            call = stub.Chat(pb.ChatRequest(conversation_id=cid, message=STORY,
                                            sampling=sampling(400, ignore_eos=True)))
            events, _ = await first_event(call)
            engine = psutil.Process(running.engine.engine_pid)
            killed = time.monotonic()
            engine.send_signal(signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in events:
                    pass
            noticed = time.monotonic() - killed
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the engine restarted; retry" in failed.value.details()
            assert noticed < 2.0, f"the stream ended {noticed:.2f} s after the kill"
            assert await health_of(health) == [NOT_SERVING, NOT_SERVING]
            refused = await rpc_error(ask(stub, "And of Germany?", cid))
            assert refused.code() == grpc.StatusCode.UNAVAILABLE  # at once, not a hang
            back = await wait_health(health, SERVING, 30)
            print(f"engine killed: stream failed after {noticed * 1000:.0f} ms, SERVING again after "
                  f"{noticed + back:.1f} s")
            # Nothing half-written: the killed turn is not stored; the conversation goes on from its first turn.
            conv = await stub.GetConversation(pb.GetConversationRequest(id=cid))
            assert [m.content for m in conv.messages] == [FRANCE, first.text]
            second = await ask(stub, "And of Germany?", cid, max_tokens=24)
            assert "Berlin" in second.text
            metrics = generate_latest(running.metrics.registry).decode()
            assert "eoq_engine_restarts_total 1.0" in metrics.splitlines()
            assert "eoq_serving 1.0" in metrics.splitlines()
            assert running.engine.engine_pid != engine.pid


async def test_an_engine_that_dies_while_loading_fails_start_with_a_clear_message() -> None:
    checkpoint = resolve_checkpoint("default", model_cache_dir())
    engine = AsyncEngine(EngineConfig(checkpoint=checkpoint.path, model_name="default", kv_cache_memory_gb=0.1,
                                      max_model_len=2048))
    start = asyncio.get_running_loop().create_task(engine.start())
    deadline = time.monotonic() + 30
    while not engine_children():
        assert time.monotonic() < deadline, "no engine process started"
        await asyncio.sleep(0.01)
    engine_children()[0].send_signal(signal.SIGKILL)
    with pytest.raises(ConfigError, match="the engine process failed to start: it exited while loading"):
        await asyncio.wait_for(start, 10)  # never a hang


async def test_failing_steps_restart_the_engine() -> None:
    """MAX_FAILED_STEPS failed steps in a row (a broken device, say) fail their requests and then the engine
    itself (on a thread here: the same path as a process): it is restarted, and the new one serves."""
    checkpoint = resolve_checkpoint("default", model_cache_dir())
    engine = AsyncEngine(EngineConfig(checkpoint=checkpoint.path, model_name="default", kv_cache_memory_gb=0.1,
                                      max_model_len=2048), mode="thread")
    await engine.start()
    states: list[EngineState] = []
    engine.add_state_listener(states.append)
    broken = engine.core

    def fail(_sched):
        raise RuntimeError("device lost")

    broken.runner.execute = fail
    try:
        for i in range(MAX_FAILED_STEPS):
            with pytest.raises(Exception, match="device lost"):
                async for _ in engine.generate(EngineRequest(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=4))):
                    pass
        deadline = time.monotonic() + 30
        while engine.state is not EngineState.SERVING or engine.core is broken:
            assert time.monotonic() < deadline, f"not restarted: {states}"
            await asyncio.sleep(0.02)
        assert states == [EngineState.RESTARTING, EngineState.SERVING]
        outs = [o async for o in engine.generate(EngineRequest("after", [5, 6, 7], SamplingParams(max_tokens=4)))]
        assert outs[-1].finished and outs[-1].num_completion_tokens == 4
    finally:
        await engine.shutdown()


async def test_past_the_restart_budget_the_server_exits_nonzero(tmp_path: Path) -> None:
    async with eoq_serve(tmp_path, "--engine-max-restarts", "1") as served:
        served.engine().send_signal(signal.SIGKILL)
        await wait_health(served.health, NOT_SERVING, 2)
        # A restart reloads the model: seconds on an idle machine, much longer on a loaded one.
        await wait_health(served.health, SERVING, 120)
        assert "Paris" in (await ask(served.stub, FRANCE, max_tokens=24)).text
        served.engine().send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(served.proc.wait(), 120) == 1, served.log.read_text()[-3000:]
    assert "giving up" in served.log.read_text()


async def test_ctrl_c_drains_the_server_instead_of_killing_the_engine(tmp_path: Path) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C): the engine ignores it, the server drains — the
    streaming answer finishes — and everything exits 0."""
    async with eoq_serve(tmp_path, "--grace-period-seconds", "60", new_session=True) as served:
        engine = served.engine()
        call = served.stub.Chat(pb.ChatRequest(message=STORY, sampling=sampling(64, ignore_eos=True)))
        events, _ = await first_event(call)
        os.killpg(served.proc.pid, signal.SIGINT)
        rest = [e async for e in events]
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert await asyncio.wait_for(served.proc.wait(), 60) == 0, served.log.read_text()[-3000:]
        assert not engine.is_running()
    assert "exited unexpectedly" not in served.log.read_text()  # it stopped when told, not by the signal
