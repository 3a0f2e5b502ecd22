"""Nothing lost under load (docs/process-program.md "The process program", docs/operations.md "Signals").

Fifty clients submit twenty messages each over STARTTLS + AUTH to a server whose
process program exits 0, 75 or 1 at random (tests/programs/flaky).  Every run
leaves a record naming the message's X-Test-Id and its exit status before it
exits, so each `250` a client holds can be matched against the run behind it:
a 250 means the program accepted the message, anything else means the client
still owns it.  The same load is then cut by `kill -9` and by SIGTERM.
"""

import collections
import glob
import os
import signal
import socket
import ssl
import threading
import time

from conftest import PROGRAMS, Raw, ServerProcess, plain_token, wait_until

FLAKY = os.path.join(PROGRAMS, "flaky")
AUTH_QUICK = os.path.join(PROGRAMS, "auth-quick")
CLIENTS = 50
MESSAGES = 20
# Per socket operation; a reply slower than this on a loaded machine is a hang.
IO_TIMEOUT = 30.0
# The whole load must be over within this, whatever happens.
LOAD_DEADLINE = 120.0
EXIT_TO_REPLY = {0: 250, 75: 451, 1: 554}

# What a client knows about one message id besides a DATA reply code.
IN_DOUBT = "in doubt"  # the final dot may have left, no reply came back


class Lost(Exception):
    """The connection ended without a reply."""


class Tally:
    """DATA replies seen by all clients; fires an event at a threshold."""

    def __init__(self, threshold=None):
        self.lock = threading.Lock()
        self.replies = 0
        self.threshold = threshold
        self.reached = threading.Event()

    def count(self) -> None:
        with self.lock:
            self.replies += 1
            if self.threshold is not None and self.replies >= self.threshold:
                self.reached.set()


class SoakClient(threading.Thread):
    """One connection: log in, then MESSAGES transactions, ids `<client>-<n>`."""

    def __init__(self, cid: int, port: int, ctx: ssl.SSLContext, tally: Tally):
        super().__init__(name=f"soak-client-{cid}", daemon=True)
        self.cid = cid
        self.port = port
        self.ctx = ctx
        self.tally = tally
        self.outcome = {}  # id -> DATA reply code, or IN_DOUBT; absent: never submitted
        self.ending = None  # "done", "421 ...", "lost: ...", "hung: ..." or "unexpected: ..."
        self.raw = None

    def reply(self, expect=None):
        try:
            code, lines = self.raw.reply()
        except socket.timeout:
            raise
        except (OSError, ssl.SSLError) as e:
            raise Lost(f"{type(e).__name__}: {e}") from None
        if code is None:
            raise Lost("EOF")
        if code == 421:
            raise Lost(f"421 {lines[-1]}")
        if expect is not None and code != expect:
            raise AssertionError(f"expected {expect}, got {lines}")
        return code

    def cmd(self, line: str, expect: int) -> int:
        self.send(line + "\r\n")
        return self.reply(expect)

    def send(self, data) -> None:
        try:
            self.raw.send(data)
        except socket.timeout:
            raise
        except (OSError, ssl.SSLError) as e:
            raise Lost(f"{type(e).__name__}: {e}") from None

    def run(self) -> None:
        try:
            self.raw = Raw(socket.create_connection(("127.0.0.1", self.port),
                                                    timeout=IO_TIMEOUT))
            self.reply(220)
            self.cmd("EHLO client.test", 250)
            self.cmd("STARTTLS", 220)
            try:
                self.raw.sock = self.ctx.wrap_socket(self.raw.sock, server_hostname="mx.test")
            except (OSError, ssl.SSLError) as e:
                raise Lost(f"handshake: {e}") from None
            self.cmd("EHLO client.test", 250)
            self.cmd(f"AUTH PLAIN {plain_token()}", 235)
            for n in range(MESSAGES):
                self.submit(f"{self.cid}-{n}")
            self.cmd("QUIT", 221)
            self.ending = "done"
        except Lost as e:
            self.ending = f"lost: {e}" if not str(e).startswith("421") else str(e)
        except socket.timeout as e:
            self.ending = f"hung: {e}"
        except Exception as e:  # noqa: BLE001 - reported by the test, not the thread
            self.ending = f"unexpected: {type(e).__name__}: {e}"
        finally:
            if self.raw is not None:
                self.raw.close()

    def submit(self, mid: str) -> None:
        self.cmd(f"MAIL FROM:<c{self.cid}@client.test>", 250)
        self.cmd("RCPT TO:<rcpt@example.net>", 250)
        self.cmd("DATA", 354)
        # From here on the server may have the whole message.
        self.outcome[mid] = IN_DOUBT
        self.send(f"From: c{self.cid}@client.test\r\nX-Test-Id: {mid}\r\n"
                  f"Subject: soak {mid}\r\n\r\nmessage {mid}\r\n.\r\n")
        code = self.reply()
        self.outcome[mid] = code
        self.tally.count()
        assert code in (250, 451, 554), f"DATA of {mid} answered {code}"


