"""The daemon's wire protocol: length-prefixed JSON over a Unix socket, every message size-limited and validated.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON, one object. A request is
``{"op": NAME, ...fields}``; the reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``. ``validate``
checks a request against ``OPS``: the op is known, every field has its type and bounds, no field is unknown.
Names from clients (run, shard) are data, never paths: the daemon keys by them and names its files itself
(``seg-<16 hex>``), so a client cannot make the daemon open, create or delete a path of its choosing.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from typing import Any

from ckpt.errors import DaemonProtocolError

VERSION = 1
HEADER = struct.Struct(">I")
#: Largest frame either side accepts (a seal's metadata is the largest message: a rank's chunk list).
MAX_MESSAGE_BYTES = 16 * 2**20
MAX_NAME_CHARS = 1024
MAX_INT = 2**62
SEGMENT_NAME = re.compile(r"^seg-[0-9a-f]{16}$")

#: op -> field -> kind. Kinds: ``name`` (non-empty text, no NUL, at most MAX_NAME_CHARS), ``int`` (0..MAX_INT),
#: ``pos`` (1..MAX_INT), ``segment`` (a daemon-made segment name), ``object`` (a JSON object), ``bool``.
OPS: dict[str, dict[str, str]] = {
    "hello": {"client": "name", "pid": "pos"},
    "status": {},
    "alloc": {"run": "name", "shard": "name", "nbytes": "pos"},
    "begin": {"segment": "segment", "step": "int"},
    "seal": {"segment": "segment", "step": "int", "world": "pos", "meta": "object"},
    "free": {"segment": "segment"},
    "list": {"run": "name"},
    "open": {"run": "name", "step": "int", "shard": "name"},
    "stop": {},
}
#: op -> field -> kind of the fields a request may leave out (the daemon's default applies).
#: ``alloc``'s ``reserve`` (default true): the daemon reserves the segment's memory before it replies; false leaves
#: that to the client (``DaemonAllocator.reserve``, off the training thread) before it writes a byte.
OPTIONAL: dict[str, dict[str, str]] = {
    "alloc": {"reserve": "bool"},
}


def _check_field(where: str, name: str, kind: str, value: Any) -> None:
    def bad(expected: str) -> DaemonProtocolError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return DaemonProtocolError(f"{where}: field {name!r} must be {expected}, found {shown}")

    if kind == "name":
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or "\x00" in value:
            raise bad(f"a non-empty string of at most {MAX_NAME_CHARS} characters without NUL")
    elif kind in ("int", "pos"):
        low = 1 if kind == "pos" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_INT:
            raise bad(f"an integer from {low} to 2**62")
    elif kind == "segment":
        if not isinstance(value, str) or not SEGMENT_NAME.match(value):
            raise bad("a segment name the daemon gave out (seg-<16 hex digits>)")
    elif kind == "object":
        if not isinstance(value, dict):
            raise bad("a JSON object")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    else:  # pragma: no cover - OPS is static
        raise AssertionError(kind)


def validate(msg: Any) -> dict[str, Any]:
    """``msg`` if it is a well-formed request, else ``DaemonProtocolError`` saying what is wrong."""
    if not isinstance(msg, dict):
        raise DaemonProtocolError(f"a request must be a JSON object, found {type(msg).__name__}")
    op = msg.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise DaemonProtocolError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    fields, optional = OPS[op], OPTIONAL.get(op, {})
    extra = sorted(set(msg) - set(fields) - set(optional) - {"op"})
    if extra:
        raise DaemonProtocolError(f"op {op!r}: unknown fields {extra}; it takes {sorted([*fields, *optional])}")
    for name, kind in fields.items():
        if name not in msg:
            raise DaemonProtocolError(f"op {op!r}: missing field {name!r}")
        _check_field(f"op {op!r}", name, kind, msg[name])
    for name, kind in optional.items():
        if name in msg:
            _check_field(f"op {op!r}", name, kind, msg[name])
    return msg


#: op -> reply field -> kind, for the replies a client acts on (more fields may come: replies can grow). A reply
#: never names a path: the client makes a segment's path itself from its validated name (``DIR/segments/NAME``).
REPLIES: dict[str, dict[str, str]] = {
    "hello": {"daemon_pid": "pos", "version": "int"},
    "alloc": {"segment": "segment", "nbytes": "pos"},
    "list": {"steps": "steps"},
    "open": {"segment": "segment", "nbytes": "int", "world": "pos", "meta": "object"},
}


def validate_reply(op: str, reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` (``ok`` true) if its fields for ``op`` are present and well-typed, else ``DaemonProtocolError``
    naming the field, what was expected and what was found."""
    for name, kind in REPLIES.get(op, {}).items():
        if name not in reply:
            raise DaemonProtocolError(f"reply to {op!r}: missing field {name!r}")
        if kind == "steps":
            _check_steps(op, reply[name])
        else:
            _check_field(f"reply to {op!r}", name, kind, reply[name])
    return reply


