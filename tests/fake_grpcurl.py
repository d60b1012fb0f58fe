"""A fake of grpcurl (github.com/fullstorydev/grpcurl), which cannot be installed here.

It does what the README's grpcurl lines need, the way grpcurl does it: the contract
from the server's reflection service alone (no generated code of ours), the request
from `-d` JSON in protobuf's JSON mapping, each reply printed as JSON, an error status
printed and exit status 1. Forms: `grpcurl -plaintext [-d JSON] HOST:PORT list
SERVICE` and `grpcurl -plaintext [-d JSON] HOST:PORT SERVICE/METHOD`.

FAKE_GRPCURL_TARGETS="127.0.0.1:50052=127.0.0.1:41234,..." sends the calls the
README addresses to one port to another (the test's servers run on free ports).
"""

from __future__ import annotations

import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main(argv: list[str]) -> int:
    body, words = "{}", []
    args = iter(argv)
    for arg in args:
        if arg == "-plaintext":
            continue
        if arg == "-d":
            body = next(args)
        elif arg.startswith("-"):
            print(f"fake grpcurl: unsupported flag {arg}", file=sys.stderr)
            return 2
        else:
            words.append(arg)
    address, *rest = words
    redirects = dict(
        pair.split("=", 1) for pair in os.environ.get("FAKE_GRPCURL_TARGETS", "").split(",") if pair
    )
    with grpc.insecure_channel(redirects.get(address, address)) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        if rest[0] == "list":
            for method in pool.FindServiceByName(rest[1]).methods:
                print(method.full_name)
            return 0
        service_name, method_name = rest[0].rsplit("/", 1)
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(body, request_class())
        ways = {False: "unary", True: "stream"}
        kind = f"{ways[method.client_streaming]}_{ways[method.server_streaming]}"
        call = getattr(channel, kind)(
            f"/{service_name}/{method_name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=reply_class.FromString,
        )
        try:
            reply = call(iter([request]) if method.client_streaming else request, timeout=60)
            for message in reply if method.server_streaming else [reply]:
                print(json_format.MessageToJson(message))
        except grpc.RpcError as error:
            print(f"ERROR:\n  Code: {error.code().name}\n  Message: {error.details()}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
