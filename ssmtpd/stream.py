"""Buffered, bounded, fair reading from one client socket.

Memory per client is bounded: a line never grows past its limit (the rest is
read and dropped in chunks), and the DATA reader takes raw chunks.

Time is bounded too.  A gevent read that finds data already waiting, and a
send with room in the socket buffer, return without ever yielding to the
event loop; a client that keeps its socket full would hold every other client,
every timer and every signal until it paused.  So a stream that has read for
TURN seconds without pausing lets one loop iteration pass before it reads on
(docs/limits.md "Limits and abuse": fairness).  And no wait on a client is unbounded:
the session holds each under a Deadline (--timeout, --data-timeout).
"""

import socket
import time

import gevent
from gevent import ssl

CHUNK = 65536
# Reads for command lines are smaller: what is read and not yet answered
# stays with us while a client that pipelines does not read its replies.
# A TLS record holds at most 16 KiB; the longest line (AUTH) takes one more read.
LINE_CHUNK = 16384
# Long enough that a busy session pays for the yield about once per 5 ms (a
# few microseconds), short enough that ten busy sessions still answer an
# interactive client within a tenth of a second.
TURN = 0.005
# Replies owed to a pipelining client are sent once this many are waiting,
# before another command is read: a client that never reads its replies holds
# this much of ours, not a reply for every command it sent (RFC 2920 groups
# are a few commands).
MAX_UNSENT = 8192
# Any delay above zero is a timer: the loop must poll for I/O, run due timers
# and signal handlers before it resumes us (sleep(0) may resume us first).
YIELD = 0.0001


class Deadline:
    """Raises `exception` in the greenlet inside `with deadline:` after `seconds`.

    One loop timer, restarted for each wait: a session waits a dozen times,
    and a new gevent.Timeout for each cost more than the read it bounded.
    A `with` block also keeps the wait off the C stack that a greenlet saves
    while it waits, where a call through another layer would sit.
    """

    def __init__(self, seconds: float, exception):
        # A repeating timer, restarted with again(): libev's stop() keeps
        # what is left of a one-shot timer and start() would go on from
        # there, making --timeout a total for the session, not a bound per wait.
        self._timer = gevent.get_hub().loop.timer(seconds, seconds)
        self._exception = exception

    def __enter__(self) -> None:
        self._timer.again(gevent.getcurrent().throw, self._exception)

    def __exit__(self, *exc_info) -> None:
        self._timer.stop()


class ClientGone(Exception):
    """The client closed the connection or it broke."""


class LineTooLong(Exception):
    """A line exceeded its limit; the whole line has been consumed."""


