"""The PROXY protocol header parser, alone and against a real server (docs/scaling.md "Scaling").

ssmtpd/proxy.py is pure, so it is fed headers built here from HAProxy's
proxy-protocol.txt layout, every prefix of them, and arbitrary bytes.  The
server tests send headers by hand; tests/test_haproxy.py puts a real HAProxy
in front.
"""

import ipaddress
import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HOSTNAME, PASSWORD, USER, Raw, plain_token, wait_until
from ssmtpd import proxy
from ssmtpd.proxy import Header, ProxyError

PROPERTY = settings(max_examples=300, deadline=None)

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
port = st.integers(0, 65535)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
    lambda items: b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in items))
after = st.binary(max_size=64)


def v1(family, source, dest, sport, dport) -> bytes:
    return f"PROXY TCP{family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(source, dest, sport, dport, extra=b"", command=0x1) -> bytes:
    if ":" in source:
        family, block = 0x21, (socket.inet_pton(socket.AF_INET6, source)
                               + socket.inet_pton(socket.AF_INET6, dest))
    else:
        family, block = 0x11, socket.inet_aton(source) + socket.inet_aton(dest)
    block += struct.pack("!HH", sport, dport) + extra
    return proxy.V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack(
        "!H", len(block)) + block


@st.composite
def headers(draw):
    """(encoded header, expected client address) of every kind we accept."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v2-4", "v2-6"]))
    addr = ipv4 if kind.endswith("4") else ipv6
    source, dest, sport, dport = draw(addr), draw(addr), draw(port), draw(port)
    # An IPv4-mapped IPv6 source is the IPv4 client it maps.
    mapped = ipaddress.ip_address(source)
    client = str(getattr(mapped, "ipv4_mapped", None) or mapped)
    if kind.startswith("v1"):
        return v1(kind[-1], source, dest, sport, dport), (client, sport)
    return v2(source, dest, sport, dport, draw(tlvs)), (client, sport)


@PROPERTY
@given(headers(), after)
def test_header_round_trip(encoded, rest):
    """A valid v1 or v2 header yields its client and exactly its own length,
    whatever follows it (the SMTP dialogue or a TLS handshake)."""
    header, client = encoded
    parsed = proxy.parse(header + rest)
    assert parsed.client == client
    assert parsed.length == len(header)


@PROPERTY
@given(headers())
def test_every_prefix_asks_for_more(encoded):
    """A header cut anywhere is incomplete, never an error and never a wrong answer."""
    header, _ = encoded
    for cut in range(len(header)):
        assert proxy.parse(header[:cut]) is None


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data):
    """Any bytes: incomplete, a header no longer than the data, or ProxyError."""
    try:
        parsed = proxy.parse(data)
    except ProxyError:
        return
    if parsed is not None:
        assert parsed.length <= min(len(data), proxy.MAX_HEADER)


@PROPERTY
@given(st.binary(min_size=1, max_size=40).filter(lambda b: not b.startswith(b"P")
                                                  and not b.startswith(b"\r")))
def test_smtp_or_tls_without_header_is_refused(data):
    """docs/scaling.md "Scaling": a connection that does not start with a header is refused at once."""
    with pytest.raises(ProxyError):
        proxy.parse(data)


def test_ipv4_mapped_client_is_the_ipv4_address():
    """A dual-stack proxy's ::ffff:a.b.c.d is the IPv4 client a.b.c.d (logs, env, limits)."""
    assert proxy.parse(v1(6, "::ffff:192.0.2.7", "::1", 1, 2)).client == ("192.0.2.7", 1)
    assert proxy.parse(v2("::ffff:192.0.2.7", "::1", 1, 2)).client == ("192.0.2.7", 1)