def _check_steps(op: str, steps: Any) -> None:
    """``list``'s ``steps``: step (decimal text) -> {world, complete, shards: shard name -> bytes}."""
    where = f"reply to {op!r}: field 'steps'"
    if not isinstance(steps, dict):
        raise DaemonProtocolError(f"{where} must be a JSON object, found {type(steps).__name__}")
    for key, e in steps.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 19):
            raise DaemonProtocolError(f"{where}: step {key!r} is not a decimal step number")
        if not (isinstance(e, dict) and isinstance(e.get("complete"), bool) and isinstance(e.get("shards"), dict)):
            raise DaemonProtocolError(f"{where}: step {key}: expected {{'complete': bool, 'shards': {{...}}, ...}}, "
                                      f"found {str(e)[:80]}")
        for shard, nbytes in e["shards"].items():
            _check_field(f"reply to {op!r}", f"steps/{key}/shards key", "name", shard)
            _check_field(f"reply to {op!r}", f"steps/{key}/shards/{shard}", "int", nbytes)


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


#: Reply ``kind`` of an error -> the exception the client raises (``DaemonError`` for any other).
ERROR_KINDS = ("budget", "protocol", "error")


def error_kind(e: Exception) -> str:
    from ckpt.errors import DaemonBudgetError  # noqa: PLC0415

    if isinstance(e, DaemonBudgetError):
        return "budget"
    return "protocol" if isinstance(e, DaemonProtocolError) else "error"


def encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise DaemonProtocolError(f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return HEADER.pack(len(data)) + data


def send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(encode(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(n - got, 1 << 20))
        if not part:
            if got == 0:
                return None
            raise DaemonProtocolError(f"connection closed inside a frame ({got} of {n} bytes)")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class FramingError(DaemonProtocolError):
    """The stream cannot be read further (a bad length or a cut frame): the connection must close."""


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next decoded message (a JSON object), None at a clean end of stream. ``FramingError`` when the length is over the limit
    or the stream ends inside a frame; ``DaemonProtocolError`` when the frame is not a UTF-8 JSON object (the stream
    can go on after that)."""
    try:
        head = _recv_exact(sock, HEADER.size)
    except DaemonProtocolError as e:
        raise FramingError(str(e)) from None
    if head is None:
        return None
    (n,) = HEADER.unpack(head)
    if n > MAX_MESSAGE_BYTES:
        raise FramingError(f"frame length {n} exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        body = _recv_exact(sock, n) if n else b""
    except DaemonProtocolError as e:
        raise FramingError(str(e)) from None
    if body is None:
        raise FramingError(f"connection closed before a frame of {n} bytes")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DaemonProtocolError(f"frame of {n} bytes is not UTF-8 JSON: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(obj, dict):
        raise DaemonProtocolError(f"a message must be a JSON object, found {type(obj).__name__}")
    return obj
