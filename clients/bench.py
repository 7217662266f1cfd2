"""``eoq bench``: the benchmark workloads against a server (placeholder until the benchmark lands)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark workloads against a server")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("eoq bench: not implemented yet")
