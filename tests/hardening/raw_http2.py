"""A raw HTTP/2 client for what no well-behaved gRPC client can send: a stream cut mid-message."""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events


def send_truncated_message(target: str, method: str, declared: int, sent: bytes) -> dict[str, str]:
    """Open a gRPC call, send a message prefix declaring `declared` bytes but only `sent`, end the
    stream, and return the trailers the server answers with (grpc-status, grpc-message)."""
    host, port = target.rsplit(":", 1)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (":method", "POST"), (":scheme", "http"), (":path", method),
                (":authority", target), ("content-type", "application/grpc"), ("te", "trailers"),
            ],
        )  # fmt: skip
        prefix = struct.pack(">?I", False, declared)  # not compressed, length
        connection.send_data(stream, prefix + sent, end_stream=True)
        sock.sendall(connection.data_to_send())
        answer: dict[str, str] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return answer
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer.update({k.decode(): v.decode() for k, v in event.headers})
                    if "grpc-status" in answer:
                        return answer
                elif isinstance(event, h2.events.StreamReset):
                    answer["reset"] = str(event.error_code)
                    return answer
            sock.sendall(connection.data_to_send())
