"""The benchmark, ``eoq bench`` (imported as ``eoq_clients.bench``); the workloads it runs: ``WORKLOADS.md`` here.

``cli.py``: the command's flags and the run (targets started, workloads interleaved); ``workloads.py``: the
workloads and the figures computed from what a client saw; ``targets.py``: what is measured (an eoq server,
eoq's engine in this process); ``peers.py``: transformers and llama.cpp in child processes; ``report.py``: tables,
``results.json`` and plots. A new workload goes in ``workloads.py`` (and ``WORKLOADS.md``), a new target in
``targets.py`` or ``peers.py`` and ``cli.TARGETS``.

Nothing is imported here: ``eoq`` imports ``cli`` only when ``eoq bench`` is the command parsed.
"""