# --- the server and what its programs left behind ---------------------------

def start_server(tmp_path, certs, env=None) -> ServerProcess:
    srv = ServerProcess(str(tmp_path / "srv"), certs,
                        ["--auth", AUTH_QUICK, "--process", FLAKY,
                         "--max-connections-per-ip", str(CLIENTS * 2),
                         # Every client is one user: the per-user limits (docs/limits.md
                         # "Accounts and limits") would cut this load short.
                         "--max-messages-per-user", "0", "--max-recipients-per-user", "0",
                         "--max-sessions-per-user", "0"], env)
    os.makedirs(srv.workdir, exist_ok=True)
    return srv.start()


def runs(srv):
    """(id, exit, mtime, token) of every finished run, and the tokens of all started runs."""
    done = []
    for path in glob.glob(os.path.join(srv.record_dir, "flaky-*.rec")):
        with open(path) as f:
            mid, code = f.read().split()
        done.append((mid, int(code), os.path.getmtime(path),
                     os.path.basename(path)[len("flaky-"):-len(".rec")]))
    started = {os.path.basename(p)[len("start-"):]
               for p in glob.glob(os.path.join(srv.record_dir, "start-*"))}
    return done, started


def all_finished(srv):
    done, started = runs(srv)
    return started == {token for *_, token in done}