def test_local_and_unknown_keep_the_connection_address():
    """docs/scaling.md "Scaling": v2 LOCAL (health checks) and v1 UNKNOWN keep the proxy's own address."""
    local = proxy.V2_SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00"
    assert proxy.parse(local + b"EHLO") == Header(16, 2, None)
    local_with_block = v2("192.0.2.1", "192.0.2.2", 1, 2, command=0x0)
    assert proxy.parse(local_with_block).client is None
    assert proxy.parse(b"PROXY UNKNOWN\r\n") == Header(15, 1, None)
    assert proxy.parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").client is None


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",          # LF only
    b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",      # family mismatch
    b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",    # port out of range
    b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",       # leading zero
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",          # a field missing
    b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",       # two spaces
    b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2" + b" " * 100 + b"\r\n",  # over 107
    b"PROXY " + b"x" * 200,
    proxy.V2_SIGNATURE + bytes([0x10, 0x11]) + b"\x00\x0c" + b"\x00" * 12,  # version 1
    proxy.V2_SIGNATURE + bytes([0x22, 0x11]) + b"\x00\x0c" + b"\x00" * 12,  # command 2
    proxy.V2_SIGNATURE + bytes([0x21, 0x12]) + b"\x00\x0c" + b"\x00" * 12,  # DGRAM
    # Undefined families (above UNIX) and protocols (above DGRAM), LOCAL or PROXY.
    proxy.V2_SIGNATURE + bytes([0x21, 0x41]) + b"\x00\x0c" + b"\x00" * 12,
    proxy.V2_SIGNATURE + bytes([0x21, 0xf1]) + b"\x00\x0c" + b"\x00" * 12,
    proxy.V2_SIGNATURE + bytes([0x21, 0x13]) + b"\x00\x0c" + b"\x00" * 12,
    proxy.V2_SIGNATURE + bytes([0x21, 0x0f]) + b"\x00\x00",
    proxy.V2_SIGNATURE + bytes([0x20, 0x40]) + b"\x00\x00",
    proxy.V2_SIGNATURE + bytes([0x20, 0x03]) + b"\x00\x00",
    proxy.V2_SIGNATURE + bytes([0x21, 0x11]) + b"\x00\x04" + b"\x00" * 4,   # block too short
    proxy.V2_SIGNATURE + bytes([0x21, 0x11]) + b"\xff\xff",                 # over V2_MAX
    b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8),
    b"EHLO client.test\r\n",
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
])
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyError):
        proxy.parse(data)


# An IPv6 scope id may hold any octet but a space: these would reach the
# Received header, SSMTPD_CLIENT_ADDR and the log (docs/scaling.md "Scaling").
SCOPED_SOURCES = [b"fe80::1%\nX-Injected:\tyes", b"fe80::1%\r\nX-Injected: yes",
                  b"fe80::1%\x00", b"fe80::1%\x1b[31m", b"fe80::1%s%s%s", b"fe80::1%eth0",
                  b"::ffff:192.0.2.1%1"]


@pytest.mark.parametrize("source", SCOPED_SOURCES)
def test_scoped_ipv6_source_is_refused(source):
    with pytest.raises(ProxyError):
        proxy.parse(b"PROXY TCP6 " + source + b" ::1 1234 25\r\n")
    with pytest.raises(ProxyError):
        proxy.parse(b"PROXY TCP6 ::1 " + source + b" 1234 25\r\n")


# --- against a real server --------------------------------------------------------

@pytest.fixture
def proxied(make_server):
    return make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1/32,::1")


def connect(srv, source="127.0.0.1", port=None) -> Raw:
    return Raw(socket.create_connection(("127.0.0.1", port or srv.port), timeout=10,
                                        source_address=(source, 0)))


