"""Listeners, the session registry, connection limits and signals.

docs/configuration.md "Configuration", "Signals" and "Limits and abuse".

One gevent StreamServer per port spawns a greenlet per client.  gevent's own
pool would only stop accepting when full; we count sessions ourselves so a
client over a limit hears 421 at once instead of waiting in the backlog.
"""

import errno
import ipaddress
import os
import resource
import secrets
import signal
import socket
import time
from typing import Callable, List, Optional, Tuple

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from ssmtpd import (__version__, events, log, metrics, privileges, proxy, reload, replies, state,
                    upgrade)
from ssmtpd.config import Settings
from ssmtpd.delivery import Programs
from ssmtpd.listener import Listener
from ssmtpd.limits import (TOO_FAST_FROM_ADDRESS, TOO_MANY, TOO_MANY_FROM_ADDRESS, UNANSWERED,
                           Limits)
from ssmtpd.log import SessionLog
from ssmtpd.session import Session
from ssmtpd.tls import TLSHolder

BACKLOG = 1024
# After SIGTERM, how long beyond the longest program run we wait for busy sessions.
SHUTDOWN_GRACE = 15.0
# What a worker of --workers starts with blocked, until it has its handlers:
# the default actions would kill it mid-import (a reload, a stop, a Ctrl-C).
STARTING_BLOCKED = frozenset((signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2))
# How often, while the server is nearly full, sessions that already wait for a
# line are checked against --busy-timeout (new waits get it directly).
PRESSURE_SWEEP = 0.5


class _Listener(Listener):
    """Says once when accepting pauses for want of descriptors, and once
    when it goes on."""

    def __init__(self, listener, handle, log):
        super().__init__(listener, handle)
        self._log = log
        self._paused = False

    def exhausted(self, error: OSError) -> None:
        if not self._paused:
            events.note(self._log, events.WARNING, events.ACCEPT,
                        "accept: %s; pausing new connections", error.strerror)
        self._paused = True

    def accepted(self) -> None:
        if self._paused:
            self._paused = False
            events.note(self._log, events.WARNING, events.ACCEPT,
                        "accept: accepting new connections again")


# Descriptors a client may cost (socket, program pipes, spool), and those the
# server needs whatever the clients (listeners, logs, the loop's own).
DESCRIPTORS_PER_CLIENT = 4
DESCRIPTORS_SPARE = 64


