"""What the sample clients share: the channel, auth metadata and conversation-id routing metadata."""

from __future__ import annotations

import argparse
import os

import grpc

from eoq._proto.chat.v1 import chat_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("EOQ_ADDRESS", DEFAULT_ADDRESS),
                        help=f"server host:port [env EOQ_ADDRESS, default {DEFAULT_ADDRESS}]")
    parser.add_argument("--api-key", default=os.environ.get("EOQ_API_KEY"),
                        help="API key, sent as 'authorization: Bearer <key>' [env EOQ_API_KEY]")


def metadata(api_key: str | None, conversation_id: str = "") -> list[tuple[str, str]]:
    """Call metadata: the API key, and the conversation id for load balancers that hash on it."""
    md = []
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    if conversation_id:
        md.append(("x-conversation-id", conversation_id))
    return md


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]


def aio_stub(address: str) -> tuple[grpc.aio.Channel, chat_pb2_grpc.ChatServiceStub]:
    channel = grpc.aio.insecure_channel(address, options=channel_options())
    return channel, chat_pb2_grpc.ChatServiceStub(channel)


def sync_stub(address: str) -> tuple[grpc.Channel, chat_pb2_grpc.ChatServiceStub]:
    channel = grpc.insecure_channel(address, options=channel_options())
    return channel, chat_pb2_grpc.ChatServiceStub(channel)