class ClientStream:
    # Slots: one of these lives as long as each idle client.
    __slots__ = ("sock", "_hub", "_readable", "_tls", "_read", "_pending", "_buf", "_out",
                 "_loop", "_turn_iteration", "_turn_ends")

    def __init__(self, sock, readable=None):
        self.sock = sock
        self._hub = gevent.get_hub()
        # One watcher for the life of the connection, handed on at STARTTLS:
        # a new one per wait cost an object and two system calls (a
        # descriptor check and a re-add to epoll) on every command.
        self._readable = readable if readable is not None \
            else self._hub.loop.io(sock.fileno(), 1)  # 1: readable
        self._tls = isinstance(sock, ssl.SSLSocket)
        # A TLS socket's read() is its recv() without a layer of checks.
        self._read = sock.read if self._tls else sock.recv
        # Octets TLS has decrypted but we have not read yet.
        self._pending = sock.pending if self._tls else _nothing_pending
        self._buf = bytearray()
        # Replies wait here until we would block on the client, so a pipelined
        # group of commands (RFC 2920) is answered with one send, not one each.
        self._out = bytearray()
        self._loop = self._hub.loop
        self._turn_iteration = -1
        self._turn_ends = 0.0

    def over(self, sock) -> "ClientStream":
        """A stream on `sock`, the same connection wrapped in TLS."""
        return ClientStream(sock, self._readable)

    # --- reading -----------------------------------------------------------

    def _take_turns(self) -> None:
        # The loop's iteration count moves only while some greenlet waits, so
        # a new count means this session let others run since its turn began.
        now = time.monotonic()
        iteration = self._loop.iteration
        if iteration != self._turn_iteration:
            self._turn_iteration = iteration
            self._turn_ends = now + TURN
        elif now >= self._turn_ends:
            gevent.sleep(YIELD)
            self._turn_iteration = self._loop.iteration
            self._turn_ends = time.monotonic() + TURN

    def _recv(self, size: int = CHUNK) -> bytes:
        answered = bool(self._out)
        self.flush()
        try:
            if answered and not self._pending():
                # The client is reading our reply, so its next line is
                # rarely here yet: wait until it is, rather than first fail a
                # read (a system call, and over TLS an exception kept alive,
                # with its traceback, for as long as the session waits).  A
                # pipelining client's waiting bytes cost one loop pass.
                self._hub.wait(self._readable)
            data = self._read(size)
        except (ConnectionError, socket.error) as e:
            if isinstance(e, socket.timeout):
                raise
            raise ClientGone(str(e)) from None
        if not data:
            raise ClientGone("connection closed by client")
        return data

    def readline(self, limit: int) -> bytes:
        """One line ending in LF (LF included), of at most `limit` octets.

        Over the limit, the remainder up to the next LF is discarded as it
        arrives (RFC 5321 §4.5.3.1.4) and LineTooLong is raised.
        """
        self._take_turns()
        if len(self._out) > MAX_UNSENT:
            self.flush()
        buf = self._buf
        if not buf:
            # The usual command: nothing pipelined, and one read brings the
            # whole line and no more.
            data = self._recv(LINE_CHUNK)
            if data.find(b"\n") == len(data) - 1 and len(data) <= limit:
                return data
            buf += data
        searched = 0
        while True:
            end = buf.find(b"\n", searched)
            if end >= 0:
                if end + 1 > limit:
                    del buf[:end + 1]
                    raise LineTooLong()
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                return line
            if len(buf) > limit:
                buf.clear()
                self._discard_to_newline()
                raise LineTooLong()
            searched = len(buf)
            buf += self._recv(LINE_CHUNK)

    def _discard_to_newline(self) -> None:
        while True:
            self._take_turns()
            data = self._recv(LINE_CHUNK)
            end = data.find(b"\n")
            if end >= 0:
                self._buf += data[end + 1:]
                return

    def recv_some(self) -> bytes:
        """Buffered bytes if any, else one read from the socket."""
        self._take_turns()
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            return data
        return self._recv()

    def unread(self, data: bytes) -> None:
        self._buf[:0] = data

    def discard_buffer(self) -> int:
        """Drop what the client pipelined; used at STARTTLS (RFC 3207 §4.2)."""
        n = len(self._buf)
        self._buf.clear()
        return n

    # --- writing -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue data; it is sent before the next read from the client or on flush()."""
        self._out += data

    def flush(self) -> None:
        if not self._out:
            return
        # Sent from the buffer itself, not a copy of it; replies written
        # meanwhile go to a new one.
        data = memoryview(self._out)
        self._out = bytearray()
        try:
            # send() rather than sendall(): gevent's sendall asks the kernel
            # for the buffer size (a getsockopt call) before every reply.
            # A TLS send writes the whole record or waits; a plain one may
            # be short, and the loop sends the rest.
            while data:
                sent = self.sock.send(data)
                if not sent:  # a TLS socket that must not wait says so by sending nothing
                    raise ClientGone("client not reading")
                data = data[sent:]
        except (ConnectionError, socket.error) as e:
            if isinstance(e, socket.timeout):
                raise
            raise ClientGone(str(e)) from None

    # --- the end -----------------------------------------------------------

    def close(self, notify: bool = False, wait: bool = True) -> None:
        """Send what is queued, then close; over TLS, `notify` sends a close_notify first.
        Without `wait`, only what the socket takes at once is sent."""
        sock = self.sock
        try:
            if not wait:
                sock.settimeout(0.0)
            self.flush()
            if notify and self._tls:
                # close_notify, so the client can tell our end from a
                # truncation (OpenSSL 3 clients report the difference).  Sent
                # without waiting for the client's own: with a zero timeout
                # the shutdown writes ours and stops where it would have to
                # read (RFC 8446 §6.1 lets the closing side not wait).
                try:
                    sock.settimeout(0.0)
                    sock = sock.unwrap()
                except (OSError, ValueError):
                    pass
        finally:
            self._readable.close()
            sock.close()


def _nothing_pending() -> int:
    return 0
