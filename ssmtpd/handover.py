"""What the master of --workers hands each worker it starts: settings and certificate, as data.

A worker takes the master's settings and certificate rather than reading the
configuration and the certificate itself: after --user it may not be allowed
to read them (a key only root may read), and a worker started later must not
run on a configuration edited since.

The hand-over is JSON, parsed field by field into the types Settings holds,
so whatever it says can only ever be a setting, never code.  It lives in a
memfd (memfd_create(2)) that nothing touches on disk, sealed against every
change (F_SEAL_WRITE, F_SEAL_GROW, F_SEAL_SHRINK and F_SEAL_SEAL, see
fcntl(2)) before any worker exists, and opened read-only; a worker refuses
one without those seals.  The worker does not inherit the memfd itself: it
gets it through a socket pair (unix(7), SCM_RIGHTS) once it has made itself
non-dumpable, so no other process of the user can open it through
/proc/<worker>/fd while the worker starts.
"""

import base64
import fcntl
import ipaddress
import json
import math
import os
import socket
from dataclasses import fields
from typing import Any, Callable, Dict, Optional, Tuple

from ssmtpd.config import Settings
from ssmtpd.privileges import Identity

FORMAT = 1
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
# Settings and a certificate chain are a few KiB: more is not a hand-over.
MAX_SIZE = 1 << 22
MEMFD_NAME = "ssmtpd-worker-state"
_MESSAGE = b"ssmtpd-state"
RECEIVE_TIMEOUT = 5.0

Pem = Tuple[bytes, bytes]


class HandoverError(Exception):
    """The hand-over is missing, not sealed, or not what a master writes."""


# --- the data ---------------------------------------------------------------------

def _kind(check: Callable[[Any], bool], what: str):
    def convert(value):
        if not check(value):
            raise ValueError(f"not {what}: {value!r}")
        return value
    return convert


def _optional(convert):
    return lambda value: None if value is None else convert(value)


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _strings(value) -> Tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not a list of strings: {value!r}")
    return tuple(value)


def _networks(value) -> Tuple[Any, ...]:
    return tuple(ipaddress.ip_network(text) for text in _strings(value))


def _host_port(value) -> Tuple[str, int]:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and _is_int(value[1])):
        raise ValueError(f"not [host, port]: {value!r}")
    return value[0], value[1]


def _identity(value) -> Identity:
    if not isinstance(value, dict) or set(value) != {"user", "uid", "group", "gid"}:
        raise ValueError(f"not a user and group: {value!r}")
    user, uid, group, gid = (value[k] for k in ("user", "uid", "group", "gid"))
    if not (isinstance(user, str) and isinstance(group, str) and _is_int(uid)
            and _is_int(gid)):
        raise ValueError(f"not a user and group: {value!r}")
    return Identity(user, uid, group, gid)


