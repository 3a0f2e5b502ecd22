"""SIGHUP reloads the configuration without dropping a connection; --graceful-timeout
(docs/operations.md "Reloading (SIGHUP)").

The server reads its settings from an ini file that each test rewrites before it
sends SIGHUP.  The process program is the recording one with a word of its own
on its command line ("gen-1", "gen-2", ...), so each delivered message tells
which configuration ran it.
"""

import datetime
import os
import re
import signal
import socket
import ssl
import threading
import time

import pytest

from conftest import AUTH, HOSTNAME, RECORD, Raw, ServerProcess, plain_token, wait_until

CLIENTS = 10
RELOADS = 10
APPLIED = re.compile(r"^(\S+) INFO reload: (?:new sessions use|\d+ workers accept)", re.M)


def write_ini(path, generation: int, **extra) -> None:
    settings = {"process": f"{RECORD} gen-{generation}", "auth": AUTH,
                "max-recipients": 50 + generation, "auth-failure-delay": 0}
    settings.update(extra)
    with open(path, "w") as f:
        f.write("[ssmtpd]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


def reloadable_server(tmp_path, certs, *args, **ini) -> ServerProcess:
    """A server whose programs and limits come from an ini file (ini_path)."""
    srv = ServerProcess(str(tmp_path / "srv"), certs, defaults=False)
    srv.ini_path = os.path.join(srv.workdir, "ssmtpd.ini")
    write_ini(srv.ini_path, 0, **ini)
    srv.argv += ["--bind", "127.0.0.1", "--port", str(srv.port), "--hostname", HOSTNAME,
                 "--ssl-cert", srv.cert, "--ssl-key", srv.key, "-c", srv.ini_path, *args]
    return srv.start()


def applied_times(srv):
    """Wall-clock times of the reload lines that took effect, in order."""
    return [datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
            .replace(tzinfo=datetime.timezone.utc).timestamp()
            for stamp in APPLIED.findall(srv.log())]


def reload_and_wait(srv, generation: int, **ini) -> None:
    before = len(applied_times(srv))
    write_ini(srv.ini_path, generation, **ini)
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: len(applied_times(srv)) > before, timeout=90), srv.log()[-3000:]


class Load:
    """CLIENTS threads, each doing whole sessions (STARTTLS, AUTH, one message) in a
    loop until stopped; every session's sender is its own."""

    def __init__(self, srv):
        self.srv = srv
        self.ctx = srv.tls_context()
        self.sessions = []  # (sender, connect time, greeting time, final code or error)
        self.greetings = {}  # sender -> the greeting's text
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _client(self, i: int) -> None:
        for n in range(100000):
            if self._stop.is_set():
                return
            sender = f"c{i}-{n}@example.org"
            began, greeted, result = time.time(), None, None
            try:
                raw = Raw(socket.create_connection(("127.0.0.1", self.srv.port), timeout=60))
                try:
                    code, lines = raw.reply()
                    greeted = time.time()
                    self.greetings[sender] = lines[-1]
                    assert code == 220, code
                    assert raw.cmd("EHLO client.test")[0] == 250
                    raw.starttls(self.ctx)
                    assert raw.cmd("EHLO client.test")[0] == 250
                    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
                    result = raw.send_message(sender=sender)[0]
                    raw.cmd("QUIT")
                finally:
                    raw.close()
            except (OSError, ssl.SSLError, AssertionError) as e:
                result = f"{type(e).__name__}: {e}"
            self.sessions.append((sender, began, greeted, result))


def generation_of(run) -> int:
    word = run["argv"][1]
    assert word.startswith("gen-"), run["argv"]
    return int(word[4:])


def generation_of_a_message(srv) -> int:
    """Which configuration's program ran a message sent now (the only one so far)."""
    raw = srv.raw(timeout=30)
    raw.login(srv.tls_context())
    assert raw.send_message(sender="after@example.org")[0] == 250
    raw.close()
    (run,) = srv.runs()
    return generation_of(run)


def check_sessions(srv, sessions, times, workers_of=None) -> None:
    """Every session got 250, its message ran exactly once, on the configuration of
    the reload line it followed: a session that began after a line ran that line's
    program, one greeted before it an earlier one."""
    failed = [s for s in sessions if s[3] != 250]
    assert not failed, failed[:5]
    runs = {}
    for run in srv.runs():
        sender = run["env"]["SSMTPD_MAIL_FROM"]
        assert sender not in runs, f"{sender} delivered twice"
        runs[sender] = run
    assert len(runs) == len(sessions)
    slack = 0.005  # the log's milliseconds
    for sender, began, greeted, _ in sessions:
        earliest = sum(t < began - slack for t in times)
        latest = sum(t < greeted + slack for t in times)
        assert earliest <= generation_of(runs[sender]) <= latest, (
            sender, began, greeted, generation_of(runs[sender]), times)


