"""``eoq bench-output``: what structured output and ``n`` cost, measured against a running server.

1. **Constraints at 32 streams.** ``--requests`` Complete requests, ``--concurrency`` at a time, forced to
   ``--max-tokens`` tokens each... except that a constrained answer ends where its schema is complete, so the
   figure is aggregate generated tokens per second: all unconstrained, all JSON-schema, and half and half.
2. **Grammar compile time.** The test schemas' build-and-compile cost as the server pays it (xgrammar, one
   thread): each schema cold, then cached.
3. **n = 4 against four requests.** One request for four answers vs four requests at once for the same prompt
   (prefix caching on): wall time, and the KV blocks held at the peak (``eoq_kv_cache_usage_ratio`` sampled
   from ``--metrics-url`` while they run).

Prints one JSON object (and a table on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request

import grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                      "country": {"enum": ["France", "Germany", "Italy"]},
                                      "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "country", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "address": {"type": "object", "properties": {
                                          "street": {"type": "string", "maxLength": 40},
                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                          "required": ["street", "zip"], "additionalProperties": False}},
     "required": ["name", "age", "address"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                               "maxItems": 6}, "ok": {"type": "boolean"}},
     "required": ["tags", "ok"], "additionalProperties": False},
]
PROMPT = "Describe a city you like, with details.<EOQ>"


def add_parser(sub) -> None:
    p = sub.add_parser("bench-output", help="benchmark structured output and n on a server")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--metrics-url", default="http://localhost:9090/metrics")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tokenizer", default="", help="checkpoint folder for the compile timing (default: the "
                   "default model's cache)")
    p.set_defaults(func=run)


def _sampling(i: int, constrained: bool, max_tokens: int) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i)
    if constrained:
        s.json_schema = json.dumps(SCHEMAS[i % len(SCHEMAS)])
    else:
        s.ignore_eos = True  # the unconstrained rows run to max_tokens: a steady batch
    return s


async def _complete(stub, prompt: str, sampling: pb.SamplingParams, gaps: list[float] | None = None) -> int:
    """The answer's token count; ``gaps`` gets the times between its events (after the first)."""
    tokens = 0
    last = None
    async for e in stub.Complete(pb.CompleteRequest(prompt=prompt, sampling=sampling)):
        now = time.perf_counter()
        if last is not None and gaps is not None and e.token_ids:
            gaps.append(now - last)
        last = now
        tokens += len(e.token_ids)
    return tokens


async def _mix(stub, n: int, concurrency: int, share: float, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    gaps: list[float] = []

    async def one(i: int) -> int:
        async with sem:
            return await _complete(stub, PROMPT, _sampling(i, (i % 100) < share * 100, max_tokens), gaps)

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
    wall = time.perf_counter() - t0
    gaps.sort()
    return {"constrained_share": share, "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_second": round(tokens / wall, 1),
            # the step time every stream sees: what a constraint costs, free of how soon its answers end
            "itl_p50_ms": round(gaps[len(gaps) // 2] * 1e3, 1) if gaps else None}


def _kv_usage(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("eoq_kv_cache_usage_ratio"))


async def _peak_usage(url: str, work) -> tuple[object, float]:
    peak = 0.0
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, await asyncio.to_thread(_kv_usage, url))
        await asyncio.sleep(0.02)
    return task.result(), peak


async def _fan_out(stub, url: str, max_tokens: int) -> dict:
    prompt = "Write a short story about a lighthouse keeper and the sea, in three sentences. " * 6 + "<EOQ>"
    out = {}
    for kind in ("n=4", "4 requests"):
        t0 = time.perf_counter()
        if kind == "n=4":
            s = pb.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, ignore_eos=True, n=4)
            work = _complete(stub, prompt, s)
        else:
            work = asyncio.gather(*(_complete(stub, prompt, pb.SamplingParams(
                max_tokens=max_tokens, temperature=1.0, seed=1 + i, ignore_eos=True)) for i in range(4)))
        _, peak = await _peak_usage(url, work)
        out[kind] = {"seconds": round(time.perf_counter() - t0, 2), "peak_kv_usage": peak}
    return out


def _compile_times(tokenizer_dir: str) -> list[dict]:
    import xgrammar as xgr

    from eoq.engine.model.checkpoint import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
    rows = []
    for i, schema in enumerate(SCHEMAS):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            compiler.compile_json_schema(json.dumps(schema), strict_mode=True, any_whitespace=False)
            times.append(time.perf_counter() - t0)
        rows.append({"schema": i, "cold_ms": round(times[0] * 1e3, 2), "cached_ms": round(times[1] * 1e3, 3)})
    return rows


async def _main(args) -> dict:
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await _complete(stub, PROMPT, _sampling(0, True, 8))  # warm: xgrammar loaded, tokenizer info built
        mixes = [await _mix(stub, args.requests, args.concurrency, share, args.max_tokens)
                 for share in (0.0, 1.0, 0.5)]
        fan = await _fan_out(stub, args.metrics_url, args.max_tokens)
    return {"mixes": mixes, "fan_out": fan}


def run(args) -> int:
    result = asyncio.run(_main(args))
    tokenizer = args.tokenizer
    if not tokenizer:
        from eoq.config import default_cache_dir
        tokenizer = str(next((default_cache_dir() / "models").glob("SmolLM2-135M-Instruct*")))
    result["compile"] = _compile_times(tokenizer)
    print(json.dumps(result, indent=1))
    base = result["mixes"][0]["tokens_per_second"]
    base_itl = result["mixes"][0]["itl_p50_ms"]
    for m in result["mixes"]:
        print(f"constrained {m['constrained_share']:.0%}: {m['tokens_per_second']} tok/s "
              f"({m['tokens_per_second'] / base:.2f}x unconstrained), ITL p50 {m['itl_p50_ms']} ms "
              f"({m['itl_p50_ms'] / base_itl:.2f}x)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    ns = parser.parse_args(["bench-output", *sys.argv[1:]])
    sys.exit(ns.func(ns))
