"""One-shot health check of a running ssmtpd (docs/deploying.md "In a container").

    python -m ssmtpd.healthcheck [SSMTPD OPTIONS...]

It reads the configuration exactly as `ssmtpd [SSMTPD OPTIONS...]` would, from
the same command line, SSMTPD_* environment and ini file, and checks every port
the server listens on by speaking SMTP: the greeting (220), EHLO (250), QUIT;
on --smtps-port after the TLS handshake.  Exit 0 healthy, 1 not; one line on
stdout says what was checked (a container engine keeps it in its health log).

With --proxy-protocol, a connection must come from a --proxy-trusted address
and begin with a PROXY header, or the server closes it and logs a warning.  The
check then speaks from the first local address that is trusted (loopback
first) and sends a PROXY v2 LOCAL header, the same as a load balancer's own
health check, so the server keeps that address for it.  When no local address
is trusted, speaking SMTP is impossible without being refused; the check then
only looks at the kernel's table of listening sockets: each port must be
listening, and its queue of connections not yet accepted must not be full
(which is what a server that stopped accepting leaves behind).
"""

import ipaddress
import socket
import ssl
import sys
import time
from typing import List, Optional, Sequence, Tuple

# Below the 10 s --timeout of the Dockerfile's HEALTHCHECK: an answer of ours,
# not the engine's kill, says why a check failed.
DEADLINE = 8.0
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class Unhealthy(Exception):
    """str() is the one line printed before exit 1."""


class Target:
    """The configuration the check needs, read as the server reads it."""

    def __init__(self, argv: Optional[Sequence[str]]):
        from ssmtpd import config
        try:
            ns = config.build_parser().parse_args(argv)
        except config.ConfigError as e:
            raise Unhealthy(f"configuration: {e}") from None
        values = {}
        for opt in config.OPTIONS:
            if opt.name in ("bind", "port", "smtps-port", "proxy-protocol", "proxy-trusted"):
                value = getattr(ns, opt.attr)
                try:
                    values[opt.attr] = opt.check(value) if opt.check else value
                except ValueError as e:
                    raise Unhealthy(f"configuration: {opt.flag}: {e}") from None
        self.bind: Optional[str] = values["bind"]
        self.ports: List[Tuple[int, bool]] = [(values["port"], False)]
        if values["smtps_port"] is not None:
            self.ports.append((values["smtps_port"], True))
        self.proxy: bool = values["proxy_protocol"]
        self.trusted = values["proxy_trusted"]

    def host(self) -> str:
        """Where to connect: the bound address, or loopback for all interfaces."""
        if self.bind in (None, "0.0.0.0"):
            return "127.0.0.1"
        return "::1" if self.bind == "::" else self.bind

    def source(self) -> Optional[str]:
        """The local address to speak from: any, or a --proxy-trusted one (None: none is)."""
        host = self.host()
        if not self.proxy:
            return host
        candidates = [host]
        if self.bind in (None, "0.0.0.0", "::"):
            candidates += ["127.0.0.1", "::1"] + local_addresses()
        for candidate in candidates:
            address = ipaddress.ip_address(candidate)
            if any(address in network for network in self.trusted):
                return candidate
        return None


def local_addresses() -> List[str]:
    """This network namespace's own IPv4 and IPv6 addresses (link-local left out:
    they need a scope)."""
    found = []
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for previous, line in zip(lines, lines[1:]):
            if line.strip() == "/32 host LOCAL":
                found.append(previous.split()[-1])
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                address = ipaddress.ip_address(bytes.fromhex(line.split()[0]))
                if not address.is_link_local:
                    found.append(str(address))
    except (OSError, ValueError):
        pass
    return list(dict.fromkeys(found))