@pytest.mark.parametrize("layout", ["one-process", "workers-3", "workers-3-then-2"])
def test_reloads_under_load_lose_nothing(tmp_path, certs, layout):
    """docs/operations.md "Reloading (SIGHUP)": 10 SIGHUPs under a steady load of 10 clients,
    each switching the process program (and a limit): no session fails or is refused,
    every message runs once, sessions after a reload's line run its program and those
    before it the one before; with --workers the count may change, and the workers of
    each older configuration all end."""
    workers = {"one-process": {}, "workers-3": {"workers": 3},
               "workers-3-then-2": {"workers": 3}}[layout]
    srv = reloadable_server(tmp_path, certs, "--max-connections-per-ip", "1000",
                            "--max-sessions-per-user", "0", "--max-messages-per-user", "0",
                            "--max-recipients-per-user", "0", **workers)
    try:
        if workers:
            assert wait_until(lambda: srv.log().count("accepting on") == 3), srv.log()
        with Load(srv) as load:
            time.sleep(1)
            for generation in range(1, RELOADS + 1):
                if layout == "workers-3-then-2":
                    workers = {"workers": 2 if generation % 2 else 3}
                reload_and_wait(srv, generation, **workers)
                time.sleep(0.5)
        times = applied_times(srv)
        assert len(times) == RELOADS
        assert len(re.findall(r"INFO reload: .*\(changed: --process, --max-recipients",
                              srv.log())) == RELOADS, srv.log()[-3000:]
        assert len(load.sessions) > 2 * CLIENTS, len(load.sessions)
        check_sessions(srv, load.sessions, times)
        assert "ERROR" not in srv.log(), srv.log()
        if layout != "one-process":
            # Every worker of an older configuration stopped, and on its own (exit 0).
            older = len(re.findall(r"of an earlier configuration stopped: exited with status 0",
                                   srv.log()))
            started = len(re.findall(r"worker \d+ \(pid \d+\) started", srv.log()))
            last = 2 if layout == "workers-3-then-2" and RELOADS % 2 else 3
            assert wait_until(lambda: started - len(re.findall(
                r"of an earlier configuration stopped: exited with status 0", srv.log()))
                == last, timeout=60), srv.log()[-3000:]
            assert older >= 0
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("broken", ["unknown-key", "program-not-executable"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_refused_reload_keeps_the_running_configuration(tmp_path, certs, broken, workers):
    """docs/operations.md "Reloading (SIGHUP)": a SIGHUP with a broken ini is one ERROR line
    naming the problem, and the running settings keep serving."""
    srv = reloadable_server(tmp_path, certs, "--workers", str(workers))
    try:
        if workers > 1:
            assert wait_until(lambda: srv.log().count("accepting on") == workers), srv.log()
        if broken == "unknown-key":
            write_ini(srv.ini_path, 1, **{"max-recipientz": 5})
            why = "max-recipientz"
        else:
            not_executable = os.path.join(srv.workdir, "process.txt")
            with open(not_executable, "w") as f:
                f.write("#!/bin/sh\nexit 0\n")
            write_ini(srv.ini_path, 1, process=not_executable)
            why = "--process"
        srv.signal(signal.SIGHUP)
        line = srv.wait_log("reload refused")
        assert why in line.split("reload refused", 1)[1].splitlines()[0], line
        assert generation_of_a_message(srv) == 0
        log = srv.log()
        assert log.count("ERROR") == 1 and "reload: " not in log.replace("reload refused", "")
        assert len(re.findall(r"worker \d+ \(pid \d+\) started", log)) == (
            workers if workers > 1 else 0)
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


def test_settings_that_need_a_restart_are_kept_with_a_warning(tmp_path, certs):
    """docs/operations.md "Reloading (SIGHUP)": --smtps-port and --workers (in a server started
    without workers) cannot change in a running server: one WARNING each, the rest of
    the new configuration applies."""
    srv = reloadable_server(tmp_path, certs)
    try:
        reload_and_wait(srv, 1, **{"workers": 2, "smtps-port": 2465})
        log = srv.log()
        assert re.search(r"WARNING reload: --workers changed from 1 to 2: that needs a "
                         r"restart; keeping 1", log), log
        assert re.search(r"WARNING reload: --smtps-port changed from none to 2465", log), log
        assert generation_of_a_message(srv) == 1
        assert not re.search(r"worker \d+ \(pid", srv.log())
    finally:
        assert srv.stop() == 0, srv.log()


def test_sighup_to_workers_is_ignored_and_costs_nothing(tmp_path, certs):
    """docs/operations.md "Reloading (SIGHUP)": `pkill -HUP` that reaches every process (the
    master and its workers) during a load: each worker logs that it ignored it, the
    master reloads, no session fails."""
    srv = reloadable_server(tmp_path, certs, "--workers", "2", "--max-connections-per-ip",
                            "1000", "--max-sessions-per-user", "0")
    try:
        assert wait_until(lambda: srv.log().count("accepting on") == 2), srv.log()
        workers = [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) started",
                                                  srv.log())]
        with Load(srv) as load:
            time.sleep(1)
            write_ini(srv.ini_path, 1)
            for pid in [srv.proc.pid] + workers:
                os.kill(pid, signal.SIGHUP)
            assert wait_until(lambda: len(applied_times(srv)) == 1, timeout=90), srv.log()
            time.sleep(1)
        assert srv.log().count("SIGHUP to worker") == 2, srv.log()
        check_sessions(srv, load.sessions, applied_times(srv))
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_an_old_workers_idle_session_ends_at_the_graceful_timeout(tmp_path, certs):
    """docs/operations.md "Reloading (SIGHUP)": after a reload with --workers and
    --graceful-timeout 2, a session of an old worker goes on as before, and gets
    421 4.3.2 about 2 s after the new workers accept."""
    srv = reloadable_server(tmp_path, certs, "--workers", "2", "--graceful-timeout", "2",
                            "--timeout", "60")
    try:
        assert wait_until(lambda: srv.log().count("accepting on") == 2), srv.log()
        raw = srv.raw(timeout=30)
        raw.login(srv.tls_context())
        reload_and_wait(srv, 1)
        accepted_at = time.monotonic()
        # The old worker still serves its session: a whole message, on the old program.
        assert raw.send_message(sender="old@example.org")[0] == 250
        raw.sock.settimeout(30)
        code, lines = raw.reply()
        waited = time.monotonic() - accepted_at
        assert (code, lines[-1][4:9]) == (421, "4.3.2"), lines
        assert 1.0 <= waited <= 10.0, waited
        assert raw.closed()
        (run,) = srv.runs()
        assert generation_of(run) == 0
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_lets_a_message_finish_until_the_graceful_timeout(tmp_path, certs):
    """docs/operations.md "Signals": after SIGTERM with --graceful-timeout 2, an idle session gets
    421 4.3.2 at once, one in the middle of its message data is cut at about 2 s, one
    whose 5 s process program runs gets its 250; the server exits 0."""
    srv = reloadable_server(tmp_path, certs, "--graceful-timeout", "2", "--timeout", "60")
    ctx = srv.tls_context()
    try:
        idle, sending, running = (srv.raw(timeout=30) for _ in range(3))
        for raw in (idle, sending, running):
            raw.login(ctx)
        sending.start_data(sender="sending@example.org")
        sending.send(b"Subject: part\r\n\r\nthe first line\r\n")
        running.send_message(sender="sleep5@example.org", read_reply=False)
        assert wait_until(lambda: srv.runs())  # the program has started
        srv.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        code, lines = idle.reply()
        assert (code, lines[-1][4:9]) == (421, "4.3.2") and time.monotonic() - stopped_at < 1.5
        code, lines = sending.reply()
        cut = time.monotonic() - stopped_at
        assert (code, lines[-1][4:9]) == (421, "4.3.2"), lines
        assert 1.5 <= cut <= 6.0, cut
        assert running.reply()[0] == 250
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    assert [r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs()] == ["sleep5@example.org"]


def test_the_start_up_line_names_the_version(make_server):
    """docs/logging.md "Logging": the line that says a port is served names ssmtpd's version,
    in one process and in a master."""
    from ssmtpd import __version__
    single = make_server()
    master = make_server("--workers", "2")
    assert f"INFO ssmtpd {__version__} listening on 127.0.0.1 port {single.port}" in single.log()
    assert re.search(rf"INFO ssmtpd {re.escape(__version__)} master \d+: listening on "
                     rf"127\.0\.0\.1 port {master.port}", master.log()), master.log()
