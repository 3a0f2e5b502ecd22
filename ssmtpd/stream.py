"""Buffered, bounded, fair reading from one client socket.

Memory per client is bounded: a line never grows past its limit (the rest is
read and dropped in chunks), and the DATA reader takes raw chunks.

Time is bounded too.  A gevent read that finds data already waiting, and a
send with room in the socket buffer, return without ever yielding to the
event loop; a client that keeps its socket full would hold every other client,
every timer and every signal until it paused.  So a stream that has read for
TURN seconds without pausing lets one loop iteration pass before it reads on
(README "Limits and abuse": fairness).  And no wait on a client is unbounded:
the session holds each under a Deadline (--timeout, --data-timeout).
"""

import socket
import time

import gevent
from gevent import ssl

CHUNK = 65536
# Long enough that a busy session pays for the yield about once per 5 ms (a
# few microseconds), short enough that ten busy sessions still answer an
# interactive client within a tenth of a second.
TURN = 0.005
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
    """A plain TCP client.  TLSStream below speaks TLS over the same socket."""

    def __init__(self, sock, readable=None):
        self.sock = sock
        self._hub = gevent.get_hub()
        # One watcher for the life of the connection: a new one per wait cost
        # an object and two system calls (a descriptor check and a re-add to
        # epoll) on every command.
        self._readable = readable if readable is not None \
            else self._hub.loop.io(sock.fileno(), 1)  # 1: readable
        self._buf = bytearray()
        # Replies wait here until we would block on the client, so a pipelined
        # group of commands (RFC 2920) is answered with one send, not one each.
        self._out = bytearray()
        self._loop = self._hub.loop
        self._turn_iteration = -1
        self._turn_ends = 0.0

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

    def _recv(self) -> bytes:
        answered = bool(self._out)
        self.flush()
        try:
            if answered and not self._decrypted_waiting():
                # The client is reading our reply, so its next line is
                # rarely here yet: wait until it is, rather than first fail a
                # read (a system call, and an exception kept alive, with its
                # traceback, for as long as the session waits).  A pipelining
                # client's waiting bytes cost one loop pass.
                self._hub.wait(self._readable)
            data = self._read()
        except (ConnectionError, socket.error) as e:
            if isinstance(e, socket.timeout):
                raise
            raise ClientGone(str(e)) from None
        if not data:
            raise ClientGone("connection closed by client")
        return data

    def _decrypted_waiting(self) -> bool:
        return False

    def _read(self) -> bytes:
        return self.sock.recv(CHUNK)

    def readline(self, limit: int) -> bytes:
        """One line ending in LF (LF included), of at most `limit` octets.

        Over the limit, the remainder up to the next LF is discarded as it
        arrives (RFC 5321 §4.5.3.1.4) and LineTooLong is raised.
        """
        self._take_turns()
        buf = self._buf
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
            buf += self._recv()

    def _discard_to_newline(self) -> None:
        while True:
            self._take_turns()
            data = self._recv()
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
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            self._send(data)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            # send() rather than sendall(): gevent's sendall asks the kernel
            # for the buffer size (a getsockopt call) before every reply.
            while view:
                view = view[self.sock.send(view):]
        except (ConnectionError, socket.error) as e:
            if isinstance(e, socket.timeout):
                raise
            raise ClientGone(str(e)) from None

    # --- the connection ----------------------------------------------------

    def start_tls(self, context) -> "TLSStream":
        """A TLS stream over this connection; its handshake() is yet to run."""
        return TLSStream(self.sock, context, self._readable)

    def close(self, notify: bool = False) -> None:
        """Send what is queued, then close the connection; `notify` matters to TLS."""
        try:
            self._say_goodbye(notify)
        finally:
            self._readable.close()
            self.sock.close()

    def _say_goodbye(self, notify: bool) -> None:
        self.flush()


class TLSStream(ClientStream):
    """TLS through memory buffers: we decide when bytes meet the socket.

    OpenSSL on a socket reads each record in two system calls (header, then
    body) and writes each flight as it is made.  Here one recv() feeds every
    record that has arrived, and what TLS has to say on its own rides with
    one of our replies where it can: TLS 1.3 session tickets with the first,
    close_notify with the last.  One send is one wakeup of the client.
    """

    def __init__(self, sock, context, readable):
        super().__init__(sock, readable)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # True while what TLS wrote may wait for our next reply.
        self._holding = False
        self.version = self._tls.version
        self.cipher = self._tls.cipher

    def handshake(self) -> None:
        """Run the server side of the handshake; raises ClientGone, OSError or ssl.SSLError."""
        tls = self._tls
        wait_first = False  # the ClientHello may be here already
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                self._send_alert()
                raise
            if self._outgoing.pending:
                self._send(self._outgoing.read())
                wait_first = True
            if wait_first:
                self._hub.wait(self._readable)
            if not self._feed():
                raise ClientGone("connection closed by client")
            wait_first = True
        # TLS 1.3 leaves session tickets, which the client does not wait for:
        # they go with our first reply.  TLS 1.2 leaves our Finished, which it does.
        self._holding = tls.version() == "TLSv1.3"
        self.flush()

    def _feed(self) -> bool:
        """One read from the socket into TLS; False at end of stream."""
        data = self.sock.recv(CHUNK)
        if data:
            self._incoming.write(data)
        return bool(data)

    def _send_alert(self) -> None:
        # TLS failed and wrote an alert that tells the client why.
        if self._outgoing.pending:
            try:
                self._send(self._outgoing.read())
            except ClientGone:
                pass

    def _decrypted_waiting(self) -> bool:
        return self._incoming.pending > 0 or self._tls.pending() > 0

    def _read(self) -> bytes:
        tls = self._tls
        while True:
            if self._incoming.pending or tls.pending():
                try:
                    return tls.read(CHUNK)  # b"" after the client's close_notify
                except ssl.SSLWantReadError:
                    pass  # a record not yet whole, or no application data in it
                except ssl.SSLError:
                    self._send_alert()
                    raise
            # TLS may have answered the client on its own (a refused
            # renegotiation, a key update), and the client may wait for it.
            self.flush()
            if not self._feed():
                return b""

    def flush(self) -> None:
        if self._out:
            self._tls.write(self._out)
            self._out.clear()
            self._holding = False
        if self._outgoing.pending and not self._holding:
            self._send(self._outgoing.read())

    def _say_goodbye(self, notify: bool) -> None:
        if notify:
            # close_notify, so the client can tell our end from a truncation
            # (OpenSSL 3 clients report the difference).  We do not wait for
            # the client's own: RFC 8446 §6.1 lets the closing side go.
            if self._out:
                self._tls.write(self._out)
                self._out.clear()
            try:
                self._tls.unwrap()
            except ssl.SSLError:  # wants the client's close_notify
                pass
            self._holding = False
        self.flush()
