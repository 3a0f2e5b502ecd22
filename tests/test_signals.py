"""Signals, the supervisord way (docs/operations.md "Signals"): SIGTERM and SIGINT stop in stages.

Each test owns its server process, because each one ends it.
"""

import os
import signal
import socket
import subprocess
import threading

import pytest

from conftest import (STOP_TIMEOUT, ServerProcess, client_context, plain_token, wait_for_port,
                      wait_until)
from ssmtpd import replies

STOP_SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"),
                pytest.param(signal.SIGINT, id="SIGINT")]
SHUTTING_DOWN = f"{replies.SHUTTING_DOWN.code} {replies.SHUTTING_DOWN.enhanced}"
BODY = b"Subject: signals\r\n\r\nline one\r\nline two\r\n"


def logged_in(srv):
    raw = srv.raw()
    raw.login(client_context(srv.ca))
    return raw


def send_message(raw, sender: str) -> None:
    """A whole transaction up to and including the final dot; the reply is not read."""
    raw.send_message(BODY, sender, ("b@example.org",), read_reply=False)


def assert_shutting_down(raw) -> None:
    """The next reply is 421 4.3.2 and the server then closes the connection."""
    code, lines = raw.reply()
    assert code == 421 and lines[-1].startswith(SHUTTING_DOWN), lines
    assert raw.closed(timeout=5)


def refused(port: int) -> bool:
    """True when a new client is turned away: refused, reset, closed or told 421."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionRefusedError:
        return True
    with sock:
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return data == b"" or data.startswith(b"421 ")


def stopped(srv) -> int:
    return srv.proc.wait(timeout=STOP_TIMEOUT)


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_stop_finishes_running_program(make_server, sig):
    """docs/operations.md "Signals": a message whose program runs is finished and answered 250; idle ones get 421."""
    srv = make_server()
    busy = logged_in(srv)
    idle = logged_in(srv)
    try:
        # Five seconds leave ample room to see the idle session told first.
        send_message(busy, "sleep5@example.org")
        assert wait_until(lambda: srv.runs(), timeout=10), "process program never started"
        srv.signal(sig)

        # The idle session is told at once, while the program is still running.
        assert_shutting_down(idle)
        runs = srv.runs()
        assert len(runs) == 1 and runs[0]["done"] is False

        srv.wait_log("shutting down")
        assert refused(srv.port)

        code, lines = busy.reply()
        assert code == 250 and lines[-1].startswith("250 2.0.0"), lines
        # After its answer the session is idle too: 421, or simply closed.
        code, lines = busy.reply()
        assert code is None or lines[-1].startswith(SHUTTING_DOWN), lines
        assert busy.closed(timeout=5)
    finally:
        busy.close()
        idle.close()
    assert stopped(srv) == 0
    runs = srv.runs()
    assert len(runs) == 1
    assert runs[0]["done"] is True and runs[0]["exit"] == 0


def test_new_connections_refused_while_draining(make_server):
    """docs/operations.md "Signals": after SIGTERM the server stops accepting, even while a program still runs."""
    srv = make_server()
    busy = logged_in(srv)
    try:
        send_message(busy, "sleep3@example.org")
        assert wait_until(lambda: srv.runs(), timeout=10), "process program never started"
        srv.signal(signal.SIGTERM)
        srv.wait_log("shutting down")
        for _ in range(3):
            assert refused(srv.port)
        assert srv.proc.poll() is None  # still draining: the program has not finished
        code, lines = busy.reply()
        assert code == 250, lines
    finally:
        busy.close()
    assert stopped(srv) == 0
    assert len(srv.runs()) == 1


IDLE_STATES = ["after-greeting", "after-ehlo", "authenticated", "in-transaction"]


@pytest.mark.parametrize("sig", STOP_SIGNALS)
@pytest.mark.parametrize("state", IDLE_STATES)
def test_idle_session_told_421(make_server, sig, state):
    """docs/operations.md "Signals": at SIGTERM/SIGINT an idle session gets 421 4.3.2 and is closed; exit 0."""
    srv = make_server()
    raw = srv.raw()
    try:
        if state in ("after-greeting", "after-ehlo"):
            assert raw.reply()[0] == 220
            if state == "after-ehlo":
                assert raw.cmd("EHLO client.test")[0] == 250
        else:
            raw.login(client_context(srv.ca))
            if state == "in-transaction":
                assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
                assert raw.cmd("RCPT TO:<b@example.org>")[0] == 250
        srv.signal(sig)
        assert_shutting_down(raw)
    finally:
        raw.close()
    assert stopped(srv) == 0
    assert srv.runs() == []


def process_group(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[2])


def ctrl_c(srv) -> None:
    """What a terminal's Ctrl-C does: SIGINT to every process in the server's process
    group (the server, or the master and its workers; programs run in groups of their own)."""
    master = srv.proc.pid
    with open(f"/proc/{master}/task/{master}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    for pid in [master] + [c for c in children if process_group(c) == process_group(master)]:
        os.kill(pid, signal.SIGINT)


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one-process", "workers"])
def test_second_ctrl_c_closes_every_session_not_running_a_program(make_server, workers):
    """docs/operations.md "Signals": one Ctrl-C drains (a session in its failed-login pause is left to
    finish it); a second one closes at once every session not running a program, and
    says what still runs; the running program's message is still answered 250."""
    srv = make_server("--auth-failure-delay", "60", *workers)
    pausing = srv.raw(timeout=30)
    pausing.hello(client_context(srv.ca))
    pausing.send(f"AUTH PLAIN {plain_token(password='wrong')}\r\n")
    srv.wait_log(": 535, ")  # logged, then the 60 s pause before the reply
    busy = logged_in(srv)
    try:
        send_message(busy, "sleep5@example.org")
        assert wait_until(lambda: srv.runs(), timeout=10), "process program never started"
        ctrl_c(srv)
        srv.wait_log("shutting down")
        pausing.sock.settimeout(1.5)
        with pytest.raises(socket.timeout):
            pausing.sock.recv(1024)  # the first Ctrl-C leaves the pause be
        pausing.sock.settimeout(20)
        ctrl_c(srv)
        assert_shutting_down(pausing)
        assert srv.runs()[0]["done"] is False  # told while the program still ran
        code, lines = busy.reply()
        assert code == 250, lines
    finally:
        busy.close()
        pausing.close()
    assert stopped(srv) == 0
    assert "SIGINT again: " in srv.log()
    if not workers:
        assert "SIGINT again: closing 1 sessions now; 1 running a program are answered " \
            "when it ends" in srv.log()


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_session_mid_data_told_421_and_no_run(make_server, sig):
    """docs/operations.md "Signals": a client still sending DATA at SIGTERM may go on until
    --graceful-timeout, then gets 421 4.3.2; no program runs."""
    srv = make_server("--graceful-timeout", "1")
    raw = logged_in(srv)
    try:
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send(BODY)  # no final dot: the message is incomplete
        srv.signal(sig)
        assert_shutting_down(raw)
    finally:
        raw.close()
    assert stopped(srv) == 0
    assert srv.runs() == []


