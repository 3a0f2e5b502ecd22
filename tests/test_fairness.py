"""No client holds back the others (docs/limits.md "Limits and abuse" fairness; docs/limits.md "Limits and abuse").

Flooding clients run in their own processes (tests/flood.py) and keep their
sockets full, while a normal client does a whole STARTTLS + AUTH + message
session and times every reply.  Each reply may come at most REPLY_BOUND later
than the slowest of the same step unloaded.  The bound is generous on purpose
(this machine has two cores shared by the flooders, the server, the programs
and this test); without the defence, a reply waits for the whole flood, which
lasts until the test has measured.

A flood proves something only if it keeps the server busy.  How much one
flooder achieves depends on the machine (a NOOP flooder is cut after 110
commands and spends most of its time reconnecting), so the tests add flooders
until the server has work at least BUSY of the time, and skip when the machine
cannot get there: a slow machine is not a failure of the server.  A slow
reply fails whatever the load: a server that blocks is idle too.
"""

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import HOSTNAME, PASSWORD, PROGRAMS, USER, plain_token, wait_until

FLOOD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flood.py")
AUTH_QUICK = os.path.join(PROGRAMS, "auth-quick")
LOADGEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "bench", "loadgen.py")
# A shell one-liner: a Python program's start-up, on a machine this busy, can
# take longer than REPLY_BOUND by itself, and the server's loop is not what
# decides how long.
BENCH_PROCESS = os.path.join(os.path.dirname(LOADGEN), "programs", "process.sh")
CONNECTED = " -: connected"
ACCEPTED = ": 250, process program"
RAN = "message from="
# Each flooder stops by itself after this, should the test never stop it.
FLOOD_SECONDS = 120.0
# Timed sessions under one flood, and how long they may go on starting.
MEASURE_SESSIONS, MEASURE_SECONDS = 20, 7.0
# Stated in docs/performance.md "Fairness under load": measured worst case here is about 0.05 s.
REPLY_BOUND = 0.5
# A reply later than this is the flood holding the server, not a slow machine.
REPLY_TIMEOUT = 10.0
# The server had work for at least this share of the time: a flood (Busy.share).
BUSY = 0.4
# Under the benchmark's load every reply queues behind fifty other clients'
# work, so its latency scales with the CPU the machine gives the server.  A
# server that waited for a core more than this share of the time it had work
# was measured on an oversubscribed machine (here, at worst about 40% without
# other load): the bound would measure the machine, not the server.
LOAD_STARVED = 0.6
MAX_FLOODERS = 5
SAMPLE_SECONDS = 1.0
MESSAGE_SIZE = 26214400  # the default --max-message-size: each flood message is 552


def timed_session(srv) -> dict:
    """One full submission; the seconds each step waited for its reply."""
    steps = {}
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=REPLY_TIMEOUT)
    buf = b""

    def reply(step):
        nonlocal buf
        started = time.monotonic()
        while True:
            while b"\r\n" not in buf:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    raise AssertionError(f"no reply to {step} within {REPLY_TIMEOUT} s: "
                                         "the flood held the server") from None
                assert chunk, f"server closed during {step}"
                buf += chunk
            line, buf = buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                steps[step] = max(steps.get(step, 0.0), time.monotonic() - started)
                return int(line[:3])

    def cmd(step, line, expect):
        sock.sendall(line.encode() + b"\r\n")
        code = reply(step)
        assert code == expect, (step, code)

    try:
        reply("greeting")
        cmd("EHLO", "EHLO client.test", 250)
        cmd("STARTTLS", "STARTTLS", 220)
        started = time.monotonic()
        try:
            sock = srv.tls_context().wrap_socket(sock, server_hostname=HOSTNAME)
        except socket.timeout:
            raise AssertionError(f"no TLS handshake within {REPLY_TIMEOUT} s: "
                                 "the flood held the server") from None
        steps["handshake"] = time.monotonic() - started
        cmd("EHLO again", "EHLO client.test", 250)
        cmd("AUTH", f"AUTH PLAIN {plain_token(USER, PASSWORD)}", 235)
        cmd("MAIL", "MAIL FROM:<alice@example.org>", 250)
        cmd("RCPT", "RCPT TO:<bob@example.org>", 250)
        cmd("DATA", "DATA", 354)
        cmd("message", "Subject: fair\r\n\r\nhello\r\n.", 250)
        cmd("QUIT", "QUIT", 221)
    finally:
        sock.close()
    return steps


def worst_replies(srv, sessions: int, until: float = float("inf")):
    """({step: slowest reply}, sessions run) over up to `sessions` timed sessions,
    starting no new one after `until`."""
    worst = {}
    done = 0
    while done < sessions and time.monotonic() < until:
        for step, seconds in timed_session(srv).items():
            worst[step] = max(worst.get(step, 0.0), seconds)
        done += 1
    return worst, done


