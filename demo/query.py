"""Query the search service from the command line and print the matches as a table.

python -m demo.query --image photo.jpg [--top-k 5] [--filter articleType=Dresses]
python -m demo.query --text "red striped t-shirt"
python -m demo.query --id 10042
python -m demo.query --id 10042 --tls-ca ca.pem --auth-token-file token   # a secured service
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

from vpm.v1 import search_pb2
from vpm_common.search_client import SearchClient
from vpm_common.security import PLAINTEXT, ClientSecurity


def search(
    target: str,
    request: search_pb2.SearchRequest,
    timeout_s: float = 30,
    security: ClientSecurity = PLAINTEXT,
) -> search_pb2.SearchResponse:
    """One Search call (grpc.RpcError when it fails), through the one search client."""

    async def call() -> search_pb2.SearchResponse:
        client = SearchClient(target, timeout_s, security)
        try:
            return await client.search(request)
        finally:
            await client.close()

    return asyncio.run(call())


def filter_term(text: str) -> tuple[str, str]:
    field, equals, value = text.partition("=")
    if not equals or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, e.g. gender=Women; got {text!r}")
    return field, value


def table(response: search_pb2.SearchResponse) -> str:
    header = f"{'#':>2}  {'score':>6}  {'id':<10} {'article type':<14} {'colour':<10} name"
    lines = [header, "-" * len(header)]
    for rank, match in enumerate(response.matches, 1):
        product = match.product
        kind = product.article_type or product.category
        lines.append(
            f"{rank:>2}  {match.score:6.3f}  {product.id:<10} {kind:<14} "
            f"{product.base_colour:<10} {product.name}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.query", description="Search the catalog.")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=Path, help="an image file")
    query.add_argument("--text", help="a few words")
    query.add_argument("--id", help="a product id: products like it")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument(
        "--filter", action="append", default=[], type=filter_term, metavar="FIELD=VALUE"
    )
    parser.add_argument("--search", default="127.0.0.1:50052", help="the search service, host:port")
    parser.add_argument("--tls", action="store_true", help="TLS, trusting the system's roots")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the service's certificate (TLS)")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--auth-token-file", type=Path, help="file holding the bearer token")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    try:
        security = ClientSecurity.load(
            tls=args.tls,
            ca=args.tls_ca,
            cert=args.tls_cert,
            key=args.tls_key,
            token_file=args.auth_token_file,
        )
    except (OSError, ValueError) as error:
        parser.error(f"cannot read the TLS or token files: {error}")
    request = search_pb2.SearchRequest(top_k=args.top_k, filters=dict(args.filter))
    if args.image:
        try:
            request.image = args.image.read_bytes()
        except OSError as error:
            parser.error(f"--image: cannot read {args.image}: {error.strerror}")
    elif args.text:
        request.text = args.text
    else:
        request.product_id = args.id
    try:
        response = search(args.search, request, security=security)
    except grpc.RpcError as error:
        print(f"search failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(table(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
