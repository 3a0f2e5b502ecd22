"""/metrics over HTTP, bounded like the SMTP side (docs/monitoring.md "Monitoring").

Not a general HTTP server: each connection gets one answer to one request
(GET or HEAD /metrics; anything else 404 or 405) and is closed, and the
whole exchange must be over within DEADLINE.  At most MAX_CLIENTS
connections are served at once; one more is closed as soon as it is
accepted.  The descriptors a scraper can hold are the SMTP listeners' too,
and in the master of --workers the ones a replacement worker is started
with: without these bounds, idle connections here left SMTP clients without
a greeting and a dead worker unreplaced.
"""

import errno
import gzip
import logging
import time
from typing import Callable, Tuple

import gevent

from ssmtpd.listener import Listener

# Prometheus scrapes one target over one connection at a time; a few more
# leave room for a person with curl.
MAX_CLIENTS = 16
# Seconds for the whole exchange, request and answer: a scrape is answered
# in milliseconds, and Prometheus's default scrape timeout is 10 s.
DEADLINE = 5.0
# Prometheus's request head is about 300 octets.
MAX_REQUEST = 8192
BACKLOG = 1024
# Out of descriptors: how seldom it is logged (accepting pauses, as SMTP's does).
LOG_EVERY = 60.0

# (body, content type) for the request's Accept header; raises on failure.
Collect = Callable[[str], Tuple[bytes, str]]


class MetricsServer(Listener):
    """Serves what `collect` returns at /metrics, within the bounds above."""

    def __init__(self, address, collect: Collect, log=None):
        """`address` (host, port), or a socket already listening there."""
        super().__init__(address, self._serve,
                         backlog=BACKLOG if isinstance(address, tuple) else None)
        self._collect = collect
        self._log = log or logging.getLogger("ssmtpd")
        self.clients = 0
        self._quiet_until = {}  # what was logged -> when it may be logged again

    def do_read(self):
        try:
            return super().do_read()
        except OSError as e:
            if e.errno == errno.ECONNABORTED:
                return None
            raise

    def exhausted(self, error: OSError) -> None:
        self._warn("accept", "metrics: accept: %s; scrapes wait", error.strerror)

    def do_handle(self, sock, address):
        if self.clients >= MAX_CLIENTS:
            sock.close()
            return
        self.clients += 1
        try:
            super().do_handle(sock, address)
        except BaseException:
            self.clients -= 1
            raise

    def _serve(self, sock, address) -> None:
        try:
            with gevent.Timeout(DEADLINE, False):
                try:
                    head = _read_head(sock)
                except _TooLong:
                    sock.sendall(_response("431 Request Header Fields Too Large"))
                    return
                if head is not None:
                    sock.sendall(self._answer(head))
        except OSError:
            pass  # the scraper went away
        finally:
            self.clients -= 1

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\n")
        request = lines[0].rstrip("\r").split(" ")
        if len(request) != 3 or not request[2].startswith("HTTP/1."):
            return _response("400 Bad Request")
        method, target, _ = request
        if target.split("?", 1)[0] != "/metrics":
            return _response("404 Not Found", b"Not Found: try /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", extra=[("Allow", "GET, HEAD")])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        try:
            body, content_type = self._collect(headers.get("accept", ""))
        except Exception as e:  # noqa: BLE001 -- a scrape must never end in a traceback
            why = e.strerror if isinstance(e, OSError) and e.strerror else repr(e)
            self._warn("collect", "metrics: cannot collect the values: %s", why)
            return _response("503 Service Unavailable")
        extra = [("Content-Type", content_type)]
        if "gzip" in headers.get("accept-encoding", "").lower():
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        return _response("200 OK", body, extra, send_body=method == "GET")

    def _warn(self, what: str, message: str, *args) -> None:
        now = time.monotonic()
        if now >= self._quiet_until.get(what, 0.0):
            self._quiet_until[what] = now + LOG_EVERY
            self._log.warning(message, *args)


class _TooLong(Exception):
    pass


def _read_head(sock):
    """The request line and headers, or None at EOF; raises _TooLong."""
    data = b""
    while True:
        # A bare LF ends a line too (RFC 9112 section 2.2).
        ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
        if ends:
            if min(ends) > MAX_REQUEST:
                raise _TooLong()
            return data[:min(ends)]
        if len(data) > MAX_REQUEST:
            raise _TooLong()
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk


def _response(status: str, body: bytes = b"", extra=(), send_body: bool = True) -> bytes:
    """One answer, then the connection closes (RFC 9112 section 9.6: "close")."""
    if not extra:
        extra = [("Content-Type", "text/plain; charset=utf-8")] if body else []
    head = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in extra),
            f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + (body if send_body else b"")
