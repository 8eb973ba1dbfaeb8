"""Is a Kafka broker answering? One ApiVersions v0 request over a plain socket, without a Kafka client library.

`daemon.kafka_local` waits for a broker it started with `probe`; the request and response codecs are separate so
that their tests need no socket.
"""

from __future__ import annotations

import os
import socket
import struct

_API_VERSIONS_KEY = 18
_CLIENT_ID = b"orderbus-kafka-local"


def encode_api_versions_request(correlation_id: int) -> bytes:
    """A size-prefixed ApiVersions v0 request (request header v1: key, version, correlation id, client id)."""
    header = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(_CLIENT_ID)) + _CLIENT_ID
    return struct.pack(">i", len(header)) + header


def decode_api_versions_response(payload: bytes, correlation_id: int) -> int:
    """The error code of an ApiVersions v0 response (without its size prefix); ValueError if malformed."""
    if len(payload) < 6:
        raise ValueError(f"ApiVersions response too short: {len(payload)} bytes")
    got_id, error_code = struct.unpack_from(">ih", payload)
    if got_id != correlation_id:
        raise ValueError(f"correlation id {got_id} does not match the request's {correlation_id}")
    if error_code == 0:
        (count,) = struct.unpack_from(">i", payload, 6) if len(payload) >= 10 else (-1,)
        if count <= 0 or len(payload) < 10 + 6 * count:
            raise ValueError("ApiVersions response has no valid api_keys array")
    return int(error_code)


def probe(port: int, *, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether a Kafka broker on host:port answers an ApiVersions request without error."""
    correlation_id = int.from_bytes(os.urandom(3), "big")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(encode_api_versions_request(correlation_id))
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 0 < size <= 1 << 20:
                return False
            return decode_api_versions_response(_recv_exact(sock, size), correlation_id) == 0
    except (OSError, ValueError):
        return False


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return bytes(data)


__all__ = ["decode_api_versions_response", "encode_api_versions_request", "probe"]
