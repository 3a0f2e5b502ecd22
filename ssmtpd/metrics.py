"""The server's Prometheus metrics and the few calls that record them (docs/monitoring.md "Monitoring").

The session and the server call one method at each event they already log:
a connection admitted or refused, a session's start and end, an AUTH, a
message.  `--metrics-bind` serves them at /metrics in Prometheus's text format
through prometheus_client, on the event loop, by a listener bounded like the
SMTP side (metrics_http.py).

With --workers, every worker writes its values to files in a directory the
master names in PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess
mode), and the master serves the sum; the open-sessions gauge counts live
workers only ("livesum"), so a worker that died does not leave its sessions
behind.  prometheus_client picks its mode when it is first imported, so it is
imported here only when a Metrics is made, after the master has set that
variable.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Optional, Tuple

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A process program may take minutes (--process-timeout is 300 s by default).
PROGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Connection results besides the limits' refusal reasons.
ACCEPTED = "accepted"
SHUTTING_DOWN = "shutting-down"
PROXY_REFUSED = "proxy-refused"
# AUTH results.
AUTH_RESULTS = {235: "ok", 535: "invalid", 454: "tempfail"}
THROTTLED = "throttled"


class Metrics:
    """The metric objects of one process, and one method per event."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Our own registry: the default one would add Python and process
        # metrics, which mean nothing summed across workers.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._connections = Counter(
            "ssmtpd_connections", "Connections, by result: accepted or why refused",
            ["result"], registry=r)
        self._sessions = Gauge("ssmtpd_sessions", "Sessions open now", registry=r,
                               multiprocess_mode="livesum")
        # `cached`: "yes" when the auth cache answered, no program ran.
        self._auth = Counter("ssmtpd_auth", "AUTH attempts, by result and whether the auth "
                             "cache answered", ["result", "cached"], registry=r)
        self._messages = Counter("ssmtpd_messages", "Messages, by the final reply code",
                                 ["code"], registry=r)
        self._bytes = Counter("ssmtpd_message_bytes", "Octets of message data received",
                              registry=r)
        self._rate_limited = Counter(
            "ssmtpd_rate_limited", "Commands refused by a per-user limit, by the limit",
            ["limit"], registry=r)
        self._state_errors = Counter(
            "ssmtpd_state_errors", "Calls to the --state Redis that failed or timed out",
            registry=r)
        self._auth_seconds = Histogram("ssmtpd_auth_program_seconds",
                                       "Run time of the auth program", registry=r,
                                       buckets=PROGRAM_BUCKETS)
        self._process_seconds = Histogram("ssmtpd_process_program_seconds",
                                          "Run time of the process program", registry=r,
                                          buckets=PROGRAM_BUCKETS)

    def connection(self, result: str) -> None:
        self._connections.labels(result).inc()

    def session_opened(self) -> None:
        self._sessions.inc()

    def session_closed(self) -> None:
        self._sessions.dec()

    def auth(self, result: str, program_seconds: Optional[float] = None,
             cached: bool = False) -> None:
        self._auth.labels(result, "yes" if cached else "no").inc()
        if program_seconds is not None:
            self._auth_seconds.observe(program_seconds)

    def rate_limited(self, limit: str) -> None:
        self._rate_limited.labels(limit).inc()

    def state_error(self) -> None:
        self._state_errors.inc()

    def message(self, code: int, size: int, program_seconds: Optional[float] = None) -> None:
        self._messages.labels(str(code)).inc()
        self._bytes.inc(size)
        if program_seconds is not None:
            self._process_seconds.observe(program_seconds)


class NoMetrics:
    """Without --metrics-bind nobody reads the values: every event costs nothing."""

    def connection(self, result: str) -> None:
        pass

    def session_opened(self) -> None:
        pass

    def session_closed(self) -> None:
        pass

    def auth(self, result: str, program_seconds: Optional[float] = None,
             cached: bool = False) -> None:
        pass

    def rate_limited(self, limit: str) -> None:
        pass

    def state_error(self) -> None:
        pass

    def message(self, code: int, size: int, program_seconds: Optional[float] = None) -> None:
        pass


def parse_bind(value: str) -> Tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT; raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (an IPv6 host in brackets)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, [::1]:9100")
    return host, int(port)


def serve(address, metrics: Optional[Metrics] = None):
    """Start serving /metrics on the event loop; returns the started server.

    Serves `metrics`' registry, or, in the master of --workers (metrics None),
    the sum of the workers' files.  Raises OSError if the address cannot be bound.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    from ssmtpd.metrics_http import MetricsServer

    directory = None
    if metrics is not None:
        registry = metrics.registry
    else:
        from prometheus_client import multiprocess
        directory = os.environ[MULTIPROC_ENV]
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)

    def collect(accept: str):
        if directory is not None:
            # The collector's glob takes a directory it cannot open (out of
            # descriptors) for an empty one: all counters would seem reset.
            os.listdir(directory)
        try:
            encoder, content_type = choose_encoder(accept)
        except (TypeError, ValueError):  # a malformed version= in the Accept header
            encoder, content_type = choose_encoder("")
        return encoder(registry), content_type

    server = MetricsServer(address, collect)
    server.start()
    return server


class Directory:
    """The master's directory for the workers' metric files, reached through a descriptor.

    PROMETHEUS_MULTIPROC_DIR names it as /proc/self/fd/N: the master keeps N
    open and every worker inherits it under the same number, while the
    programs, started without it, would have to find it by its path.  Made
    by root for --user, that path leads through a directory of root's that
    only root may enter, so a program cannot write (or forge) the values
    (docs/monitoring.md "Monitoring" says what this does not cover).
    """

    def __init__(self, identity=None, export: bool = True):
        """`export`: name it in this process's environment, for prometheus_client
        here and for the workers started from here."""
        self._private = tempfile.mkdtemp(prefix="ssmtpd-metrics-")
        try:
            values = os.path.join(self._private, "values")
            os.mkdir(values, 0o700)
            if identity is not None and os.geteuid() == 0:
                # The workers, and this master after --user, write and read it.
                os.chown(values, identity.uid, identity.gid)
            self.fd = os.open(values, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            shutil.rmtree(self._private, ignore_errors=True)
            raise
        if export:
            os.environ[MULTIPROC_ENV] = f"/proc/self/fd/{self.fd}"

    @classmethod
    def adopt(cls, fd: int) -> "Directory":
        """The directory a master before an upgrade made, open as `fd`."""
        directory = cls.__new__(cls)
        directory.fd = fd
        directory._private = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        os.environ[MULTIPROC_ENV] = f"/proc/self/fd/{fd}"
        return directory

    def remove(self) -> None:
        """Delete the values; after --user, root's two empty directories stay behind."""
        try:
            for name in os.listdir(self.fd):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
        except OSError:
            pass  # out of descriptors at the very end: the files stay
        finally:
            os.close(self.fd)
        shutil.rmtree(self._private, ignore_errors=True)


def worker_died(pid: int) -> None:
    """In the master: drop a dead worker's live gauges from the sum."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid, os.environ[MULTIPROC_ENV])
