"""The OpenAI-compatible HTTP API: routes (``app``), request and response shapes (``schemas``), errors in OpenAI's
shape (``errors``), server-sent events (``sse``) and the uvicorn server on the gRPC server's loop (``server``)."""
