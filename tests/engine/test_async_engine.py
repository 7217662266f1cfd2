"""The asyncio front end, with the engine on a thread and in a process."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from eoq.engine.async_engine import AsyncEngine
from eoq.engine.types import EngineConfig, EngineRequest, FinishReason, SamplingParams
from eoq.errors import InvalidArgument, ResourceExhausted

from .test_fidelity import prompt_ids


def config(checkpoint, **overrides) -> EngineConfig:
    cfg = dict(checkpoint=checkpoint, model_name="tiny", dtype="float32", kv_cache_memory_gb=0.002,
               max_num_seqs=4, max_num_batched_tokens=128)
    cfg.update(overrides)
    return EngineConfig(**cfg)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], **sampling):
    outs = []
    async for out in engine.generate(EngineRequest(rid, prompt, SamplingParams(**sampling))):
        outs.append(out)
    return outs


@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_streams_concurrent_requests_to_the_end(tiny_llama, mode):
    engine = AsyncEngine(config(tiny_llama[0]), mode=mode)
    info = await engine.start()
    assert info.architecture == "llama" and info.context_length == 512
    try:
        results = await asyncio.gather(*(collect(engine, f"r{i}", prompt_ids(10 + i, seed=i), max_tokens=12,
                                                 ignore_eos=True) for i in range(6)))
        for outs in results:
            assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
            assert sum(len(o.token_ids) for o in outs) == 12
            assert outs[-1].timings.first_token >= outs[-1].timings.arrival
        assert engine.num_unfinished == 0
    finally:
        await engine.shutdown()


async def test_thread_and_process_modes_generate_the_same_tokens(tiny_llama):
    tokens = {}
    for mode in ("thread", "process"):
        engine = AsyncEngine(config(tiny_llama[0]), mode=mode)
        await engine.start()
        try:
            outs = await collect(engine, "x", prompt_ids(33, seed=4), max_tokens=20, ignore_eos=True)
            tokens[mode] = [t for o in outs for t in o.token_ids]
        finally:
            await engine.shutdown()
    assert tokens["thread"] == tokens["process"] and len(tokens["thread"]) == 20


async def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(tiny_llama):
    engine = AsyncEngine(config(tiny_llama[0]), mode="thread")
    await engine.start()
    try:
        blocks = engine.core.scheduler.blocks
        stream = engine.generate(EngineRequest("long", prompt_ids(40), SamplingParams(max_tokens=400, ignore_eos=True)))
        async with aclosing(stream) as it:
            async for out in it:
                if out.token_ids:
                    break  # the client goes away mid-answer
        for _ in range(100):
            if not engine.core.requests:
                break
            await asyncio.sleep(0.01)
        assert not engine.core.requests
        assert blocks.num_used_blocks == 0
    finally:
        await engine.shutdown()


async def test_prompt_beyond_the_context_is_refused_not_cut(tiny_llama):
    engine = AsyncEngine(config(tiny_llama[0]), mode="thread")
    await engine.start()
    try:
        with pytest.raises(InvalidArgument, match="beyond the context window of 512"):
            await collect(engine, "big", prompt_ids(500), max_tokens=20)
        with pytest.raises(InvalidArgument, match="empty"):
            await collect(engine, "empty", [], max_tokens=5)
    finally:
        await engine.shutdown()


async def test_full_queue_is_refused_at_once(tiny_llama):
    engine = AsyncEngine(config(tiny_llama[0], max_num_seqs=1), mode="thread", max_queue_size=1)
    await engine.start()
    try:
        streams = [engine.generate(EngineRequest(f"s{i}", prompt_ids(8, seed=i),
                                                 SamplingParams(max_tokens=300, ignore_eos=True))) for i in range(2)]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.gather(*firsts)
        with pytest.raises(ResourceExhausted, match="full"):
            await collect(engine, "third", prompt_ids(8), max_tokens=5)
        for s in streams:
            await s.aclose()
    finally:
        await engine.shutdown()
