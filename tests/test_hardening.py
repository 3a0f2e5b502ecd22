"""Abuse and resource limits, and hostile programs (docs/configuration.md "Configuration" limits, §3, §4, §5, §7).

Every test here plays a client or a program that misbehaves on purpose and then
checks that the server answers within a bounded time, keeps its memory, file
descriptors and children in check, and goes on serving everyone else.
"""

import os
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import threading
import time

import pytest

from conftest import (AUTH, HOSTNAME, PASSWORD, PROGRAMS, RECORD, USER, Raw, ServerProcess,
                      b64, free_port, lent_to_one_test, plain_token, shared_by_the_module,
                      wait_until)

HOSTILE = os.path.join(PROGRAMS, "hostile")
ENV_DUMP = os.path.join(PROGRAMS, "env-dump")
MB = 1024 * 1024
# What every line the server logs starts with (log.py's format).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


# --- looking at the server process from outside ------------------------------

def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    """Restart the VmHWM high-water mark, so a transient spike is seen too."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb(pid: int, peak_was_reset: bool) -> int:
    return status_kb(pid, "VmHWM" if peak_was_reset else "VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_state(pid: int):
    """(state, ppid) from /proc/PID/stat, or None when the pid does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[0], int(fields[1])


def zombie_children(pid: int):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_state(int(entry))
            if st and st[0] == "Z" and st[1] == pid:
                found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    """The process no longer runs: it does not exist, or is a zombie awaiting its reaper."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    st = proc_state(pid)
    return st is None or st[0] in ("Z", "X")


def sessions_settled(srv, since: int = 0, at_least: int = 0) -> bool:
    """At least `at_least` sessions opened after log offset `since`, and each has
    logged its end (a session the server has not logged yet is not seen)."""
    text = srv.log()[since:]
    opened = set(re.findall(r"(?m)\[([0-9a-f]{12})\] .*: connected(?: \(implicit TLS\))?$", text))
    ended = set(re.findall(r"(?m)\[([0-9a-f]{12})\] .*: disconnected: ", text))
    return len(opened) >= at_least and opened <= ended


# --- clients -----------------------------------------------------------------

def login(srv, user=USER, password=PASSWORD, timeout=20) -> Raw:
    raw = srv.raw(timeout=timeout)
    raw.login(srv.tls_context(), user, password)
    return raw


def raw_from(srv, source: str, timeout=10) -> Raw:
    return Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=timeout,
                                        source_address=(source, 0)))


def transaction(raw, mail_from="someone@example.test", rcpts=("rcpt@example.test",)):
    raw.start_data(mail_from, rcpts)


def send_message(raw, mail_from="someone@example.test", body=b"Subject: hi\r\n\r\nhello\r\n",
                 rcpts=("rcpt@example.test",)):
    return raw.send_message(body, mail_from, rcpts)


def rst_close(sock) -> None:
    """Close with a TCP RST instead of a FIN: the client vanishes abruptly."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def client_hello() -> bytes:
    """The first flight of a real TLS client, to cut short on purpose."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class Drip(threading.Thread):
    """A slow-drip client: one byte every `interval` s until the server answers or closes."""

    def __init__(self, sock, payload=b"x", interval=0.5, limit=25.0):
        super().__init__(daemon=True)
        self.sock, self.payload, self.interval, self.limit = sock, payload, interval, limit
        self.started = self.reply_at = self.eof_at = None
        self.sent = 0
        self.received = b""

    def run(self):
        self.sock.settimeout(self.interval)
        self.started = time.monotonic()
        while time.monotonic() - self.started < self.limit:
            if self.reply_at is None:
                try:
                    self.sock.sendall(self.payload[self.sent % len(self.payload):][:1])
                    self.sent += 1
                except OSError:
                    pass
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:  # a reset or a TLS-level EOF: closed all the same
                chunk = b""
            now = time.monotonic()
            if not chunk:
                self.eof_at = now
                return
            self.received += chunk
            if self.reply_at is None:
                self.reply_at = now


def started_server(tmp_path_factory, certs, name, *args) -> ServerProcess:
    return ServerProcess(str(tmp_path_factory.mktemp(name)), certs, args).start()


@pytest.fixture(scope="module")
def drip_server(tmp_path_factory, certs):
    srv = started_server(tmp_path_factory, certs, "drip", "--timeout", "2", "--data-timeout", "3")
    yield from shared_by_the_module(srv)


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, certs):
    # Long enough for a Python program that writes 10 MB of stderr, or starts a
    # child, on a busy machine; the timeout test waits for it once.
    srv = started_server(tmp_path_factory, certs, "hostile", "--process", HOSTILE,
                         "--process-timeout", "5")
    yield from shared_by_the_module(srv)


@pytest.fixture
def hostile(hostile_server):
    yield from lent_to_one_test(hostile_server)
    assert wait_until(lambda: not zombie_children(hostile_server.proc.pid), 5), \
        f"zombie children: {zombie_children(hostile_server.proc.pid)}"


@pytest.fixture(scope="module")
def debug_server_module(tmp_path_factory, certs):
    srv = started_server(tmp_path_factory, certs, "debug", "--log-level", "debug",
                         "--process", ENV_DUMP, "--auth-timeout", "2")
    yield from shared_by_the_module(srv)


@pytest.fixture
def debug_server(debug_server_module):
    yield from lent_to_one_test(debug_server_module)
    log = debug_server_module.log()
    # splitlines() breaks at every separator a reader or terminal may honour (CR, NEL, U+2028...).
    split = [l for l in log.splitlines() if l and not LOG_LINE.match(l)]
    assert not split, f"log lines not starting with a timestamp: {split[:5]}"


def hostile_records(srv):
    return srv.runs("hostile")


# === Abuse and resource limits ===============================================

def test_slow_drip_command_line_and_tls_handshake_cut_off(drip_server):
    """docs/dialogue.md "The dialogue" idle timeout: a command line or TLS handshake dripped byte by byte ends at --timeout."""
    srv = drip_server
    srv.clear_runs()
    line = srv.raw()
    assert line.reply()[0] == 220
    line.send("NOOP ")
    handshake = srv.raw()
    assert handshake.reply()[0] == 220
    assert handshake.cmd("EHLO drip.test")[0] == 250
    assert handshake.cmd("STARTTLS")[0] == 220
    drips = [Drip(line.sock), Drip(handshake.sock, client_hello())]
    for d in drips:
        d.start()

    # Another client is served normally meanwhile: its greeting and EHLO come
    # back while both drips are still going.
    time.sleep(0.3)
    normal = srv.raw()
    assert normal.reply()[0] == 220
    assert normal.cmd("EHLO normal.test")[0] == 250
    served_at = time.monotonic()
    normal.starttls(srv.tls_context())
    assert normal.cmd("EHLO normal.test")[0] == 250
    assert normal.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    assert send_message(normal, "normal@example.test")[0] == 250
    normal.close()

    for d in drips:
        d.join(30)
        assert not d.is_alive()
    cmd_drip, tls_drip = drips
    assert cmd_drip.eof_at is not None and tls_drip.eof_at is not None, \
        (cmd_drip.received, tls_drip.received)
    assert cmd_drip.started < served_at < cmd_drip.eof_at
    assert served_at < tls_drip.eof_at
    # --timeout 2 bounds the whole line, however steadily the bytes arrive.
    assert cmd_drip.received.startswith(b"421 4.4.2 "), cmd_drip.received
    assert cmd_drip.sent >= 3
    assert 1.5 <= cmd_drip.reply_at - cmd_drip.started <= 6.0
    assert cmd_drip.eof_at - cmd_drip.reply_at <= 3.0
    # The handshake gets --timeout too; no plaintext reply is owed inside TLS.
    assert tls_drip.sent >= 3
    assert 1.5 <= tls_drip.eof_at - tls_drip.started <= 6.0
    assert [r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs()] == ["normal@example.test"]


def test_timeouts_bound_each_wait_not_the_session(drip_server):
    """docs/dialogue.md "The dialogue": --timeout bounds each wait for a line and --data-timeout each
    DATA phase; a session that is never idle that long is never cut, however long it lasts."""
    srv = drip_server  # --timeout 2, --data-timeout 3
    srv.clear_runs()
    client = login(srv)
    # Each wait well inside its bound, so that a busy machine's delays in
    # this client cannot push one past it; together they are well beyond.
    for _ in range(5):  # 3 s of waits in all, each 0.6 s
        time.sleep(0.6)
        assert client.cmd("NOOP")[0] == 250
    for n in range(3):  # 3.6 s of DATA in all, each phase 1.2 s of two 0.6 s waits
        transaction(client, f"long{n}@example.test")
        client.send("Subject: long\r\n\r\n")
        time.sleep(0.6)
        client.send("hello\r\n")
        time.sleep(0.6)
        client.send(".\r\n")
        assert client.reply()[0] == 250
    assert client.cmd("QUIT")[0] == 221
    assert [r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs()] == \
        ["long0@example.test", "long1@example.test", "long2@example.test"]


def test_slow_drip_data_cut_off_at_data_timeout(drip_server):
    """docs/dialogue.md "The dialogue": a DATA phase dripped slower than --data-timeout gets 421 4.4.2 and no program run."""
    srv = drip_server
    srv.clear_runs()
    victim = login(srv)
    # Logged in before the drip: on a busy machine the auth program's start
    # alone can take a good part of the 3 s the drip lasts.
    normal = login(srv)
    transaction(victim, "drip@example.test")
    victim.send("Subject: drip\r\n\r\n")
    # Each byte comes well within --timeout 2; only the whole-phase deadline can end it.
    drip = Drip(victim.sock)
    drip.start()

    time.sleep(0.3)
    assert normal.cmd("NOOP")[0] == 250
    served_at = time.monotonic()
    assert send_message(normal, "normal@example.test")[0] == 250
    normal.close()

    drip.join(30)
    assert not drip.is_alive()
    assert drip.eof_at is not None, drip.received
    assert served_at < drip.eof_at
    assert drip.received.startswith(b"421 4.4.2 "), drip.received
    assert 2.4 <= drip.reply_at - drip.started <= 8.0
    assert drip.eof_at - drip.reply_at <= 3.0
    time.sleep(0.5)
    assert [r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs()] == ["normal@example.test"]


def test_client_silent_in_data_is_cut_at_timeout(make_server):
    """docs/dialogue.md "The dialogue": a client that goes silent in the middle of DATA gets
    421 4.4.2 at --timeout (2 s), not only at --data-timeout (30 s), and no program runs."""
    srv = make_server("--timeout", "2", "--data-timeout", "30")
    client = login(srv)
    transaction(client, "silent@example.test")
    client.send("Subject: silent\r\n\r\none line, then nothing\r\n")
    started = time.monotonic()
    code, lines = client.reply()
    waited = time.monotonic() - started
    assert lines[0].startswith("421 4.4.2 "), lines
    assert 1.5 <= waited < 15, waited
    assert client.closed(timeout=5)
    assert wait_until(lambda: "disconnected: timed out" in srv.log(), 5)
    assert srv.runs() == []


def test_stranger_silent_in_data_gets_busy_timeout(make_server):
    """docs/limits.md "Limits and abuse" busy timeout: without --require-auth, strangers that stall
    in DATA while the server is nearly full are cut at --busy-timeout, like idle ones."""
    srv = make_server("--no-require-auth", "--max-connections", "4", "--timeout", "60",
                      "--busy-timeout", "1")
    stalled = []
    for n in range(3):
        raw = srv.raw(timeout=30)
        raw.hello(srv.tls_context())
        transaction(raw, f"stranger{n}@example.test")
        raw.send("Subject: stalled\r\n\r\n")
        stalled.append(raw)
    # The fourth of four slots, logged in: it is no stranger, and it keeps
    # the server over three quarters full while the strangers wait.
    member = login(srv, timeout=30)
    started = time.monotonic()
    for raw in stalled:
        code, lines = raw.reply()
        assert lines[0].startswith("421 4.4.2 "), lines
    # --timeout 60: only the busy timeout can have ended them this soon.
    assert time.monotonic() - started < 30
    assert member.cmd("NOOP")[0] == 250
    assert srv.runs() == []


def _refused_at_once(raw) -> None:
    started = time.monotonic()
    code, lines = raw.reply()
    assert code == 421, lines
    assert lines[0].startswith("421 4.7.0 "), lines
    assert time.monotonic() - started < 2.0
    assert raw.closed(3)


def _greeted(connect) -> bool:
    raw = connect()
    try:
        return raw.reply()[0] == 220
    finally:
        raw.close()


def test_max_connections(make_server):
    """docs/configuration.md "Configuration" --max-connections: one over gets 421 at once and is closed; a freed slot is reused."""
    smtps = str(free_port())
    # At DEBUG, where the start-up probe's lines are: it connects and closes,
    # as a health check does (docs/logging.md "Logging").
    srv = make_server("--max-connections", "5", "--smtps-port", smtps, "--log-level", "debug")
    # The start-up probe of the port is a session too; it must hold no slot.
    assert wait_until(lambda: sessions_settled(srv, at_least=1), 10)
    held = [srv.raw() for _ in range(5)]
    for raw in held:
        assert raw.reply()[0] == 220
    _refused_at_once(srv.raw())
    # On the implicit-TLS port a plaintext 421 would be garbage: closed silently.
    tls_port = Raw(socket.create_connection(("127.0.0.1", int(smtps)), timeout=5))
    assert tls_port.closed(3) and tls_port.buf == b""
    for raw in held:
        assert raw.cmd("NOOP")[0] == 250

    assert held[0].cmd("QUIT")[0] == 221
    held[0].close()
    # The freed slot is taken by exactly one new client; the next is refused again.
    replacement = None
    deadline = time.monotonic() + 10
    while replacement is None and time.monotonic() < deadline:
        raw = srv.raw()
        if raw.reply()[0] == 220:
            replacement = raw
        else:
            raw.close()
            time.sleep(0.1)
    assert replacement is not None, "no new client accepted after one left"
    _refused_at_once(srv.raw())
    for raw in held[1:] + [replacement]:
        raw.close()


def test_max_connections_per_ip(make_server):
    """docs/configuration.md "Configuration" --max-connections-per-ip: counted per client address, 421 at once when over."""
    # At DEBUG, where the start-up probe's lines are (a health check's).
    srv = make_server("--max-connections-per-ip", "3", "--log-level", "debug")
    # The start-up probe of the port is a session too; it must hold no slot.
    assert wait_until(lambda: sessions_settled(srv, at_least=1), 10)
    one = [raw_from(srv, "127.0.0.1") for _ in range(3)]
    for raw in one:
        assert raw.reply()[0] == 220
    _refused_at_once(raw_from(srv, "127.0.0.1"))
    # Another address has its own three.
    two = [raw_from(srv, "127.0.0.2") for _ in range(3)]
    for raw in two:
        assert raw.reply()[0] == 220
    _refused_at_once(raw_from(srv, "127.0.0.2"))

    assert one[0].cmd("QUIT")[0] == 221
    one[0].close()
    assert wait_until(lambda: _greeted(lambda: raw_from(srv, "127.0.0.1")), 10)
    for raw in one[1:] + two:
        assert raw.cmd("NOOP")[0] == 250
        raw.close()


def test_ten_errors_close_the_session(server):
    """docs/dialogue.md "The dialogue": the 10th protocol error gets its reply, then 421 4.7.0 and close."""
    raw = server.raw()
    assert raw.reply()[0] == 220
    errors = [("FOO", 502), ("MAIL FROM:<a@example.test>", 503), ("EHLO", 501),
              ("RCPT TO:<a@example.test>", 503), ("DATA", 503), (b"\xff\xfe NOOP", 500),
              ("NOOP " + "x" * 600, 500), ("VRFY", 501), ("RSET now", 501)]
    for line, code in errors:
        raw.send(line + (b"\r\n" if isinstance(line, bytes) else "\r\n"))
        assert raw.reply()[0] == code, line
    # Nine errors: still talking.
    assert raw.cmd("NOOP")[0] == 250
    assert raw.cmd("BAR")[0] == 502
    code, lines = raw.reply()
    assert code == 421 and lines[0].startswith("421 4.7.0 "), lines
    assert raw.closed(3)


@pytest.mark.parametrize("request_line", ["GET / HTTP/1.1", "POST /x HTTP/1.1",
                                          "CONNECT a:25 HTTP/1.1"])
def test_http_request_closed_without_reply(server, request_line):
    """docs/dialogue.md "The dialogue": an HTTP request line is closed at once, nothing echoed back."""
    raw = server.raw()
    assert raw.reply()[0] == 220
    raw.send(f"{request_line}\r\nHost: a\r\nContent-Length: 5\r\n\r\nQUIT\r\n")
    assert raw.closed(3)
    assert raw.buf == b""


def test_huge_line_without_crlf_bounded(server):
    """docs/dialogue.md "The dialogue" line limit: a 24 MB line gets 500 5.5.2, the session goes on, memory stays flat."""
    pid = server.proc.pid
    raw = server.raw(timeout=60)
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    base = status_kb(pid, "VmRSS")
    was_reset = reset_peak(pid)
    raw.send(b"NOOP ")
    chunk = b"a" * MB
    for _ in range(24):
        raw.send(chunk)
    raw.send(b"\r\nNOOP\r\n")
    code, lines = raw.reply()
    assert code == 500 and lines[0].startswith("500 5.5.2 "), lines
    assert raw.reply()[0] == 250
    assert raw.cmd("NOOP")[0] == 250
    grown = peak_kb(pid, was_reset) - base
    assert grown < 20 * 1024, f"server memory grew by {grown} kB"


def test_five_thousand_pipelined_commands(server):
    """RFC 2920 / docs/dialogue.md "The dialogue" PIPELINING: 5000 EHLOs in one write get 5000 replies, no deadlock.

    EHLO rather than NOOP: past 100 NOOPs the junk-command limit ends the
    session (test_abuse.py), and each EHLO reply is larger than its command,
    so the server must keep writing while the client is still sending."""
    raw = server.raw(timeout=60)
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    got = []

    def read_all():
        for _ in range(5000):
            code, lines = raw.reply()
            if code is None:
                return
            got.append(lines[-1])

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    raw.sock.sendall(b"EHLO client.test\r\n" * 5000)
    reader.join(90)
    assert not reader.is_alive(), f"only {len(got)} replies"
    assert len(got) == 5000 and set(got) == {"250 STARTTLS"}
    assert raw.cmd("NOOP")[0] == 250


def test_auth_line_of_twelve_kilobytes(server):
    """docs/dialogue.md "The dialogue" / RFC 4954 §4: an AUTH line up to 12288 octets is handled, not refused as too long."""
    user = "u" * 9196
    line = f"AUTH PLAIN {plain_token(user)}"
    assert 12000 < len(line) + 2 <= 12288
    raw = server.raw(timeout=20)
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    raw.starttls(server.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    assert raw.cmd(line)[0] == 235
    assert send_message(raw)[0] == 250
    assert [r["argv"][-1] for r in server.runs()] == [user]

    # The same length as a LOGIN response line (RFC 4954 §4 challenge reply).
    other = "v" * 9200
    raw = server.raw(timeout=20)
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    raw.starttls(server.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    assert raw.cmd("AUTH LOGIN")[0] == 334
    assert len(b64(other)) + 2 > 12000
    assert raw.cmd(b64(other))[0] == 334
    assert raw.cmd(b64(PASSWORD))[0] == 235
    # Past the allowance it is a long line again, and the session goes on.
    code, lines = raw.cmd("AUTH PLAIN " + "A" * 13000)
    assert code == 500 and lines[0].startswith("500 5.5.2 "), lines
    assert raw.cmd("NOOP")[0] == 250


def test_hundred_megabytes_over_the_limit(make_server):
    """docs/dialogue.md "The dialogue" size limit: 100 MB over --max-message-size 1 MiB gets 552 5.3.4 after the dot, no run."""
    srv = make_server("--max-message-size", "1048576")
    pid = srv.proc.pid
    raw = login(srv, timeout=120)
    transaction(raw, "big@example.test")
    base = status_kb(pid, "VmRSS")
    was_reset = reset_peak(pid)
    chunk = (b"x" * 998 + b"\r\n") * 1048
    for _ in range(100):
        raw.send(chunk)
    # Nothing is said before the real end of the data.
    assert not raw.closed(0.5) and raw.buf == b""
    raw.sock.settimeout(60)
    raw.send(b".\r\n")
    code, lines = raw.reply()
    assert code == 552 and lines[0].startswith("552 5.3.4 "), lines
    grown = peak_kb(pid, was_reset) - base
    assert grown < 40 * 1024, f"server memory grew by {grown} kB"
    assert srv.runs() == []
    assert raw.cmd("NOOP")[0] == 250


def test_line_without_lf_in_data_is_spooled_not_buffered(hostile):
    """docs/process-program.md "The process program" spooling: a 16 MiB body line without LF reaches the program whole; memory stays flat."""
    pid = hostile.proc.pid
    raw = login(hostile, timeout=60)
    transaction(raw, "plain@example.test")
    base = status_kb(pid, "VmRSS")
    was_reset = reset_peak(pid)
    raw.send(b"Subject: long\r\n\r\n")
    chunk = b"y" * MB
    for _ in range(16):
        raw.send(chunk)
    raw.send(b"\r\n.\r\n")
    assert raw.reply()[0] == 250
    grown = peak_kb(pid, was_reset) - base
    assert grown < 20 * 1024, f"server memory grew by {grown} kB"
    (rec,) = hostile_records(hostile)
    assert 0 < rec["stdin_len"] - (16 * MB + 19) < 1000  # plus the Received header


# --- many abusive sessions in a row ------------------------------------------

def _connect_and_close(srv, rng):
    socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()


def _random_bytes(srv, rng):
    raw = srv.raw(timeout=5)
    raw.reply()
    raw.send(rng.randbytes(rng.randint(1, 4096)))
    raw.close()


def _half_open_tls(srv, rng, hello=client_hello()):
    raw = srv.raw(timeout=5)
    raw.reply()
    assert raw.cmd("EHLO abuse.test")[0] == 250
    assert raw.cmd("STARTTLS")[0] == 220
    raw.send(hello[:rng.randint(1, len(hello) - 1)])
    if rng.random() < 0.5:
        rst_close(raw.sock)
    else:
        raw.close()


def _rst_mid_data(srv, rng):
    raw = login(srv)
    transaction(raw, "vanish@example.test")
    raw.send(b"Subject: gone\r\n\r\n" + b"z" * rng.randint(0, 200000))
    rst_close(raw.sock)


def _garbage_base64(srv, rng):
    raw = srv.raw(timeout=5)
    raw.reply()
    assert raw.cmd("EHLO abuse.test")[0] == 250
    raw.starttls(srv.tls_context())
    assert raw.cmd("EHLO abuse.test")[0] == 250
    junk = "".join(rng.choice("!#%&()*,-.:;?@[]^_{}~") for _ in range(rng.randint(2, 300)))
    assert raw.cmd(f"AUTH PLAIN {junk}")[0] == 501
    assert raw.cmd("AUTH LOGIN")[0] == 334
    assert raw.cmd(junk)[0] == 501
    raw.close()


def _pipelined_then_rst(srv, rng):
    raw = srv.raw(timeout=5)
    raw.send(b"NOOP\r\n" * rng.randint(10, 3000) + b"EHLO abuse.test\r\nMAIL FROM:<a@b>\r\n")
    rst_close(raw.sock)


ABUSES = [_connect_and_close, _random_bytes, _half_open_tls, _rst_mid_data, _garbage_base64,
          _pipelined_then_rst]


def test_two_hundred_abusive_sessions_leave_no_trace(make_server):
    """docs/dialogue.md "The dialogue", docs/logging.md "Logging": after 200 hostile sessions the server serves, with fds, memory and children back."""
    srv = make_server("--auth", shutil.which("true"), "--timeout", "10")
    pid = srv.proc.pid
    rng = random.Random(20240501)
    # Warm up every path once so lazily created state counts in the baseline.
    assert send_message(login(srv))[0] == 250
    for abuse in ABUSES:
        abuse(srv, rng)
    assert wait_until(lambda: sessions_settled(srv), 20)
    time.sleep(0.5)
    base_fds, base_rss = fd_count(pid), status_kb(pid, "VmRSS")
    srv.clear_runs()

    for i in range(200):
        ABUSES[i % len(ABUSES)](srv, rng)

    assert wait_until(lambda: sessions_settled(srv), 30), "sessions still open"
    assert wait_until(lambda: fd_count(pid) <= base_fds + 5, 10), \
        f"fds: {base_fds} before, {fd_count(pid)} after: {sorted(os.listdir(f'/proc/{pid}/fd'))}"
    grown = status_kb(pid, "VmRSS") - base_rss
    assert grown < 30 * 1024, f"server memory grew by {grown} kB"
    assert zombie_children(pid) == []
    # A client that vanished mid-DATA never caused a run; a real client still gets 250.
    assert srv.runs() == []
    assert send_message(login(srv), "after@example.test")[0] == 250
    assert [r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs()] == ["after@example.test"]
    assert "Traceback" not in srv.log()


def test_max_connections_beyond_the_open_file_limit_is_lowered_to_fit(make_server):
    """docs/limits.md "Limits and abuse": a --max-connections the open file limit cannot hold
    (200 descriptors: 34 clients) is lowered to fit, with a warning, so the server still
    gets three quarters full and strangers get the busy timeout instead of --timeout."""
    srv = make_server("--busy-timeout", "1", "--timeout", "60",
                      "--max-connections-per-ip", "1000", start=False)
    srv.argv = ["prlimit", "--nofile=200:200", "--"] + srv.argv
    srv.start()
    assert "--max-connections 1000 lowered to 34: the open file limit (200)" in srv.log()
    held = [srv.raw(timeout=30) for _ in range(30)]  # over three quarters of 34
    try:
        for raw in held:
            assert raw.reply()[0] == 220
        # --timeout 60: only the busy timeout cuts anyone this soon.
        cut = []
        deadline = time.monotonic() + 20
        while not cut and time.monotonic() < deadline:
            for raw in held:
                raw.sock.settimeout(0.05)
                try:
                    code, lines = raw.reply()
                except socket.timeout:
                    continue
                cut.append(lines)
        assert cut and cut[0][0].startswith("421 4.4.2"), cut
    finally:
        for raw in held:
            raw.close()


def test_descriptor_exhaustion_is_survived_quietly(make_server):
    """docs/process-program.md "The process program", docs/logging.md "Logging": out of descriptors: 451 for a program that cannot start, no traceback, then service resumes."""
    srv = make_server("--max-connections-per-ip", "100")
    pid = srv.proc.pid
    sender = login(srv)
    time.sleep(0.3)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid) + 8, hard))
    held = []
    try:
        # More clients than descriptors left: the rest wait in the listen backlog.
        held = [srv.raw(timeout=5) for _ in range(20)]
        assert wait_until(lambda: fd_count(pid) >=
                          resource.prlimit(pid, resource.RLIMIT_NOFILE)[0] - 1, 15)
        code, lines = send_message(sender)
        assert code == 451 and lines[0].startswith("451 4.3.0 "), lines
    finally:
        for raw in held:
            raw.close()
        sender.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert send_message(login(srv), "after@example.test")[0] == 250
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]
    split = [l for l in log.splitlines() if l and not LOG_LINE.match(l)]
    assert not split, split[:5]


def test_client_that_never_reads_is_cut_off(drip_server):
    """docs/dialogue.md "The dialogue" --timeout: a client that pipelines without reading replies cannot pin a session."""
    srv = drip_server
    raw = srv.raw(timeout=30)
    assert raw.reply()[0] == 220
    started = time.monotonic()
    raw.sock.settimeout(0.5)
    failed = stalled_at = None
    # Far more replies than socket buffers hold, and we never read one; a
    # send that finds no room means the server has stopped reading us.
    while failed is None and time.monotonic() - started < 40:
        try:
            raw.sock.sendall(b"EHLO x\r\n" * 40000)
        except (ConnectionResetError, BrokenPipeError) as e:
            failed = e
        except socket.timeout:
            stalled_at = stalled_at or time.monotonic()
    assert failed is not None, "the server kept reading a client that reads nothing"
    # The server stopped reading before our sends stalled, and lets us go at
    # --timeout (2 s) from then: not 5 s later for the 421 it cannot send.
    assert stalled_at is not None
    assert time.monotonic() - stalled_at < 6, time.monotonic() - stalled_at
    raw.close()
    assert send_message(login(srv))[0] == 250


def _fill_without_reading(socks, seconds=15.0) -> int:
    """Pipeline EHLOs on every socket, never reading a reply, until the server
    stops taking them on each (its replies have filled the socket buffers)."""
    chunk = b"EHLO x\r\n" * 8192
    sent = 0
    for sock in socks:
        sock.setblocking(False)
    deadline = time.monotonic() + seconds
    quiet_rounds = 0
    while quiet_rounds < 3 and time.monotonic() < deadline:
        moved = 0
        for sock in socks:
            try:
                moved += sock.send(chunk)
            except BlockingIOError:
                pass
        sent += moved
        quiet_rounds = quiet_rounds + 1 if moved == 0 else 0
        time.sleep(0.2)
    return sent


def test_clients_that_pipeline_and_never_read_hold_little_memory(make_server):
    """SECURITY.md: a client that pipelines commands and never reads the replies
    pins a few KiB of server memory, not its replies: the server stops reading
    its commands while unsent replies pass a small bound.  100 such clients."""
    srv = make_server("--timeout", "60", "--max-connections-per-ip", "200")
    pid = srv.proc.pid
    # Warm up: the same abuse once, so lazily made state is in the baseline.
    warm = [srv.raw().sock for _ in range(5)]
    _fill_without_reading(warm)
    for sock in warm:
        sock.close()
    assert wait_until(lambda: sessions_settled(srv), 20)
    time.sleep(0.5)
    base_rss = status_kb(pid, "VmRSS")

    socks = [srv.raw().sock for _ in range(100)]
    try:
        sent = _fill_without_reading(socks)
        time.sleep(1.0)
        grown = status_kb(pid, "VmRSS") - base_rss
        print(f"\n{sent // 1024} KiB of commands sent, server RSS +{grown} KiB "
              f"({grown / 100:.1f} KiB per client)")
        assert grown / 100 < 64, f"{grown / 100:.1f} KiB per client"
        # Still serving everyone else.
        assert send_message(login(srv))[0] == 250
    finally:
        for sock in socks:
            sock.close()


# === The two programs =========================================================

def test_value_exec_cannot_take_is_a_program_that_cannot_start():
    """SECURITY.md: a NUL in a program's argument or variable (exec cannot take
    one) is "cannot start", never an exception that leaks the run's pipes."""
    from ssmtpd import programs
    programs.run(["/bin/true"], {}, timeout=5)  # the event loop's own descriptors, once
    before = fd_count(os.getpid())
    for argv, env in [(["/bin/true"], {"X": "a\0b"}), (["/bin/true", "a\0b"], {})] * 10:
        outcome = programs.run(argv, env, timeout=5)
        assert outcome.status == programs.NOT_STARTED, outcome
    assert fd_count(os.getpid()) == before