@pytest.mark.parametrize("make_header", [
    lambda: v1(4, "203.0.113.7", "192.0.2.25", 40000, 587),
    lambda: v2("203.0.113.7", "192.0.2.25", 40000, 587),
])
def test_client_address_from_header_reaches_the_program(proxied, make_header):
    """docs/scaling.md "Scaling": the header's address is SSMTPD_CLIENT_ADDR, in Received and in the log."""
    raw = connect(proxied)
    raw.send(make_header())
    raw.login(proxied.tls_context())
    assert raw.send_message()[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    (run,) = proxied.runs()
    assert run["env"]["SSMTPD_CLIENT_ADDR"] == "203.0.113.7"
    assert "from client.test ([203.0.113.7])" in run["stdin"]
    assert " 203.0.113.7 -: connected" in proxied.log()


def test_local_header_keeps_the_proxy_address(proxied):
    """docs/scaling.md "Scaling": a v2 LOCAL header (a health check) keeps the proxy's own address."""
    raw = connect(proxied)
    raw.send(proxy.V2_SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00")
    assert raw.reply()[0] == 220
    # More than a health check does, so that the session's lines are at INFO
    # (docs/logging.md "Logging").
    assert raw.cmd("NOOP")[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    assert wait_until(lambda: " 127.0.0.1 -: disconnected" in proxied.log()), proxied.log()
    assert " 127.0.0.1 -: connected" in proxied.log()


@pytest.mark.parametrize("first", [
    b"EHLO client.test\r\n", b"PROXY TCP4 garbage\r\n", b"",
    # A v2 header with an undefined address family: invalid, not "unspecified".
    proxy.V2_SIGNATURE + bytes([0x21, 0x41]) + b"\x00\x0c" + bytes(12),
], ids=["smtp", "v1-garbage", "nothing", "v2-family-4"])
def test_missing_or_bad_header_is_closed_without_a_byte(make_server, first):
    """docs/scaling.md "Scaling": from a trusted peer, no header, a bad one, or none within --timeout:
    closed without a byte."""
    srv = make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1", "--timeout", "1")
    raw = connect(srv)
    raw.send(first)
    assert raw.closed(timeout=5)
    assert raw.buf == b""


def test_untrusted_peer_is_closed_without_a_byte(proxied):
    """docs/scaling.md "Scaling": a connection from outside --proxy-trusted gets nothing, header or not."""
    raw = connect(proxied, source="127.0.0.2")
    raw.send(v2("203.0.113.7", "192.0.2.25", 40000, 587))
    assert raw.closed(timeout=5)
    assert raw.buf == b""
    assert "127.0.0.2 -: closed: not a --proxy-trusted address" in proxied.log()


def test_header_precedes_the_tls_handshake_on_the_smtps_port(make_server):
    """docs/scaling.md "Scaling": on --smtps-port the header comes first, then the TLS handshake."""
    from conftest import free_port
    smtps = free_port()
    srv = make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
                      "--smtps-port", str(smtps))
    sock = socket.create_connection(("127.0.0.1", smtps), timeout=10)
    sock.sendall(v1(6, "2001:db8::7", "2001:db8::25", 40000, 465))
    raw = Raw(srv.tls_context().wrap_socket(sock, server_hostname=HOSTNAME))
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")[0] == 235
    assert raw.send_message()[0] == 250
    (run,) = srv.runs()
    assert run["env"]["SSMTPD_CLIENT_ADDR"] == "2001:db8::7"
    assert "[IPv6:2001:db8::7]" in run["stdin"]


def test_per_address_limit_counts_the_real_clients(make_server):
    """docs/scaling.md "Scaling": --max-connections-per-ip counts the addresses in the headers."""
    srv = make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
                      "--max-connections-per-ip", "2")
    held = []
    for client in ("198.51.100.1", "198.51.100.1", "198.51.100.2"):
        raw = connect(srv)
        raw.send(v2(client, "192.0.2.25", 40000, 587))
        assert raw.reply()[0] == 220
        held.append(raw)
    raw = connect(srv)
    raw.send(v2("198.51.100.1", "192.0.2.25", 40001, 587))
    code, lines = raw.reply()
    assert code == 421 and "from your address" in lines[-1]
    for raw in held:
        raw.close()


def test_injection_through_a_trusted_proxy_is_closed_without_a_trace(proxied):
    """SECURITY.md: a trusted peer's v1 header with a scoped IPv6 source (LF, CR, TAB,
    ESC, NUL, "%" in the scope) is closed without a byte, each with one log line, and
    200 of them leak no descriptor."""
    def attempt(source: bytes) -> None:
        raw = connect(proxied)
        raw.send(b"PROXY TCP6 " + source + b" ::1 1234 25\r\n")
        assert raw.closed(timeout=5)
        assert raw.buf == b""
        raw.close()

    # The start-up probe's connection closed before its header, as a health
    # check does: no line at INFO (docs/logging.md "Logging").
    before = proxied.log()
    for source in SCOPED_SOURCES:
        attempt(source)
    assert wait_until(lambda: proxied.log().count("closed: PROXY header") - before.count(
        "closed: PROXY header") == len(SCOPED_SOURCES), timeout=10), proxied.log()
    new = proxied.log()[len(before):]
    assert len(new.splitlines()) == len(SCOPED_SOURCES), new
    assert "X-Injected" not in new and "Logging error" not in new

    pid = proxied.proc.pid
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    for n in range(200):
        attempt(SCOPED_SOURCES[n % len(SCOPED_SOURCES)])
    assert wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= descriptors, timeout=10), \
        (descriptors, os.listdir(f"/proc/{pid}/fd"))
    assert proxied.runs() == []


