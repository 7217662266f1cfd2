"""The ``eoq`` command: serve, chat, bench, soak, prepare, health.

``eoq serve`` takes a flag for every setting (``--kv-cache-memory-gb``, ...); each is also the environment
variable ``EOQ_<NAME>``. ``eoq chat``, ``eoq bench`` and ``eoq soak`` are the sample clients in ``clients/``
(``eoq_clients``), registered from its ``COMMANDS`` table and imported only when they are the command parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
import types
import typing
from pathlib import Path

from eoq.errors import ConfigError


def _flag_type(annotation):
    """argparse type for a settings field annotation (Optional[...] unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str
    return annotation if annotation in (int, float, str, Path) else str


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from eoq.config import Settings

    hints = typing.get_type_hints(Settings)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%") + f" [env EOQ_{name.upper()}]"  # argparse formats help
        annotation = hints[name]
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kwargs: dict = {"dest": name, "default": None, "help": help_text, "type": _flag_type(annotation)}
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        parser.add_argument(flag, **kwargs)


def _settings_from(args: argparse.Namespace):
    from eoq.config import Settings, load_settings

    return load_settings(**{k: getattr(args, k) for k in Settings.model_fields if hasattr(args, k)})


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    _setup_logging(settings.log_level)
    from eoq.api.server import serve

    return asyncio.run(serve(settings))


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert the model (e.g. the default GGUF file) into the cached checkpoint now, not at the first start."""
    settings = _settings_from(args)
    _setup_logging(settings.log_level)
    from eoq.engine.model.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(settings.model, settings.cache_dir)
    print(checkpoint.path)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server's gRPC health service says SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from eoq_clients.common import TransportSecurity, open_channel

    try:
        with open_channel(args.address, TransportSecurity.from_args(args)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


class _LazySubcommands(argparse._SubParsersAction):
    """Subcommands registered by name, whose module's ``add_parser(sub)`` runs only once that subcommand is the one
    parsed, or when the top-level help lists every subcommand: ``eoq serve`` does not import the clients."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._modules: dict[str, str] = {}  # subcommand -> module not imported yet

    def add_lazy(self, name: str, module: str) -> None:
        self.add_parser(name)  # a placeholder, so that the name is a valid choice
        self._modules[name] = module

    def _load(self, name: str) -> None:
        module = self._modules.pop(name, None)
        if module is not None:
            del self._name_parser_map[name]  # the module registers the real parser under the same name
            importlib.import_module(module).add_parser(self)

    def _get_subactions(self):  # what the help formatter lists
        for name in list(self._modules):
            self._load(name)
        return super()._get_subactions()

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        self._load(values[0])
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eoq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, action=_LazySubcommands)

    serve = sub.add_parser("serve", help="run the gRPC server (flags or EOQ_* environment variables)")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    prepare = sub.add_parser("prepare", help="convert the model into the cached checkpoint ahead of the first start")
    add_settings_flags(prepare)
    prepare.set_defaults(func=cmd_prepare)

    health = sub.add_parser("health", help="check a server's gRPC health service (exit 0 = SERVING)")
    health.add_argument("--address", default="localhost:50051")
    health.add_argument("--service", default="", help="'' = the whole server")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_health)

    from eoq_clients import COMMANDS
    from eoq_clients.common import add_tls_flags

    add_tls_flags(health)

    for name, module in COMMANDS.items():
        sub.add_lazy(name, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"eoq: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