def slow_steps(unloaded: dict, loaded: dict) -> dict:
    """Prints each step's slowest reply unloaded and loaded; {step: seconds later than
    REPLY_BOUND allows} of those over the bound."""
    for step in unloaded:
        print(f"  {step:10} {unloaded[step] * 1000:7.1f} ms -> {loaded[step] * 1000:7.1f} ms")
    return {step: round(loaded[step] - unloaded[step], 3) for step in unloaded
            if loaded[step] > unloaded[step] + REPLY_BOUND}


def schedstat(pid: int):
    """(seconds run, seconds spent ready to run but waiting for a core) so far,
    over all the process's threads (/proc/PID/task/*/schedstat, in ns)."""
    ran = waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that has just ended
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


class Busy:
    """How the server's time went since this was made."""

    def __init__(self, srv):
        self.pid = srv.proc.pid
        self.ran, self.waited = schedstat(self.pid)
        self.since = time.monotonic()

    def share(self) -> float:
        """Of the wall-clock time, the share the server had work: it ran or was
        ready to.  Waiting for a core counts, so that a machine busy with other
        work still lets a flood show."""
        ran, waited = schedstat(self.pid)
        return (ran - self.ran + waited - self.waited) / max(time.monotonic() - self.since, 1e-3)

    def starved(self) -> float:
        """Of the time the server had work, the share it waited for a core."""
        ran, waited = schedstat(self.pid)
        return (waited - self.waited) / max(ran - self.ran + waited - self.waited, 1e-6)


def read_line(proc, timeout: float) -> str:
    """The next line a flooder prints, or "" if none comes within `timeout`."""
    out = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not out.endswith(b"\n") and time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 1)
                if not chunk:
                    break
                out += chunk
    return out.decode(errors="replace").strip()


