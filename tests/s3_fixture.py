"""A real S3 API server on loopback for tests: moto's server mode, never a mocked client.

``tests/conftest.py`` re-exports the session fixture ``s3_server``. Tests that use it carry ``@pytest.mark.s3``.
The server runs in a thread of the test process, bound to 127.0.0.1 on a port the OS picks; every request goes
through the real HTTP stack of botocore/aiobotocore/s3fs.

Outages: ``S3Server.stop()`` shuts the listener down, closes its socket (so new connections are refused at once
instead of hanging in the backlog) and cuts every accepted connection (so a request in flight, such as an
upload caught mid-body, fails as it would when a real endpoint goes away, instead of being finished by a
handler thread that outlives the listener). ``S3Server.start()`` brings it back on the same port.
moto keeps its buckets and objects in process-global backends, so everything stored before the outage is
still there afterwards. ``S3Server.outage()`` is a context manager around the pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from typing import Any, Iterator

import pytest

_FAKE_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Never read the developer's own profiles or credentials, never ask an instance-metadata endpoint.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET_ENV: tuple[str, ...] = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_LOOPBACK: str = "127.0.0.1"


class S3Server:
    """One moto S3 server on 127.0.0.1 with one bucket.

    Created and started by the ``s3_server`` fixture (once per session); tests read ``endpoint_url``,
    ``bucket`` and ``storage_options`` and call ``url(prefix)`` for a fresh prefix no other test uses.
    """

    def __init__(self, bucket: str = "ckpt-test") -> None:
        self.bucket: str = bucket
        self.port: int = 0  # 0 until the first start; then fixed, so a restart comes back at the same URL
        self._server: Any = None  # moto.server.ThreadedMotoServer while running
        self._client: Any = None  # boto3 client, built on first use
        self._connections: list[socket.socket] = []  # accepted client sockets, cut on stop()
        self._lock = threading.Lock()  # start/stop
        self._connections_lock = threading.Lock()  # never held while waiting on the server thread

    # -- addresses -----------------------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for ``open_storage``/``FsspecStorage``; a new dict each time, so callers may add keys."""
        return {
            "key": _FAKE_ENV["AWS_ACCESS_KEY_ID"],
            "secret": _FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": _FAKE_ENV["AWS_DEFAULT_REGION"]},
        }

    def url(self, prefix: str = "t") -> str:
        """A fresh ``s3://bucket/<prefix>-<uuid>`` URL under which nothing is stored yet."""
        return f"s3://{self.bucket}/{prefix}-{uuid.uuid4().hex}"

    def client(self) -> Any:
        """A plain boto3 S3 client on the server, for checks that must bypass the code under test.

        Built once (boto3 clients are thread-safe and slow to create); it survives restarts (same port).
        """
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=_FAKE_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=_FAKE_ENV["AWS_DEFAULT_REGION"],
        )

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start serving (again). The first start picks a free port; later starts reuse it."""
        from moto.server import ThreadedMotoServer

        with self._lock:
            if self._server is not None:
                return
            server = ThreadedMotoServer(ip_address=_LOOPBACK, port=self.port, verbose=False)
            server.start()
            self._track_connections(server)
            self.port = server.get_host_and_port()[1]
            self._server = server

    def _track_connections(self, server: Any) -> None:
        """Record every accepted connection so that ``stop`` can cut the ones still open.

        The werkzeug server behind moto handles each connection in a daemon thread that outlives
        ``shutdown()``; without cutting them a request in flight at the outage would still complete.
        Patching right after ``start()`` is safe: no client knows the port yet.
        """
        inner = server._server
        accept = inner.get_request

        def get_request() -> tuple[socket.socket, Any]:
            conn, addr = accept()
            with self._connections_lock:
                if len(self._connections) > 256:
                    self._connections = [c for c in self._connections if c.fileno() != -1]
                self._connections.append(conn)
            return conn, addr

        inner.get_request = get_request

    def open_connection_count(self) -> int:
        """Accepted connections not yet closed by the server (tests use it to wait for a request to arrive)."""
        with self._connections_lock:
            return sum(1 for c in self._connections if c.fileno() != -1)

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused until ``start()``."""
        with self._lock:
            server, self._server = self._server, None
            if server is None:
                return
            server.stop()
            # ThreadedMotoServer.stop() only ends serve_forever(); without closing the socket the kernel would
            # keep accepting connections that nobody serves, and clients would hang instead of failing.
            inner = getattr(server, "_server", None)
            if inner is not None:
                inner.server_close()
            with self._connections_lock:
                connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """``with s3_server.outage(): ...`` runs the body with the server down, then brings it back."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def create_bucket(self) -> None:
        self.client().create_bucket(Bucket=self.bucket)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Session-wide moto S3 server on 127.0.0.1 with fake credentials in the environment and one bucket.

    A test that stopped the server must not leave it stopped: the fixture restarts it if needed when a test
    asks for it again (see ``s3_server_running``).
    """
    mp = pytest.MonkeyPatch()
    for name, value in _FAKE_ENV.items():
        mp.setenv(name, value)
    for name in _UNSET_ENV:
        mp.delenv(name, raising=False)
    no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY", ""), _LOOPBACK, "localhost") if p)
    mp.setenv("NO_PROXY", no_proxy)
    mp.setenv("no_proxy", no_proxy)
    # moto's werkzeug server logs every request at INFO; that drowns the report of a failing test.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = S3Server()
    try:
        server.start()
        server.create_bucket()
        yield server
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_server_running(s3_server: S3Server) -> Iterator[S3Server]:
    """Function-scoped view of ``s3_server`` that guarantees it is up before and after the test."""
    s3_server.start()
    yield s3_server
    s3_server.start()
