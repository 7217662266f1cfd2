"""The decoder engine: model, paged KV cache, continuous-batching scheduler, runner, sampler, detokenizer."""