def fit_descriptor_limit(max_connections: int) -> int:
    """Raise the open file limit towards what `max_connections` clients need;
    how many clients it allows (docs/limits.md "Limits and abuse").

    Workers started later inherit the raised limit.
    """
    want = DESCRIPTORS_PER_CLIENT * max_connections + DESCRIPTORS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    except (ValueError, OSError):
        pass
    return min(max_connections, max(1, (soft - DESCRIPTORS_SPARE) // DESCRIPTORS_PER_CLIENT))


def client_ip(address) -> str:
    ip = address[0]
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class ListenError(Exception):
    """A port could not be bound; str() names the option."""


def bind_listeners(settings: Settings) -> List[Tuple[socket.socket, bool]]:
    """Bind every port: [(listening socket, implicit TLS)], or raise ListenError.

    A failure leaves nothing listening.
    """
    ports = [("--port", settings.port, False)]
    if settings.smtps_port:
        ports.append(("--smtps-port", settings.smtps_port, True))
    listeners = []
    try:
        for option, port, implicit in ports:
            try:
                listeners.append((_listen(settings.bind, port), implicit))
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL and settings.bind:
                    # The address, not the port, is what this machine does not have.
                    raise ListenError(f"--bind: cannot listen on {settings.bind}: "
                                      f"{e.strerror or e}") from None
                raise ListenError(f"{option}: cannot listen on port {port}: "
                                  f"{e.strerror or e}{privileges.bind_advice(e)}") from None
    except ListenError:
        for listener, _ in listeners:
            listener.close()
        raise
    return listeners


def _listen(bind: Optional[str], port: int) -> socket.socket:
    if bind is None and socket.has_dualstack_ipv6():
        return _socket(("::", port), socket.AF_INET6, dualstack=True)
    host = bind if bind is not None else "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _socket((host, port), family)


class Server:
    """One process's clients: the whole server, or one worker of --workers."""

    def __init__(self, settings: Settings, tls: TLSHolder, programs: Programs, logger,
                 limits=None, read_again: Optional[Callable[[], Optional[tuple]]] = None,
                 upgrade: Optional[Callable[[], None]] = None):
        """`read_again()` is SIGHUP's: (settings, tls, programs) for new sessions,
        or None when the configuration was refused (reload.py); `upgrade()` is
        SIGUSR2's (succession.py).  Both None in a worker of --workers, whose
        master reloads and upgrades."""
        self.settings = settings
        self.tls = tls
        self.programs = programs
        self.log = logger
        self.sessions = set()
        self.metrics = metrics.Metrics() if settings.metrics_bind else metrics.NoMetrics()
        self.local_limits = limits if limits is not None else Limits(settings)
        self.limits = self._with_state(settings)
        self._read_again = read_again
        self._upgrade = upgrade
        self.successor = None  # during an upgrade: the succession.Succession under way
        self.metrics_server = None
        self.stopping = False  # after SIGTERM: draining, new sessions refused
        self.retiring = False  # an old worker after a reload: draining gently
        self._connections = 0  # accepted and not yet closed
        self._sweeper: Optional[gevent.Greenlet] = None
        self._stopped = Event()
        self._ended = Event()  # a session ended while draining
        self._servers: List[Tuple[StreamServer, bool]] = []  # and implicit TLS
        self._signal_handlers = []
        self._awaiting_header = 0
        self._inherited = False  # the listeners are a master's

    def _with_state(self, settings: Settings):
        """The limits sessions consult: the local counts, or with --state the
        windowed ones in Redis in front of them."""
        if not settings.state:
            return self.local_limits
        # Each process its own client: a connection is not shared across a fork.
        counts = state.RedisCounts(state.connect(settings.state, settings.state_timeout),
                                   settings.state_prefix, settings.state_timeout)
        return state.SharedLimits(self.local_limits, counts, settings, self.log, self.metrics)

    # --- reload --------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._read_again is None:
            self._leave_to_master("SIGHUP", events.RELOAD, "reloads")
            return
        self.forget_logins()
        if self.successor is not None:
            # The worker of the upgrade has the configuration read at SIGUSR2;
            # its master reads it again once it has taken over.
            self.successor.sighup()
            events.note(self.log, events.INFO, events.RELOAD,
                        "SIGHUP: the reload waits until the upgrade under way is done")
            return
        gevent.spawn(self.reload)

    def _on_sigusr2(self) -> None:
        if self._upgrade is None:
            self._leave_to_master("SIGUSR2", events.UPGRADE, "upgrades")
            return
        gevent.spawn(self._upgrade)

    def _leave_to_master(self, name: str, event: str, does: str) -> None:
        """A signal only the master acts on reached a worker (pkill reaches every process)."""
        events.note(self.log, events.WARNING, event,
                    "%s to worker %d ignored: the master (pid %d) %s; send it there", name,
                    os.getpid(), os.getppid(), does)

    def forget_logins(self) -> None:
        """SIGHUP: every login is asked of the auth program again (docs/auth-program.md
        "The auth cache"), whether or not the configuration read with it is taken."""
        forgotten = self.programs.forget_logins()
        if forgotten is not None:
            events.note(self.log, events.INFO, events.RELOAD,
                        "SIGHUP: auth cache emptied (it held %d answers)", forgotten)

    def reload(self) -> bool:
        """Read the configuration again; new sessions use it if it is good."""
        if self.stopping:
            return False
        got = self._read_again()
        if got is None:
            return False
        settings, tls, programs = got
        self.local_limits.reconfigure(settings)
        self.limits = self._with_state(settings)
        before, self.settings, self.tls, self.programs = self.settings, settings, tls, programs
        log.setup(settings.log_level, format=settings.log_format)
        reload.applied(self.log, f"new sessions use the configuration read now, "
                                 f"{len(self.sessions)} in progress keep theirs",
                       before, settings)
        return True

    # --- start ---------------------------------------------------------------

    def start(self, listeners=None, on_bound=None) -> None:
        """Bind and listen, or raise ListenError; a worker is given its listeners.

        `on_bound()` runs between binding and accepting: where root is given up.
        """
        # Before the port opens: a supervisor may signal as soon as it can connect.
        # A worker of --workers leaves SIGINT to its master: a Ctrl-C reaches
        # the whole process group, and the master's SIGTERM must not count as
        # the worker's second signal.
        stop_signals = (signal.SIGTERM,) if listeners is not None \
            else (signal.SIGTERM, signal.SIGINT)
        self._signal_handlers = [
            gevent.signal_handler(signum, self.begin_shutdown, signal.Signals(signum).name)
            for signum in stop_signals]
        self._signal_handlers += [gevent.signal_handler(signal.SIGHUP, self._on_sighup),
                                  gevent.signal_handler(signal.SIGUSR2, self._on_sigusr2)]
        if listeners is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A worker of --workers starts with these blocked, so that one sent
        # before the handlers above existed waits instead of killing it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTING_BLOCKED)
        inherited = listeners is not None
        if not inherited:
            listeners = bind_listeners(self.settings)
        try:
            if not inherited and self.settings.metrics_bind:  # a worker's master serves them
                self.metrics_server = serve_metrics(self.settings, self.metrics)
            if on_bound is not None:
                on_bound()
        except Exception:
            for listener, _ in listeners:  # a failed start leaves nothing listening
                listener.close()
            raise
        self._inherited = inherited
        self._servers = [(_Listener(listener, self._handler(implicit), self.log), implicit)
                         for listener, implicit in listeners]
        self._sweeper = gevent.spawn(self._sweep_strangers)
        if not inherited:
            self.open()

    def listening_sockets(self):
        """[(listening socket, implicit TLS)], open while this process lives
        or until a stop closes them."""
        return [(server.socket, implicit) for server, implicit in self._servers]

    def open(self) -> None:
        """Accept clients: at start, or in a worker once its master says so
        (after a reload, when the older workers have stopped accepting)."""
        if self.stopping or self.retiring:
            return
        for server, implicit in self._servers:
            server.start()
            host, port = server.socket.getsockname()[:2]
            events.note(self.log, events.INFO, events.LISTENING, "%s on %s port %d (%s)",
                        "accepting" if self._inherited
                        else f"ssmtpd {__version__} listening", host, port,
                        "implicit TLS" if implicit else "STARTTLS",
                        address=host, port=port,
                        tls_mode="implicit" if implicit else "starttls")

    # --- per client ----------------------------------------------------------

    def _handler(self, implicit_tls: bool):
        def handle(sock, address):
            self._serve(sock, address, implicit_tls)
        return handle

    def _serve(self, sock, address, implicit_tls: bool) -> None:
        # Counted from the accept: a drain waits for a connection accepted
        # just before the listener closed, as for a session.
        self._connections += 1
        try:
            self._serve_connection(sock, address, implicit_tls)
        finally:
            self._connections -= 1
            if self.stopping or self.retiring:
                self._ended.set()

    def _serve_connection(self, sock, address, implicit_tls: bool) -> None:
        # Replies are already coalesced per flush; Nagle would only hold a
        # reply back waiting for the client's delayed ACK (~40 ms after TLS).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ip = client_ip(address)
        session_id = secrets.token_hex(6)
        if self.settings.proxy_protocol:
            peer, ip = ip, self._proxied_client(sock, ip, session_id)
            if ip is None:
                self.metrics.connection(metrics.PROXY_REFUSED)
                sock.close()  # without a byte: an untrusted peer learns nothing
                return
        key = self.limits.key(ip)
        log = SessionLog(self.log, session_id, ip)
        if self.settings.proxy_protocol:
            log.say(events.DEBUG, events.PROXY, proxy_ip=peer)
        result, refusal = self._admit(key)
        self.metrics.connection(result)
        if refusal is not None:
            log.say(events.WARNING, events.CONNECTION_REFUSED, code=refusal.code,
                    enhanced=refusal.enhanced, reason=refusal.text)
            _refuse(sock, None if implicit_tls else refusal)
            return
        session = Session(sock, (ip,), self.settings, self.tls, self.programs, self.limits,
                          self.metrics, log, session_id, implicit_tls)
        self.sessions.add(session)
        self.metrics.session_opened()
        try:
            session.run()
        finally:
            self.metrics.session_closed()
            self.sessions.discard(session)
            self.limits.release(key)

    def _proxied_client(self, sock, peer: str, session_id: str) -> Optional[str]:
        """The client's address from the PROXY header, `peer` itself for a
        LOCAL/UNKNOWN header, or None: untrusted peer, bad or late header."""
        log = SessionLog(self.log, session_id, peer)
        address = ipaddress.ip_address(peer.split("%", 1)[0])
        if not any(address in network for network in self.settings.proxy_trusted):
            log.say(events.WARNING, events.PROXY_REFUSED, reason="not a --proxy-trusted address")
            return None
        # Connections still owing their header hold descriptors as sessions
        # do: no more of them than --max-connections at once.
        if self._awaiting_header >= self.settings.max_connections:
            log.say(events.WARNING, events.PROXY_REFUSED,
                    reason=f"{self._awaiting_header} connections already wait for their "
                           "PROXY header")
            return None
        started = time.monotonic()
        deadline = started + self.settings.timeout
        self._awaiting_header += 1
        try:
            header = _read_proxy_header(sock, deadline)
        except _ClosedBeforeHeader:
            # A load balancer's health check that only connects (docs/logging.md "Logging").
            log.say(events.DEBUG, events.DISCONNECTED, reason="closed before a PROXY header",
                    duration_ms=round((time.monotonic() - started) * 1000), health_check=True)
            return None
        except (proxy.ProxyError, OSError, gevent.Timeout) as e:
            why = str(e) if isinstance(e, proxy.ProxyError) else "no complete header in time"
            log.say(events.WARNING, events.PROXY_REFUSED, reason=f"PROXY header: {why}")
            return None
        finally:
            self._awaiting_header -= 1
        return peer if header.client is None else client_ip(header.client)

    def _admit(self, key: str) -> Tuple[str, Optional[replies.Reply]]:
        """Take a connection slot: (metrics result, None), or (why not, the refusal)."""
        if self.stopping:
            return metrics.SHUTTING_DOWN, replies.SHUTTING_DOWN
        reason = self.limits.admit(key)
        if reason is None:
            if self.stopping:  # SIGTERM came while a worker asked its master
                self.limits.release(key)
                return metrics.SHUTTING_DOWN, replies.SHUTTING_DOWN
            return metrics.ACCEPTED, None
        if reason == TOO_MANY:
            return reason, replies.TOO_MANY_CONNECTIONS
        if reason == TOO_MANY_FROM_ADDRESS:
            return reason, replies.TOO_MANY_FROM_IP
        if reason == TOO_FAST_FROM_ADDRESS:
            return reason, replies.TOO_FAST_FROM_IP
        if reason == UNANSWERED:  # the master is slow: a busy server, for the client
            return reason, replies.TOO_MANY_CONNECTIONS
        # A worker whose master is gone is about to stop.
        return metrics.SHUTTING_DOWN, replies.SHUTTING_DOWN

    def _sweep_strangers(self) -> None:
        """Postfix's stress mode, for sessions that began waiting before the
        server filled up (docs/limits.md "Limits and abuse": --busy-timeout)."""
        while not self.stopping:
            gevent.sleep(PRESSURE_SWEEP)
            if self.limits.under_pressure:
                for session in list(self.sessions):
                    session.expire_if_stranger(self.settings.busy_timeout)

    # --- run and stop --------------------------------------------------------

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT has drained the sessions, or until they
        have drained after hand_over(); returns the exit status."""
        try:
            self._stopped.wait()
        finally:
            if not self.stopping:
                # What comes now is for the image that follows (succession.py):
                # held pending, never ignored, which would discard it.  One
                # caught just before is acted on here (a SIGTERM stops instead).
                upgrade.hold_signals()
            handed_over = not self.stopping
            for handler in self._signal_handlers:
                handler.cancel()
            if not handed_over:
                # Cancelling restores the default action: a second SIGTERM from
                # an impatient supervisor must not turn our clean exit into 143.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.stopping:
            events.note(self.log, events.INFO, events.STOPPED, "stopped")
        return 0

    def begin_shutdown(self, why: str = "request") -> None:
        if self.successor is not None:
            self.successor.server_stopping()  # its worker stops with this process
        if self.stopping:
            self._stop_now(why)
            return
        self.stopping = True
        events.note(self.log, events.INFO, events.SHUTDOWN, "%s: shutting down, %d sessions open",
                    why, len(self.sessions))
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        gevent.spawn(self._drain, gently=False)

    def retire(self) -> None:
        """An old worker after a reload: accept no more; the sessions in
        progress, and the connections accepted before, go on as before until
        --graceful-timeout."""
        if self.stopping or self.retiring:
            return
        self.retiring = True
        events.note(self.log, events.INFO, events.SHUTDOWN,
                    "retiring after a reload: no new sessions here, %d in progress finish",
                    len(self.sessions))
        gevent.spawn(self._drain, gently=True)

    def hand_over(self, go: Callable[[], None], message: str) -> None:
        """An upgrade of the one process: accept no more (the listening sockets
        stay open, for the process that follows), call `go()` to let its
        worker begin, and drain gently; serve_forever() returns once drained.
        `message` is logged with the number of sessions in place of {}."""
        if self.stopping or self.retiring:
            return
        self.retiring = True
        for server, _ in self._servers:
            server.stop_accepting()
        # The line first: every session that begins after it is the worker's.
        events.note(self.log, events.INFO, events.UPGRADE, message.format(len(self.sessions)))
        go()
        gevent.spawn(self._drain, gently=True, listening=True)

    def _stop_now(self, why: str) -> None:
        """A second SIGTERM or SIGINT while draining: close every session that
        is not running a program now, and say what is still running."""
        sessions = list(self.sessions)
        running = sum(session.running_program for session in sessions)
        events.note(self.log, events.WARNING, events.SHUTDOWN,
                    "%s again: closing %d sessions now; %d running a program are answered "
                    "when it ends", why, len(sessions) - running, running)
        for session in sessions:
            session.interrupt(now=True)

    def _drain(self, gently: bool, listening: bool = False) -> None:
        """Stop accepting, and end the sessions: after SIGTERM the idle ones at
        once, those sending a message once it is answered; gently (retiring),
        none.  Past --graceful-timeout every session still open is closed
        with 421 4.3.2, one whose program runs once that is answered.
        `listening`: the listening sockets stay open (hand_over())."""
        if not listening:
            for server, _ in self._servers:
                server.close()  # the socket stays open in the other processes that share it
        # Connections accepted just before have their greenlets queued: let them
        # be counted, so the wait below waits for them too.
        gevent.sleep(0)
        if not gently:
            for session in list(self.sessions):
                session.interrupt()
        s = self.settings
        if not self._wait_for_sessions(s.graceful_timeout):
            running = sum(session.running_program for session in self.sessions)
            events.note(self.log, events.WARNING, events.SHUTDOWN,
                        "--graceful-timeout: closing %d sessions still open; %d running a "
                        "program are answered when it ends", len(self.sessions) - running,
                        running)
            for session in list(self.sessions):
                session.interrupt(now=True)
            # Only programs (and the auth pause) still hold sessions now.
            limit = s.process_timeout + s.auth_timeout + s.auth_failure_delay + SHUTDOWN_GRACE
            if not self._wait_for_sessions(limit):
                events.note(self.log, events.WARNING, events.SHUTDOWN,
                            "%d sessions still busy after %.0fs more; exiting anyway",
                            len(self.sessions), limit)
        self._stopped.set()

    def _wait_for_sessions(self, seconds: float) -> bool:
        """Whether every connection ended within `seconds`."""
        deadline = time.monotonic() + seconds
        while self._connections and time.monotonic() < deadline:
            self._ended.wait(timeout=min(1.0, deadline - time.monotonic()))
            self._ended.clear()
        return not self._connections


def serve_metrics(settings: Settings, of=None, sock=None):
    """Serve /metrics at --metrics-bind (`of` a Metrics, or None in the master),
    or on `sock`, already listening there (after an upgrade)."""
    try:
        return metrics.serve(settings.metrics_bind if sock is None else sock, of)
    except OSError as e:
        host, port = settings.metrics_bind
        why = os.strerror(e.errno) if e.errno else str(e)
        raise ListenError(f"--metrics-bind: cannot listen on {host} port {port}: {why}") from None


class _ClosedBeforeHeader(proxy.ProxyError):
    """The peer closed (or reset) the connection before sending a byte."""


def _read_proxy_header(sock, deadline: float) -> proxy.Header:
    """Take exactly the PROXY header off the socket, nothing after it.

    Looked at before it is read: on the implicit-TLS port the bytes that
    follow are the TLS handshake, which must stay in the socket for the TLS
    layer.  A header normally arrives in one segment; the part of one that
    came alone is read (it can only be header), so waiting for the rest is a
    wait for new bytes or the client's end, never a poll.
    """
    with gevent.Timeout(max(0.0, deadline - time.monotonic())):
        taken = b""
        while True:
            try:
                data = sock.recv(proxy.MAX_HEADER - len(taken), socket.MSG_PEEK)
            except ConnectionError:
                if not taken:  # a health check's reset, not a bad header
                    raise _ClosedBeforeHeader() from None
                raise
            if not data:
                if not taken:
                    raise _ClosedBeforeHeader()
                raise proxy.ProxyError("connection closed before a complete header")
            header = proxy.parse(taken + data)
            if header is not None:
                _read_exactly(sock, header.length - len(taken))
                return header
            taken += _read_exactly(sock, len(data))


def _read_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise proxy.ProxyError("connection closed before a complete header")
        data += chunk
    return data


def _socket(address, family, dualstack: bool = False):
    from gevent import socket as gsocket
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _refuse(sock, reply: Optional[replies.Reply]) -> None:
    try:
        if reply is not None:
            sock.settimeout(2)
            sock.sendall(reply.encode())
    except OSError:
        pass
    finally:
        sock.close()