def _rates(value) -> Tuple[Tuple[int, float], ...]:
    """RATE values (config._rate): [[count, seconds], ...]."""
    if not isinstance(value, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 1
            for pair in value):
        raise ValueError(f"not a list of [count, seconds]: {value!r}")
    return tuple((count, _number(seconds)) for count, seconds in value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_STR = _kind(lambda v: isinstance(v, str), "a string")
_INT = _kind(_is_int, "a whole number")
_BOOL = _kind(lambda v: isinstance(v, bool), "true or false")

# How each annotation of Settings is read back; a field of another type must
# be added here (encode() refuses what it cannot write).
_BY_TYPE: Dict[Any, Callable[[Any], Any]] = {
    str: _STR, Optional[str]: _optional(_STR),
    int: _INT, Optional[int]: _optional(_INT),
    float: _number, bool: _BOOL,
    Tuple[str, ...]: _strings, Optional[Tuple[str, ...]]: _optional(_strings),
    Tuple[Tuple[int, float], ...]: _rates,
}
_BY_NAME: Dict[str, Callable[[Any], Any]] = {
    "proxy_trusted": _networks,
    "metrics_bind": _optional(_host_port),
    "identity": _optional(_identity),
}


def _reader(field) -> Callable[[Any], Any]:
    reader = _BY_NAME.get(field.name) or _BY_TYPE.get(field.type)
    if reader is None:
        raise TypeError(f"Settings.{field.name}: no hand-over for {field.type}")
    return reader


def _plain(name: str, value):
    if name == "proxy_trusted":
        return [str(network) for network in value]
    if name == "identity" and value is not None:
        return {"user": value.user, "uid": value.uid, "group": value.group, "gid": value.gid}
    return list(value) if isinstance(value, tuple) else value


def encode(settings: Settings, pem: Pem) -> bytes:
    """The hand-over of `settings` and the (certificate, key) PEM pair."""
    values = {}
    for field in fields(Settings):
        _reader(field)
        values[field.name] = _plain(field.name, getattr(settings, field.name))
    document = {"format": FORMAT, "settings": values,
                "certificate": base64.b64encode(pem[0]).decode("ascii"),
                "key": base64.b64encode(pem[1]).decode("ascii")}
    return json.dumps(document, allow_nan=False).encode("utf-8")


def _refuse_constant(name):
    raise ValueError(f"{name} is not a value")


def decode(blob: bytes) -> Tuple[Settings, Pem]:
    """(settings, (certificate PEM, key PEM)) from encode()'s output; raises HandoverError."""
    try:
        document = json.loads(blob.decode("utf-8"), parse_constant=_refuse_constant)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("not a hand-over of this version of ssmtpd")
        if set(document) != {"format", "settings", "certificate", "key"}:
            raise ValueError(f"unexpected fields {sorted(document)}")
        raw = document["settings"]
        expected = {field.name: field for field in fields(Settings)}
        if not isinstance(raw, dict) or set(raw) != set(expected):
            raise ValueError("the settings are not those of this version of ssmtpd")
        values = {}
        for name, field in expected.items():
            try:
                values[name] = _reader(field)(raw[name])
            except (ValueError, TypeError) as e:
                raise ValueError(f"{name}: {e}") from None
        pem = tuple(base64.b64decode(_STR(document[k]), validate=True)
                    for k in ("certificate", "key"))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise HandoverError(f"worker state: {e}") from None
    return Settings(**values), pem


# --- the memfd --------------------------------------------------------------------

def seal(blob: bytes, limit: int = MAX_SIZE, name: str = MEMFD_NAME) -> int:
    """A read-only descriptor of a sealed memfd holding `blob` (close-on-exec)."""
    if len(blob) > limit:
        raise HandoverError(f"worker state: {len(blob)} bytes, more than {limit}")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        # A descriptor opened for reading only: a write through it fails
        # whatever the seals, and none that could write is left.
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def read_sealed(fd: int, limit: int = MAX_SIZE) -> bytes:
    """The contents of a read-only, sealed memfd; raises HandoverError otherwise."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        size = os.fstat(fd).st_size
    except OSError as e:
        raise HandoverError(f"worker state: not a sealed memfd: {e.strerror}") from None
    if seals & SEALS != SEALS:
        raise HandoverError(f"worker state: not sealed (seals {seals:#x}, expected {SEALS:#x})")
    if mode != os.O_RDONLY:
        raise HandoverError("worker state: not opened read-only")
    if size > limit:
        raise HandoverError(f"worker state: {size} bytes, more than {limit}")
    chunks = []
    offset = 0
    while offset < size:  # pread: the master's descriptor shares this offset
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# --- passing it on ----------------------------------------------------------------

def channel() -> Tuple[socket.socket, socket.socket]:
    """(master's end, worker's end), both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def send(sock: socket.socket, fd: int) -> None:
    """Queue `fd` for the worker: it is there when the worker first reads."""
    socket.send_fds(sock, [_MESSAGE], [fd])


def offered(fd: int) -> socket.socket:
    """The worker's end of a channel() holding `fd` (a sealed state), queued
    now and taken by the worker once it is non-dumpable (receive()): until
    then no descriptor of its can show the state to another process of the
    user.  Raises OSError."""
    handing, handed = channel()
    try:
        with handing:
            send(handing, fd)
    except OSError:
        handed.close()
        raise
    return handed


def receive(fd: int) -> Tuple[Settings, Pem]:
    """In a new worker: take the memfd from its end of channel(), check and parse it.

    Closes `fd` and the memfd; raises HandoverError.
    """
    received = []
    try:
        with socket.socket(fileno=fd) as sock:
            # The master queued it before starting us: waiting is for nothing.
            sock.settimeout(RECEIVE_TIMEOUT)
            # A stray descriptor beyond the one expected shows up as MSG_CTRUNC
            # or a second descriptor: either way not what a master sends.
            message, received, flags, _ = socket.recv_fds(
                sock, len(_MESSAGE), 2, socket.MSG_CMSG_CLOEXEC)
    except OSError as e:
        raise HandoverError(f"worker state: cannot receive it: {e.strerror or e}") from None
    try:
        if message != _MESSAGE or len(received) != 1 or flags & socket.MSG_CTRUNC:
            raise HandoverError("worker state: not what the master sends")
        return decode(read_sealed(received[0]))
    finally:
        for descriptor in received:
            os.close(descriptor)