def _timed_message(raw, mail_from, body):
    transaction(raw, mail_from)
    raw.send(body)
    started = time.monotonic()
    raw.send(b".\r\n")
    code, lines = raw.reply()
    return code, lines, time.monotonic() - started


def test_slow_program_does_not_stall_other_clients(server):
    """docs/index.md (gevent): while one message's program runs, another client logs in and is answered."""
    busy = login(server)
    transaction(busy, "sleep4@example.test")
    busy.send(b"Subject: slow\r\n\r\nx\r\n.\r\n")
    time.sleep(0.3)
    other = login(server)
    assert send_message(other, "quick@example.test")[0] == 250
    # The quick message was answered while the slow program still ran.
    busy.sock.settimeout(0.1)
    assert not busy.closed(0.1) and busy.buf == b""
    busy.sock.settimeout(20)
    assert busy.reply()[0] == 250
    assert sorted(r["env"]["SSMTPD_MAIL_FROM"] for r in server.runs()) == \
        ["quick@example.test", "sleep4@example.test"]


@pytest.mark.parametrize("size,local,code", [
    (25 * MB - 100, "noread0", 250),  # spooled to a file: handed over as stdin itself
    (400 * 1024, "noread0", 250),  # in memory: fed through a pipe the program never reads
    (400 * 1024, "noread75", 451),
    (400 * 1024, "noread3", 554),
])
def test_program_that_does_not_read_its_message(hostile, size, local, code):
    """docs/process-program.md "The process program" exit table: a program exiting without reading stdin is judged by its exit code alone."""
    raw = login(hostile, timeout=60)
    body = b"Subject: unread\r\n\r\n" + (b"u" * 98 + b"\r\n") * (size // 100)
    got, lines, seconds = _timed_message(raw, f"{local}@example.test", body)
    assert got == code, lines
    assert seconds < 30
    assert [r["mode"] for r in hostile_records(hostile)] == [local]
    assert raw.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("local", ["flood", "blankflood"])
def test_stderr_flood_is_capped_in_the_log(hostile, local):
    """docs/process-program.md "The process program", docs/logging.md "Logging": 10 MB of stderr before reading: 250, the message whole, the log grows by < 256 KiB."""
    raw = login(hostile)
    body = b"Subject: flood\r\n\r\n" + b"m" * 98 + b"\r\n" + (b"f" * 98 + b"\r\n") * 3000
    before = os.path.getsize(hostile.log_path)
    code, lines, seconds = _timed_message(raw, f"{local}@example.test", body)
    assert code == 250, lines
    assert seconds < 15
    (rec,) = hostile_records(hostile)
    assert 0 < rec["stdin_len"] - len(body) < 1000  # plus the Received header
    hostile.wait_log('message from="%s@example.test"' % local)
    grown = os.path.getsize(hostile.log_path) - before
    assert grown < 256 * 1024, f"log grew by {grown} bytes for one run"


def test_grandchild_holding_pipes_is_ended_with_the_run(hostile):
    """docs/process-program.md "The process program": the exit code decides at once, and nothing of the run outlives the reply."""
    raw = login(hostile)
    code, lines, seconds = _timed_message(raw, "grandchild@example.test", b"Subject: g\r\n\r\nx\r\n")
    assert code == 250, lines
    assert seconds < 10
    (rec,) = hostile_records(hostile)
    assert rec["stdin_len"] > 0
    assert wait_until(lambda: gone(rec["child"]), 5), f"grandchild {rec['child']} still runs"
    assert gone(rec["pid"])


def test_grandchild_leaving_the_session_does_not_stall_the_reply(hostile):
    """docs/process-program.md "The process program": a setsid grandchild keeping stdout open cannot hold the reply past a short grace."""
    raw = login(hostile)
    rec = None
    try:
        code, lines, seconds = _timed_message(raw, "daemon@example.test", b"Subject: d\r\n\r\nx\r\n")
        (rec,) = hostile_records(hostile)
        assert code == 250, lines
        assert seconds < 15
        assert raw.cmd("NOOP")[0] == 250
    finally:
        rec = rec or next(iter(hostile_records(hostile)), None)
        if rec and rec.get("child") and not gone(rec["child"]):
            os.kill(rec["child"], signal.SIGKILL)


def test_program_ignoring_sigterm_is_killed_at_the_timeout(hostile):
    """docs/process-program.md "The process program": over --process-timeout (5 s) gets 451 4.3.0, and the program and its child are gone."""
    raw = login(hostile)
    code, lines, seconds = _timed_message(raw, "ignoreterm@example.test", b"Subject: t\r\n\r\nx\r\n")
    assert code == 451 and lines[0].startswith("451 4.3.0 "), lines
    assert 4.5 <= seconds < 15
    (rec,) = hostile_records(hostile)
    assert wait_until(lambda: gone(rec["pid"]) and gone(rec["child"]), 5), rec
    assert raw.cmd("NOOP")[0] == 250


# --- what clients say reaches the programs verbatim, never a shell -------------

def test_shell_metacharacters_reach_programs_verbatim(server, tmp_path):
    """docs/configuration.md "Configuration", docs/auth-program.md "The auth program", docs/process-program.md "The process program": no shell: user, HELO, MAIL FROM and RCPT TO arrive byte for byte."""
    marker = tmp_path / "pwned"
    m = str(marker)
    user = f"$(touch {m})`touch {m}`;touch {m}|touch {m}&'q'\"d\"ü名"
    helo = f"$(touch {m});`touch {m}`|'x'\"y\"é"
    mail_from = f"\"$(touch {m});|`touch {m}`'\"@exämple.test"
    # An unquoted space would end the path (501), so these use ${IFS} instead.
    rcpts = [f"$(touch${{IFS}}{m})|;`touch${{IFS}}{m}`'@ü.test", "用户@例子.测试"]
    raw = server.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd(f"EHLO {helo}")[0] == 250
    raw.starttls(server.tls_context())
    assert raw.cmd(f"EHLO {helo}")[0] == 250
    assert raw.cmd(f"AUTH PLAIN {plain_token(user)}")[0] == 235
    code, lines = send_message(raw, mail_from, rcpts=rcpts)
    assert code == 250, lines

    (run,) = server.runs()
    assert run["argv"][1:] == [user]
    env = run["env"]
    assert env["SSMTPD_USERNAME"] == user
    assert env["SSMTPD_HELO"] == helo
    assert env["SSMTPD_MAIL_FROM"] == mail_from
    assert env["SSMTPD_RCPT_TO"] == "\n".join(rcpts)
    assert [a["env"]["SSMTPD_USERNAME"] for a in server.runs("auth")][-1] == user
    time.sleep(0.2)
    assert not marker.exists()


def test_program_value_is_never_given_to_a_shell(make_server, tmp_path):
    """docs/configuration.md "Configuration": --process is split shell-style and run directly, so `;` and `$()` are plain words."""
    marker = tmp_path / "pwned-argv"
    srv = make_server("--process", f"{RECORD} ; touch {marker} $(touch {marker})")
    raw = login(srv)
    assert send_message(raw)[0] == 250
    (run,) = srv.runs()
    assert run["argv"][1:] == [";", "touch", str(marker), "$(touch", f"{marker})", USER]
    assert not marker.exists()


def test_control_bytes_and_bad_utf8_refused(debug_server):
    """docs/dialogue.md "The dialogue", docs/logging.md "Logging": CR, NUL and invalid UTF-8 in commands get 501/500, never a traceback or a split log."""
    srv = debug_server
    raw = srv.raw()
    assert raw.reply()[0] == 220
    for line, code in [(b"EHLO a\x00b", 501), (b"HELO a\rb", 501), (b"EHLO \xff\xfe", 500),
                       (b"NO\x00OP", 502),
                       (b"NOOP x\r2099-01-01T00:00:00.000 ERROR forged", 250),
                       # Line and paragraph separators split lines for many
                       # readers (docs/limits.md "Envelope values that could harm a program").
                       ("EHLO a\u2028b\u2029c".encode(), 501),
                       (b"EHLO client.test", 250)]:
        raw.send(line + b"\r\n")
        assert raw.reply()[0] == code, line
    raw.close()

    raw = srv.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    raw.starttls(srv.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    for response in [b"\0a\0b\0secret", b"\0a\rb\0secret", b"\0a\nb\0secret",
                     b"\0\xff\xfe\0secret", b"\0alice\0sec\0ret"]:
        code, lines = raw.cmd("AUTH PLAIN " + b64(response))
        assert code == 501, (response, lines)
    assert raw.cmd("AUTH LOGIN")[0] == 334
    assert raw.cmd(b64("a\r\nb"))[0] == 334
    assert raw.cmd(b64("secret"))[0] == 501
    raw.send(b"AUTH PLAIN \xff\r\n")
    assert raw.reply()[0] == 500
    # Not a control character, but a line break to many readers: refused.
    assert raw.cmd("AUTH PLAIN " + plain_token("a\u2028b"))[0] == 501
    raw.close()

    raw = login(srv)
    for line, code in [(b"MAIL FROM:<a\rb@example.test>", 501),
                       (b"MAIL FROM:<a\x00b@example.test>", 501),
                       (b"MAIL FROM:<\xff\xfe@example.test>", 500),
                       (b"MAIL FROM:<x@example.test>\rRCPT TO:<y@example.test>", 501),
                       (b"MAIL FROM:<ok@example.test>", 250),
                       (b"RCPT TO:<a\rb@example.test>", 501),
                       (b"RCPT TO:<a\x00b@example.test>", 501),
                       (b"RCPT TO:<\xc3\x28@example.test>", 500),
                       (b"RSET", 250)]:
        raw.send(line + b"\r\n")
        assert raw.reply()[0] == code, line
    assert send_message(raw)[0] == 250
    assert len(srv.runs("envdump")) == 1
    assert "\n2099-" not in srv.log()


def test_c1_control_characters_in_username_refused(debug_server):
    """docs/auth-program.md "The auth program" table: the login name has no control characters, C1 (NEL, CSI) included."""
    for name in ["a\x85b", "a\x9b31mb"]:
        raw = debug_server.raw()
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(debug_server.tls_context())
        assert raw.cmd("EHLO client.test")[0] == 250
        code, lines = raw.cmd("AUTH PLAIN " + plain_token(name))
        assert code == 501, (name, lines)
        raw.close()


# --- the password, on every path ----------------------------------------------

def test_password_never_leaks_on_failure_paths(debug_server):
    """docs/auth-program.md "The auth program", docs/logging.md "Logging": at debug level no failure path puts the password in a log line, argv or env."""
    srv = debug_server
    since = len(srv.log())
    tag = os.urandom(4).hex()
    used = []

    def pw(name):
        used.append(f"Pw-{name}-{tag}")
        return used[-1]

    def tls_session():
        raw = srv.raw(timeout=20)
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(srv.tls_context())
        assert raw.cmd("EHLO client.test")[0] == 250
        return raw

    # bad base64 in the initial response and in a LOGIN password reply
    raw = tls_session()
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, pw('b64a'))}!")[0] == 501
    assert raw.cmd(f"AUTH LOGIN {b64(USER)}")[0] == 334
    assert raw.cmd(b64(pw("b64b")) + "*")[0] == 501
    # cancel after the password was typed as the user name
    assert raw.cmd("AUTH LOGIN")[0] == 334
    assert raw.cmd(b64(pw("cancel")))[0] == 334
    assert raw.cmd("*")[0] == 501
    raw.close()
    # the auth program's temporary failures and refusals
    for user, code in [("tempfail", 454), ("signal", 454), (USER, 535), ("crash", 535)]:
        raw = tls_session()
        assert raw.cmd(f"AUTH PLAIN {plain_token(user, pw(user))}")[0] == code, user
        raw.close()
    raw = tls_session()
    assert raw.cmd(f"AUTH LOGIN {b64('noisy')}")[0] == 334
    assert raw.cmd(b64(pw("noisy")))[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, pw('authzid'), authzid='bob')}")[0] == 535
    raw.close()
    # over --auth-timeout: while the program runs, no process shows the password in argv
    raw = tls_session()
    raw.send(f"AUTH PLAIN {plain_token('slow', pw('slow'))}\r\n")
    assert wait_until(lambda: any(a["env"].get("SSMTPD_USERNAME") == "slow"
                                  for a in srv.runs("auth")), 5)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    assert used[-1].encode() not in f.read(), entry
            except OSError:
                pass
    assert raw.reply()[0] == 454
    raw.close()
    # a failed then successful login: the message's program sees none of the passwords
    raw = tls_session()
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, pw('before'))}")[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    assert send_message(raw)[0] == 250
    raw.close()

    (run,) = srv.runs("envdump")
    assert "SSMTPD_PASSWORD" not in run["env"]
    values = "\n".join(run["env"].values()) + "\n".join(run["argv"]) + run["stdin"]
    for p in used + [PASSWORD]:
        assert p not in values
    for a in srv.runs("auth"):
        assert a["argv"] == [AUTH]
    with open(f"/proc/{srv.proc.pid}/environ", "rb") as f:
        assert not any(p.encode() in f.read() for p in used)
    assert wait_until(lambda: sessions_settled(srv, since), 10)
    log = srv.log()
    for p in used + [PASSWORD]:
        # A cut-down copy counts too: the first 12 base64 characters are 9 octets of it.
        for form in (p, b64(p), b64(f"\0{USER}\0{p}"), b64(p)[:12]):
            assert form not in log, (form, [l for l in log.splitlines() if form in l][:3])


def test_password_sent_out_of_turn_is_not_logged(debug_server):
    """docs/logging.md "Logging": a password line the server did not ask for (AUTH refused) is not logged at debug."""
    srv = debug_server
    since = len(srv.log())
    password = f"Pw-stray-{os.urandom(4).hex()}"
    raw = srv.raw()
    assert raw.reply()[0] == 220
    # A client that does not wait for 334 sends its LOGIN replies after a refused AUTH.
    assert raw.cmd("AUTH LOGIN")[0] == 503
    assert raw.cmd(b64(USER))[0] == 502
    assert raw.cmd(b64(password))[0] == 502
    # A tab where the space should be makes the whole line an unknown command.
    assert raw.cmd(f"AUTH\tPLAIN {plain_token(USER, password)}")[0] == 502
    assert raw.cmd("QUIT")[0] == 221
    assert wait_until(lambda: sessions_settled(srv, since), 10)
    log = srv.log()
    for form in (password, b64(password), plain_token(USER, password)):
        assert form not in log, [l for l in log.splitlines() if form in l][:3]
