"""eoq: a chat-serving microservice with its own decoder, paged KV cache and continuous batching."""

__version__ = "0.1.0"