def test_percent_in_a_username_is_logged_as_a_character(make_server, tmp_path):
    """docs/logging.md "Logging": a "%" in a username is part of the quoted name, on every line
    of its session, not a conversion that breaks them."""
    srv = make_server()
    raw = srv.raw()
    raw.login(srv.tls_context(), "user%s%d", PASSWORD)  # the test auth program takes any name
    assert raw.send_message()[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    raw.close()
    assert wait_until(lambda: '"user%s%d": disconnected' in srv.log(), timeout=10), srv.log()
    assert '"user%s%d": MAIL FROM:' in srv.log()
    assert "Logging error" not in srv.log() and "Traceback" not in srv.log()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_partial_headers_cost_no_polling_and_end_with_their_client(make_server):
    """docs/scaling.md "Scaling": a connection that has sent part of its header waits for the rest
    without the server looking again and again (500 of them cost next to no CPU), ends
    as soon as its client leaves, and counts against --max-connections."""
    srv = make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
                      "--timeout", "60", "--max-connections", "600",
                      "--max-connections-per-ip", "600")
    pid = srv.proc.pid
    partial = []
    try:
        for _ in range(500):
            raw = connect(srv)
            raw.send(b"PROXY TCP4 198.51.100.1 ")
            partial.append(raw)
        assert wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) >= 500, timeout=20)
        # Looking again every 10 ms cost about a fifth of a core here, every
        # second.  Without it, a second comes that costs next to nothing, once
        # the first reads of the 500 are done, however late a busy machine
        # lets the server do them.
        samples = []
        for _ in range(6):
            before, started = cpu_seconds(pid), time.monotonic()
            time.sleep(1.0)  # the sample itself, not a wait for an event
            samples.append((cpu_seconds(pid) - before) / (time.monotonic() - started))
            if samples[-1] < 0.05:
                break
        assert min(samples) < 0.05, \
            f"server CPU {', '.join(f'{s:.0%}' for s in samples)} while 500 headers wait"
        # Over --max-connections (600) waiting: closed without a byte.
        extra = [connect(srv) for _ in range(100)]
        over = connect(srv)
        over.send(b"PROXY ")
        assert over.closed(timeout=10) and over.buf == b""
        assert wait_until(lambda: "already wait for their PROXY header" in srv.log(), 10)
        for raw in extra:
            raw.close()
    finally:
        for raw in partial:
            raw.close()
    # Each ended with its client, long before --timeout 60.
    assert wait_until(lambda: srv.log().count("connection closed before a complete header")
                      >= 500, timeout=20), srv.log()[-2000:]


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one-process", "workers"])
def test_connection_rate_per_address(make_server, workers):
    """docs/limits.md "Limits and abuse": past --max-connection-rate-per-ip new connections from
    one address (counted across workers) get 421 at once; other addresses, and clients on
    this machine (a balancer's LOCAL health checks), are not held back."""
    srv = make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
                      "--max-connection-rate-per-ip", "3/1m", *workers)
    if workers:
        assert wait_until(lambda: srv.log().count("accepting on") == 2), srv.log()

    def greeting(header):
        raw = connect(srv)
        raw.send(header)
        code, lines = raw.reply()
        raw.close()
        return code, lines

    for n in range(3):
        assert greeting(v2("198.51.100.9", "192.0.2.25", 40000 + n, 587))[0] == 220
    code, lines = greeting(v2("198.51.100.9", "192.0.2.25", 40009, 587))
    assert code == 421 and lines[0] == "421 4.7.0 Too many new connections from your " \
        "address, try again later", lines
    assert greeting(v2("198.51.100.10", "192.0.2.25", 40000, 587))[0] == 220
    local = proxy.V2_SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00"
    assert [greeting(local)[0] for _ in range(6)] == [220] * 6