def test_sigterm_without_sessions_exits_0(make_server):
    """docs/operations.md "Signals": SIGTERM with nobody connected: exit 0, and the port is closed."""
    srv = make_server()
    srv.signal(signal.SIGTERM)
    assert stopped(srv) == 0
    assert refused(srv.port)


# --- a signal that arrives right as the port opens -------------------------------------

def full_pipe():
    """(read fd, write fd) of a pipe whose buffer is already full.

    A server whose stderr is this pipe blocks on its first log line, which
    freezes it exactly where that line is written.
    """
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w, filled


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"),
                                 pytest.param(signal.SIGHUP, id="SIGHUP")])
def test_signal_as_soon_as_port_listens(tmp_path, certs, sig):
    """docs/operations.md "Signals": once the port accepts clients, SIGTERM means exit 0 and SIGHUP a reload.

    A supervisor (or a health check) may signal the moment the port is up; the
    handlers must be in place by then, or the default action kills the server.
    """
    srv = ServerProcess(str(tmp_path), certs)
    r, w, filled = full_pipe()
    output = []

    def drain():
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                return
            output.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        proc = subprocess.Popen(srv.argv, env=srv.env, cwd=srv.workdir,
                                stdin=subprocess.DEVNULL, stdout=w, stderr=w)
        os.close(w)
        w = None
        try:
            wait_for_port(srv.port, proc=proc)
            proc.send_signal(sig)
            # Let the server write its log again; it must now act on the signal.
            reader.start()
            if sig == signal.SIGHUP:
                wait_until(lambda: b"reload" in b"".join(output) or proc.poll() is not None,
                           timeout=10)
                assert proc.poll() is None, f"SIGHUP killed the server: {proc.returncode}"
                with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
                    assert s.recv(1024).startswith(b"220 ")
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        if w is not None:
            os.close(w)
        if reader.is_alive():
            reader.join(timeout=5)  # ends at EOF: the server has exited
        os.close(r)
    log = b"".join(output)[filled:].decode("utf-8", "replace")
    assert rc == 0, f"server exit status {rc} after {sig.name}:\n{log}"
    assert "Traceback" not in log, log
