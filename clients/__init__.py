"""eoq's sample clients: the streaming chat REPL / one-shot client and the benchmark (installed as ``eoq_clients``)."""
