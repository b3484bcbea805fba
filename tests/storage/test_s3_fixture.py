"""The moto fixture itself: a real server on 127.0.0.1 whose outages also cut requests in flight."""

from __future__ import annotations

import socket
import time

import pytest

from tests.s3_fixture import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.timeout(60)]


def test_server_is_real_http_on_loopback(s3_server_running: S3Server) -> None:
    assert s3_server_running.endpoint_url.startswith("http://127.0.0.1:")
    names = [b["Name"] for b in s3_server_running.client().list_buckets()["Buckets"]]
    assert s3_server_running.bucket in names
    url = s3_server_running.url("p")
    assert url.startswith(f"s3://{s3_server_running.bucket}/p-") and url != s3_server_running.url("p")


def test_stop_cuts_requests_in_flight_and_start_restores_state(s3_server_running: S3Server) -> None:
    server = s3_server_running
    server.client().put_object(Bucket=server.bucket, Key="fixture-probe", Body=b"still here")
    port = server.port
    # An upload caught mid-body by the outage: headers and 10 of 1000 body bytes sent, then the server stops.
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"PUT /{server.bucket}/half HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
    deadline = time.monotonic() + 5
    while server.open_connection_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()
    assert not server.running
    try:
        sock.sendall(b"x" * 990)
        answer = sock.recv(100)
    except OSError:
        answer = b""
    finally:
        sock.close()
    assert answer == b"", f"the server still answered a request that was in flight at the outage: {answer!r}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    server.start()
    assert server.port == port
    body = server.client().get_object(Bucket=server.bucket, Key="fixture-probe")["Body"].read()
    assert body == b"still here"