class Flood:
    """Flooders of one kind against one server: as many as keep it busy."""

    def __init__(self, srv, mode: str, arg: str):
        self.srv = srv
        self.argv = [sys.executable, FLOOD, mode, str(srv.port), str(FLOOD_SECONDS), arg]
        self.procs = []
        self.started = 0
        self.stats = []

    def __enter__(self) -> "Flood":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def add(self) -> None:
        proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.started += 1
        # Until its first block is in the server's socket.
        line = read_line(proc, 20.0)
        assert line == "flooding", f"flooder started with {line!r}, exit {proc.poll()}"

    def running(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def load(self) -> float:
        """Add flooders, up to MAX_FLOODERS, until the server has work for BUSY of a
        SAMPLE_SECONDS sample; that share.  Short of it the test measures anyway: a
        server that blocks is idle too, and must fail on its slow replies."""
        if not self.procs:
            self.add()
        while True:
            busy = Busy(self.srv)
            time.sleep(SAMPLE_SECONDS)  # the sample itself, not a wait for an event
            share = busy.share()
            assert self.running(), "a flooder ended by itself"
            if share >= BUSY or len(self.procs) >= MAX_FLOODERS:
                return share
            self.add()

    def skip(self, shares) -> None:
        pytest.skip(f"{self.started} flooders kept the server busy only "
                    f"{', '.join(f'{s:.0%}' for s in shares)} of the time (a flood is "
                    f"{BUSY:.0%}): this machine cannot flood the server")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            lines = out.decode(errors="replace").strip().splitlines()
            if lines and lines[-1].startswith("{"):
                self.stats.append(json.loads(lines[-1]))
        self.procs = []

    def summary(self) -> str:
        if not self.stats:  # still running
            return f"{self.started} flooders"
        return (f"{self.started} flooders, "
                f"{sum(s['connections'] for s in self.stats)} connections, "
                f"{sum(s['sent'] for s in self.stats) / 1e6:.0f} MB")


@pytest.fixture
def fair_server(make_server):
    # Plain text and no login for the flooder, so nothing but the server's
    # loop limits how fast it goes; the measured client still does TLS + AUTH.
    return make_server("--no-require-tls", "--no-require-auth", "--auth", AUTH_QUICK,
                       "--process", BENCH_PROCESS, "--timeout", "3",
                       "--max-message-size", str(MESSAGE_SIZE))


FLOODS = {
    # EHLO is not a junk command: one connection may send it without end.
    "commands": ("commands", "EHLO flood.test"),
    # NOOPs are junk: the flooder is cut after 110 and reconnects at once.
    "noops": ("commands", "NOOP"),
    "data": ("data", str(MESSAGE_SIZE + 4096)),
}
# Measurements under a flood that turned out too light, before the test skips.
ATTEMPTS = 3


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_flood_does_not_delay_other_clients(fair_server, flood):
    """docs/limits.md "Limits and abuse": under a flood, every reply of another client's full session comes
    within REPLY_BOUND of its unloaded time."""
    srv = fair_server
    unloaded, sessions = worst_replies(srv, 3)
    shares = []
    with Flood(srv, *FLOODS[flood]) as flooders:
        for attempt in range(1, ATTEMPTS + 1):
            flooders.load()
            busy = Busy(srv)
            loaded, done = worst_replies(srv, MEASURE_SESSIONS,
                                         until=time.monotonic() + MEASURE_SECONDS)
            sessions += done
            shares.append(busy.share())
            starved = busy.starved()
            assert flooders.running(), "a flooder ended by itself"
            print(f"\n{flood}: {flooders.summary()}, server busy {shares[-1]:.0%} (waiting "
                  f"for a core {starved:.0%} of that), {done} sessions; "
                  "worst reply, unloaded -> loaded:")
            slow = slow_steps(unloaded, loaded)
            assert not slow, slow
            if shares[-1] >= BUSY:
                break
            # Too light a flood to prove anything: a heavier one.
            if attempt == ATTEMPTS or len(flooders.procs) >= MAX_FLOODERS:
                flooders.skip(shares)
            flooders.add()
    print(f"{flood}: {flooders.summary()}")
    # The flood's messages were all 552: only the timed sessions' ran the program.
    assert srv.log().count(RAN) == sessions


def test_benchmark_load_does_not_delay_other_clients(make_server):
    """docs/performance.md "Performance": under the benchmark's C=50 load (bench/loadgen.py: 50 clients
    doing STARTTLS, AUTH and a 4 KiB message each, over and over), every reply of
    another client's session comes within REPLY_BOUND of its unloaded time."""
    srv = make_server("--auth", AUTH_QUICK, "--process", BENCH_PROCESS,
                      "--auth-failure-delay", "0", "--max-connections", "500",
                      "--max-connections-per-ip", "500",
                      # The load is one user: lifted past docs/limits.md "Accounts and limits".
                      "--max-messages-per-user", "0", "--max-recipients-per-user", "0",
                      "--max-sessions-per-user", "0")
    unloaded, _ = worst_replies(srv, 3)
    connected = srv.log().count(CONNECTED)
    output = os.path.join(srv.workdir, "loadgen.out")
    # Its own session, so that stopping it stops its worker processes too; the
    # deadline only ends a load the test failed to stop.
    with open(output, "wb") as out:
        load = subprocess.Popen([sys.executable, LOADGEN, "--port", str(srv.port), "-c", "50",
                                 "-n", "100000", "--size", "4096", "--password", PASSWORD,
                                 "--nodelay", "--deadline", str(FLOOD_SECONDS),
                                 "--timeout", "10"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Until all 50 are in their sessions.
        assert wait_until(lambda: load.poll() is not None
                          or srv.log().count(CONNECTED) >= connected + 50, timeout=60), \
            "the 50 clients did not connect within 60 s"
        assert load.poll() is None, open(output).read()[-2000:]
        accepted = srv.log().count(ACCEPTED)
        busy = Busy(srv)
        loaded, sessions = worst_replies(srv, MEASURE_SESSIONS,
                                         until=time.monotonic() + MEASURE_SECONDS)
        share, starved = busy.share(), busy.starved()
        assert load.poll() is None, "the load ended before the measurements did"
        accepted = srv.log().count(ACCEPTED) - accepted - sessions
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGTERM)
        try:
            load.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(load.pid, signal.SIGKILL)
            load.wait()
    print(f"\nbenchmark load: {accepted} messages while measuring, server busy {share:.0%} "
          f"(waiting for a core {starved:.0%} of that), {sessions} sessions; "
          "worst reply, unloaded -> loaded:")
    slow = slow_steps(unloaded, loaded)
    if slow and starved > LOAD_STARVED:
        pytest.skip(f"replies late by {slow} s, but the server waited for a core {starved:.0%} "
                    f"of the time it had work (at most {LOAD_STARVED:.0%}): the machine was "
                    "too busy to time replies")
    assert not slow, slow


@pytest.mark.parametrize("flood", ["commands", "data"])
def test_flood_does_not_delay_timeouts_or_signals(fair_server, flood):
    """docs/limits.md "Limits and abuse": under a flood, an idle session still times out on time (--timeout 3)
    and SIGTERM is acted on at once."""
    srv = fair_server
    with Flood(srv, *FLOODS[flood]) as flooders:
        flooders.load()
        busy = Busy(srv)
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=REPLY_TIMEOUT)
        opened = time.monotonic()
        data = b""
        try:
            while b"421" not in data and time.monotonic() < opened + 3 + REPLY_TIMEOUT:
                chunk = idle.recv(4096)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        waited = time.monotonic() - opened
        idle.close()
        share = busy.share()
        assert b"421 4.4.2" in data, f"after {waited:.1f} s of --timeout 3: {data!r}"
        assert 2.5 < waited < 3 + REPLY_BOUND + 0.5, waited

        signalled = time.monotonic()
        srv.signal(signal.SIGTERM)
        try:
            rc = srv.proc.wait(timeout=REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGTERM not acted on within {REPLY_TIMEOUT} s") from None
        stopped = time.monotonic() - signalled
        assert rc == 0
        assert stopped < 1 + REPLY_BOUND, stopped
    print(f"\n{flood}: {flooders.summary()}, server busy {share:.0%}; idle session cut after "
          f"{waited:.3f} s (--timeout 3), SIGTERM to exit {stopped:.3f} s")
    if share < BUSY:
        flooders.skip([share])