def speak(host: str, source: str, port: int, implicit_tls: bool, proxy: bool,
          deadline: float) -> None:
    """Greeting, EHLO, QUIT on one port; raises Unhealthy.

    Nothing more than a load balancer's check sends, so the server logs it
    at DEBUG only (docs/logging.md "Logging").
    """
    where = f"port {port}{' (implicit TLS)' if implicit_tls else ''}"

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unhealthy(f"{where}: no answer within {DEADLINE:.0f}s")
        return left

    try:
        # When the host is the source itself, binding it says so; otherwise the
        # kernel's own choice of source could be an untrusted address.
        sock = socket.create_connection((host, port), timeout=remaining(),
                                        source_address=(source, 0))
    except OSError as e:
        raise Unhealthy(f"{where}: cannot connect to {host}: {e.strerror or e}") from None
    try:
        if proxy:
            sock.sendall(PROXY_V2_LOCAL)
        if implicit_tls:
            # A liveness check: the certificate is the clients' business.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock.settimeout(remaining())
            sock = context.wrap_socket(sock)
        reader = sock.makefile("rb")
        for command, expected in ((None, 220), (b"EHLO localhost\r\n", 250),
                                  (b"QUIT\r\n", 221)):
            if command is not None:
                sock.settimeout(remaining())
                sock.sendall(command)
            code = read_reply(sock, reader, remaining)
            if code != expected:
                said = "the greeting" if command is None else command.decode().strip()
                raise Unhealthy(f"{where}: {said} answered {code}, not {expected}")
    except (OSError, ssl.SSLError, socket.timeout) as e:
        if isinstance(e, socket.timeout):
            raise Unhealthy(f"{where}: no answer within {DEADLINE:.0f}s") from None
        raise Unhealthy(f"{where}: {e.strerror or e}") from None
    finally:
        sock.close()


def read_reply(sock, reader, remaining) -> Optional[int]:
    """The code of one (possibly multi-line) reply; None if the server closed."""
    for _ in range(100):
        sock.settimeout(remaining())
        line = reader.readline(1024)
        if not line:
            return None
        if line[3:4] != b"-":
            return int(line[:3]) if line[:3].isdigit() else None
    return None


def accept_queue_limit() -> int:
    """How many connections the kernel queues for one of our ports before it
    drops new ones: our listen() backlog, capped by net.core.somaxconn."""
    from ssmtpd.server import BACKLOG
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return min(BACKLOG, int(f.read()))
    except (OSError, ValueError):
        return BACKLOG


def listening(port: int) -> None:
    """The kernel's view of a port nobody may speak to; raises Unhealthy."""
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            if state != _LISTEN or int(local.rsplit(":", 1)[1], 16) != port:
                continue
            found = True
            # For a listening socket, rx_queue counts the connections the
            # kernel has completed and the server has not accepted yet.
            waiting = int(fields[4].split(":")[1], 16)
            if waiting >= accept_queue_limit():
                raise Unhealthy(f"port {port}: {waiting} connections wait to be accepted "
                                "(the queue is full: the server does not accept)")
    if not found:
        raise Unhealthy(f"port {port}: nothing is listening")


def check(argv: Optional[Sequence[str]] = None) -> str:
    """What was checked, or raises Unhealthy."""
    target = Target(argv)
    ports = ", ".join(str(port) for port, _ in target.ports)
    source = target.source()
    if source is None:
        for port, _ in target.ports:
            listening(port)
        return (f"ports {ports} listening, accepting; not spoken to: no address of this "
                "host is in --proxy-trusted (add 127.0.0.1 to it for an SMTP check)")
    host = source if target.bind in (None, "0.0.0.0", "::") else target.host()
    deadline = time.monotonic() + DEADLINE
    for port, implicit_tls in target.ports:
        speak(host, source, port, implicit_tls, target.proxy, deadline)
    via = f" from {source} with a PROXY v2 LOCAL header" if target.proxy else ""
    return f"ports {ports} answered 220, NOOP 250{via}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        print(f"ssmtpd healthy: {check(argv)}")
        return 0
    except Unhealthy as e:
        print(f"ssmtpd unhealthy: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
