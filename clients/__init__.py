"""eoq's sample clients (installed as ``eoq_clients``): ``eoq chat`` (``chat.py``: the streaming chat REPL and
one-shot client), ``eoq soak`` (``soak.py``) and the benchmark ``eoq bench`` (the package ``bench/``); what they
share (connection and TLS flags, channels, metadata) is in ``common.py``."""

# The ``eoq`` subcommands the clients add, each with the module whose ``add_parser(sub)`` registers it. ``eoq``
# imports such a module only when its subcommand is the one parsed (or ``eoq --help`` lists them all): ``eoq serve``
# imports none of them. A new client is a module here (or a package like ``bench/``) and a line in this table.
COMMANDS = {
    "chat": "eoq_clients.chat",
    "bench": "eoq_clients.bench.cli",
    "bench-trees": "eoq_clients.bench.trees",
    "bench-output": "eoq_clients.bench.output_control",
    "soak": "eoq_clients.soak",
}