def run_load(srv, tally, on_threshold=None):
    """Run every client to its end; `on_threshold` is called once the tally fires."""
    ctx = srv.tls_context()
    clients = [SoakClient(cid, srv.port, ctx, tally) for cid in range(CLIENTS)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + LOAD_DEADLINE
    if on_threshold is not None:
        while not tally.reached.wait(timeout=0.1):
            assert time.monotonic() < deadline and any(c.is_alive() for c in clients), \
                f"load ended after {tally.replies} DATA replies: {[c.ending for c in clients]}"
        on_threshold()
    for c in clients:
        c.join(timeout=max(0.1, deadline - time.monotonic()))
    hung = [c.name for c in clients if c.is_alive()]
    assert not hung, f"clients still running after {LOAD_DEADLINE}s: {hung}"
    return clients


def outcomes(clients):
    merged = {}
    for c in clients:
        merged.update(c.outcome)
    return merged


def runs_by_id(done):
    by_id = collections.defaultdict(list)
    for mid, code, *_ in done:
        by_id[mid].append(code)
    return by_id


def assert_clean_log(srv) -> None:
    log = srv.log()
    assert "Traceback" not in log
    assert "internal error" not in log, [l for l in log.splitlines() if "internal error" in l]


def kill_server(srv) -> None:
    if srv.proc.poll() is None:
        srv.proc.kill()
    srv.stop()  # only reaps it now


# --- the tests ---------------------------------------------------------------

def test_soak_every_reply_matches_one_run(tmp_path, certs):
    """docs/process-program.md "The process program" table: 1000 messages; each 250/451/554 is exactly one run exiting 0/75/1."""
    srv = start_server(tmp_path, certs)
    try:
        tally = Tally()
        clients = run_load(srv, tally)
        endings = collections.Counter(c.ending for c in clients)
        assert endings == {"done": CLIENTS}, endings
        got = outcomes(clients)
        assert len(got) == CLIENTS * MESSAGES
        assert IN_DOUBT not in got.values()

        done, started = runs(srv)
        assert len(done) == len(got) == tally.replies, "one run per DATA reply"
        assert started == {token for *_, token in done}, "a run never finished"
        by_id = runs_by_id(done)
        assert set(by_id) == set(got), set(by_id) ^ set(got)
        for mid, code in got.items():
            assert [EXIT_TO_REPLY.get(e) for e in by_id[mid]] == [code], (mid, code, by_id[mid])
        # Each branch of the table was exercised (0.9 ** 1000 makes a miss impossible).
        assert set(got.values()) == {250, 451, 554}, collections.Counter(got.values())
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    assert_clean_log(srv)


def test_kill_9_leaves_no_250_without_an_accepted_run(tmp_path, certs):
    """docs/process-program.md "The process program": after kill -9 mid-load, every 250 a client holds has an accepted (exit 0) run."""
    srv = start_server(tmp_path, certs)
    try:
        tally = Tally(threshold=300)
        clients = run_load(srv, tally, on_threshold=lambda: kill_server(srv))
    finally:
        kill_server(srv)
    assert srv.proc.returncode == -signal.SIGKILL
    # Programs live in their own process groups and outlive the server; what
    # they record when they finish still counts.
    assert wait_until(lambda: all_finished(srv), timeout=30), "process programs still running"

    endings = collections.Counter(c.ending.split(":")[0] for c in clients)
    assert not [c.ending for c in clients
                if c.ending.startswith(("hung", "unexpected"))], endings
    got = outcomes(clients)
    answered = {mid: code for mid, code in got.items() if code != IN_DOUBT}
    assert 300 <= len(answered) < CLIENTS * MESSAGES, "the kill did not land mid-load"
    assert endings["lost"] > 0, endings

    done, _ = runs(srv)
    by_id = runs_by_id(done)
    for mid, code in answered.items():
        assert [EXIT_TO_REPLY.get(e) for e in by_id[mid]] == [code], (mid, code, by_id[mid])
    for mid, exits in by_id.items():
        if mid == "-":
            continue  # started as the server died, before it could feed the message
        assert len(exits) == 1, f"{mid} ran {len(exits)} times"
        assert mid in got, f"run for {mid}, which no client submitted"
    window = [(mid, code) for mid, code, *_ in done if got.get(mid, IN_DOUBT) == IN_DOUBT]
    accepted_unanswered = [mid for mid, code in window if code == 0]
    print(f"kill -9 after {len(answered)} replies: {len(window)} runs without a reply, "
          f"{len(accepted_unanswered)} of them accepted (at-least-once window)")
    assert_clean_log(srv)


def test_sigterm_under_load_answers_running_programs(tmp_path, certs):
    """docs/operations.md "Signals": SIGTERM mid-load: running programs finish and are answered; then exit 0."""
    # Slow runs make sure some are in flight when the signal lands.
    srv = start_server(tmp_path, certs, env={"FLAKY_SLEEP": "0.3"})
    signalled = {}
    probes = []

    def terminate():
        signalled["at"] = time.time()
        srv.signal(signal.SIGTERM)
        srv.wait_log("shutting down", timeout=10)
        # Once the server knows it is stopping, no new session may begin.
        for _ in range(5):
            probes.append(probe(srv.port))
            if srv.proc.poll() is not None:
                break
            time.sleep(0.05)

    try:
        tally = Tally(threshold=300)
        clients = run_load(srv, tally, on_threshold=terminate)
        rc = srv.proc.wait(timeout=30)
    finally:
        kill_server(srv)  # no second SIGTERM: that is another test
    assert rc == 0, srv.log()
    assert_clean_log(srv)
    assert probes and all(p in ("refused", "closed", "421") for p in probes), probes

    endings = [c.ending for c in clients]
    assert not [e for e in endings if e.startswith(("hung", "unexpected"))], endings
    # A session that was told anything at the end was told the server is stopping.
    assert all("4.3.2" in e for e in endings if e.startswith("421")), endings
    assert wait_until(lambda: all_finished(srv), timeout=5), "a run was abandoned"
    got = outcomes(clients)
    answered = {mid: code for mid, code in got.items() if code != IN_DOUBT}
    assert len(answered) < CLIENTS * MESSAGES, "the signal did not land mid-load"

    done, _ = runs(srv)
    by_id = runs_by_id(done)
    # No client vanished, so every run was answered, and with its own code.
    assert len(done) == len(answered), (len(done), len(answered))
    for mid, exits in by_id.items():
        assert [EXIT_TO_REPLY[e] for e in exits] == [got.get(mid)], (mid, exits, got.get(mid))
    finishing = [mid for mid, _, mtime, _ in done if mtime > signalled["at"] + 0.05]
    assert finishing, "no program was running when the signal came"
    print(f"SIGTERM after {len(answered)} replies; {len(finishing)} runs finished after it; "
          f"{sum(e.startswith('421') for e in endings)} clients told 421")


def test_repeated_sigterm_still_exits_0(tmp_path, certs):
    """docs/operations.md "Signals": SIGTERM repeated until the server is gone (a supervisor's retry) still exits 0."""
    srv = start_server(tmp_path, certs)
    idle = srv.raw()
    try:
        assert idle.reply()[0] == 220
        srv.signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                srv.signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        rc = srv.proc.wait(timeout=5)
    finally:
        idle.close()
        kill_server(srv)
    assert rc == 0, f"exit status {rc}; log tail:\n{srv.log()[-600:]}"


def probe(port: int) -> str:
    """How a new connection fares: 'refused', 'closed' or the first reply code."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return "refused"
    raw = Raw(sock)
    try:
        code, _ = raw.reply()
        return "closed" if code is None else str(code)
    except socket.timeout:
        return "silent"
    except OSError:
        return "closed"
    finally:
        raw.close()
