"""--workers N: a master that binds, supervises and passes signals on (docs/scaling.md "Scaling").

Every test runs a real master with real worker processes.  Which worker served
a message is known from the process program's parent pid, which the test
program records (tests/programs/record): the worker that spawned it.
"""

import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest

from conftest import (PASSWORD, USER, Raw, client_context, plain_token, two_certificates,
                      wait_until)

WORKERS = 3


def worker_pids(srv):
    """pid of every worker the master has started, in order, from its log."""
    return [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) started", srv.log())]


def live(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def workers(make_server):
    def start(*args):
        srv = make_server("--workers", str(WORKERS), *args)
        assert wait_until(lambda: srv.log().count("accepting on") == WORKERS), srv.log()
        return srv
    return start


def submit(srv, sender, results, i):
    try:
        raw = srv.raw(timeout=60)
        raw.login(srv.tls_context())
        results[i] = raw.send_message(sender=sender)[0]
        raw.cmd("QUIT")
        raw.close()
    except Exception as e:  # reported by the assertion on results
        results[i] = repr(e)


def test_sixty_concurrent_sessions_each_delivered_once_by_several_workers(workers):
    """docs/scaling.md "Scaling": 60 sessions at once: 60 runs, one per message, spread over workers."""
    # All come from 127.0.0.1 as one user: over the default sessions per user
    # (docs/limits.md "Accounts and limits").
    srv = workers("--max-connections-per-ip", "100", "--max-sessions-per-user", "0")
    results = [None] * 60
    threads = [threading.Thread(target=submit, args=(srv, f"s{i}@example.org", results, i))
               for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [250] * 60
    runs = srv.runs()
    assert sorted(r["env"]["SSMTPD_MAIL_FROM"] for r in runs) == sorted(
        f"s{i}@example.org" for i in range(60))
    served_by = {r["ppid"] for r in runs}
    assert served_by <= set(worker_pids(srv))
    assert len(served_by) > 1, "every message was handled by one worker"
    assert srv.proc.pid not in served_by  # the master serves no client


def test_sigterm_lets_running_programs_finish_then_exit_zero(workers):
    """docs/scaling.md "Scaling", docs/operations.md "Signals": SIGTERM to the master while programs run: every message answered,
    master exit 0, no worker left behind."""
    srv = workers()
    results = [None] * 6
    threads = [threading.Thread(target=submit, args=(srv, "sleep2@example.org", results, i))
               for i in range(6)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(srv.runs()) == 6, timeout=30)  # all six programs running
    pids = worker_pids(srv)
    srv.signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert results == [250] * 6
    assert srv.proc.wait(timeout=30) == 0
    assert not [pid for pid in pids if live(pid)]
    assert "master %d: all workers stopped" % srv.proc.pid in srv.log()


def test_killed_worker_is_replaced(workers):
    """docs/scaling.md "Scaling": kill -9 of a worker: the master logs it, starts another, service goes on."""
    srv = workers()
    victim = worker_pids(srv)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(worker_pids(srv)) == WORKERS + 1, timeout=15), srv.log()
    assert re.search(rf"ERROR worker 1 \(pid {victim}\) killed by signal 9", srv.log())
    assert wait_until(lambda: srv.log().count("accepting on") == WORKERS + 1)
    results = [None] * 6
    for i in range(6):
        submit(srv, f"after{i}@example.org", results, i)
    assert results == [250] * 6
    assert victim not in {r["ppid"] for r in srv.runs()}


def test_a_dead_workers_running_program_is_killed(workers):
    """docs/scaling.md "Scaling": a worker killed while its process program runs leaves its client
    without an answer, so the client will send again: the master kills that program
    (and its group) rather than let it deliver the message a first time."""
    srv = workers()
    raw = srv.raw(timeout=30)
    raw.login(srv.tls_context())
    raw.send_message(sender="sleep6@example.org", read_reply=False)
    assert wait_until(lambda: srv.runs(), timeout=10), "process program never started"
    (run,) = srv.runs()
    os.kill(run["ppid"], signal.SIGKILL)  # the worker that started it
    code, _ = raw.reply()
    assert code is None  # no answer: the client still owns the message
    assert wait_until(lambda: not live(run["pid"]), timeout=10), "the program still runs"
    assert wait_until(lambda: "died while running 1 programs: killed them" in srv.log(), 10)
    assert [r["done"] for r in srv.runs()] == [False]  # it never got to deliver


def test_crashing_worker_backs_off(workers, tmp_path):
    """docs/scaling.md "Scaling": a worker that dies at once is restarted after a growing pause, not in a spin."""
    srv = workers()
    for _ in range(3):
        pids = worker_pids(srv)
        os.kill(pids[-1] if len(pids) > WORKERS else pids[1], signal.SIGKILL)
        count = len(pids)
        assert wait_until(lambda: len(worker_pids(srv)) > count, timeout=20), srv.log()
    pauses = [int(p) for p in re.findall(r"starting another in (\d+)s", srv.log())]
    assert pauses[0] >= 1 and pauses == sorted(pauses) and pauses[-1] > pauses[0], pauses


def test_sighup_reaches_every_worker(make_server, tmp_path):
    """docs/scaling.md "Scaling", docs/operations.md "Reloading (SIGHUP)": SIGHUP to the master: every worker
    serves the new certificate."""
    _, (ca_b, cert_b, key_b), cert, key = two_certificates(str(tmp_path))
    srv = make_server("--workers", str(WORKERS), "--ssl-cert", cert, "--ssl-key", key,
                      with_tls=False)
    assert wait_until(lambda: srv.log().count("accepting on") == WORKERS)
    shutil.copyfile(cert_b, cert)
    shutil.copyfile(key_b, key)
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: "workers accept with the configuration read now" in srv.log(),
                      timeout=60), srv.log()
    # Hold every connection open, so the kernel must spread them over the workers.
    sessions = []
    try:
        for _ in range(4 * WORKERS):
            raw = srv.raw()
            raw.login(client_context(ca_b))  # verifies against the second CA only
            sessions.append(raw)
            assert raw.sock.getpeercert()["subject"][0][0][1] == "ssmtpd second"
    finally:
        for raw in sessions:
            raw.close()


@pytest.mark.parametrize("count", [1, WORKERS])
def test_connection_limits_hold_for_the_whole_server(make_server, count):
    """docs/scaling.md "Scaling": --max-connections and --max-connections-per-ip refuse at the same
    count with N workers as with one."""
    srv = make_server("--workers", str(count), "--max-connections", "6",
                      "--max-connections-per-ip", "4")
    assert wait_until(lambda: srv.log().count("accepting on" if count > 1 else "listening on")
                      == count)
    held = []

    def connect(source):
        raw = Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=10,
                                           source_address=(source, 0)))
        code, lines = raw.reply()
        held.append(raw)
        return code, lines[-1] if lines else ""

    try:
        assert [connect("127.0.0.1")[0] for _ in range(4)] == [220] * 4
        code, text = connect("127.0.0.1")
        assert code == 421 and "from your address" in text
        assert [connect("127.0.0.2")[0] for _ in range(2)] == [220] * 2
        code, text = connect("127.0.0.3")
        assert code == 421 and text.endswith("Too many connections, try again later")
        # A slot freed anywhere is free for everyone.
        held[0].close()
        assert wait_until(lambda: connect("127.0.0.3")[0] == 220)
    finally:
        for raw in held:
            raw.close()


def auth_code(srv, password: str) -> int:
    """The reply code to one AUTH PLAIN as USER, on a connection of its own."""
    raw = srv.raw()
    raw.hello(srv.tls_context())
    code = raw.cmd(f"AUTH PLAIN {plain_token(USER, password)}")[0]
    raw.close()
    return code


def test_failed_logins_count_across_workers(make_server):
    """docs/scaling.md "Scaling", docs/limits.md "Limits and abuse": the failed-login count is the server's, whichever worker saw them."""
    srv = make_server("--workers", str(WORKERS), "--max-auth-failures-per-ip", "6")
    assert wait_until(lambda: srv.log().count("accepting on") == WORKERS)
    # One failure per connection: the kernel spreads them over the workers.
    assert [auth_code(srv, "wrong") for _ in range(6)] == [535] * 6
    assert auth_code(srv, PASSWORD) == 421


def test_the_failure_that_blocks_refuses_the_next_auth_at_once(make_server):
    """docs/scaling.md "Scaling": the worker that saw the failure reaching the limit
    refuses its client's very next AUTH, even one already sent with it."""
    srv = make_server("--workers", "2", "--max-auth-failures-per-ip", "1",
                      "--auth-failure-window", "1", "--auth-failure-delay", "0")
    assert wait_until(lambda: srv.log().count("accepting on") == 2)
    for _ in range(5):
        raw = srv.raw()
        raw.hello(srv.tls_context())
        raw.send(f"AUTH PLAIN {plain_token(USER, 'wrong')}\r\n"
                 f"AUTH PLAIN {plain_token(USER, PASSWORD)}\r\n".encode())
        assert [raw.reply()[0], raw.reply()[0]] == [535, 421]
        raw.close()
        # The window passes, and the other worker's copy of the block, told
        # a moment later, with it: the next round starts unblocked.
        time.sleep(1.5)


def test_replacement_workers_learn_the_blocked_addresses(make_server):
    """docs/scaling.md "Scaling": a worker started after an address was blocked from AUTH
    refuses it too; the master tells new workers the blocks it holds."""
    srv = make_server("--workers", "2", "--max-auth-failures-per-ip", "3")
    assert wait_until(lambda: srv.log().count("accepting on") == 2)
    assert [auth_code(srv, "wrong") for _ in range(3)] == [535] * 3
    old = worker_pids(srv)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: srv.log().count("accepting on") == 4, timeout=30), srv.log()
    # The kernel spreads them over both new workers.
    assert [auth_code(srv, PASSWORD) for _ in range(4)] == [421] * 4
    assert len(srv.runs("auth")) == 3  # the auth program never ran for them


def test_a_block_told_to_workers_ends_with_its_window(make_server):
    """docs/limits.md "Limits and abuse": a worker lets the address log in again once
    the failures have left --auth-failure-window."""
    # The second failure and four refusals must fit in the window, however
    # slow the machine; the test then waits for the window to pass.
    window = 5.0
    srv = make_server("--workers", "2", "--max-auth-failures-per-ip", "2",
                      "--auth-failure-window", str(window))
    assert wait_until(lambda: srv.log().count("accepting on") == 2)
    first_sent = time.monotonic()
    assert [auth_code(srv, "wrong"), auth_code(srv, "wrong")] == [535, 535]
    blocked_at = time.monotonic()
    refused = [auth_code(srv, PASSWORD) for _ in range(4)]
    if time.monotonic() - first_sent >= window:
        pytest.skip(f"two failures and four refusals took {time.monotonic() - first_sent:.1f} s "
                    f"here, more than the {window} s window")
    assert refused == [421] * 4
    # Past the window, with room for a worker told of the block a moment late.
    time.sleep(max(0.0, blocked_at + window + 0.5 - time.monotonic()))
    assert [auth_code(srv, PASSWORD) for _ in range(4)] == [235] * 4


def test_workers_stop_when_the_master_dies(workers):
    """docs/scaling.md "Scaling": a worker notices its master is gone and drains and exits."""
    srv = workers()
    pids = worker_pids(srv)
    srv.proc.kill()
    srv.proc.wait()
    assert wait_until(lambda: not [pid for pid in pids if live(pid)], timeout=20), srv.log()
    assert srv.log().count("master gone: shutting down") == WORKERS


def test_one_worker_runs_no_master(make_server):
    """docs/scaling.md "Scaling": --workers 1 is one process, exactly as without the option."""
    srv = make_server("--workers", "1")
    raw = srv.raw()
    raw.login(srv.tls_context())
    assert raw.send_message()[0] == 250
    (run,) = srv.runs()
    assert run["ppid"] == srv.proc.pid
    assert "master" not in srv.log()


def test_replacement_worker_keeps_the_masters_configuration(make_server, tmp_path):
    """docs/scaling.md "Scaling": a worker started later runs on the settings the master read
    at start, not on a configuration file edited (here: broken) since."""
    ini = tmp_path / "edited.ini"
    ini.write_text("[ssmtpd]\nmax-recipients = 50\n")
    srv = make_server("--workers", "2", "-c", str(ini))
    assert wait_until(lambda: srv.log().count("accepting on") == 2)
    ini.write_text("[ssmtpd]\nmax-recipients = none\n")
    victim = worker_pids(srv)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: srv.log().count("accepting on") == 3, timeout=20), srv.log()
    for i in range(4):
        results = [None]
        submit(srv, f"later{i}@example.org", results, 0)
        assert results == [250]
    assert "--max-recipients" not in srv.log()


def test_sighup_at_once_after_start_kills_no_worker(make_server):
    """docs/scaling.md "Scaling", docs/operations.md "Signals": a SIGHUP that reaches a worker before it has its
    handler waits for it instead of killing the worker, and is then ignored (the
    master reloads); SIGHUPs to the master during a reload wait for it."""
    srv = make_server("--workers", str(WORKERS), start=False)
    srv.start()
    hupped = set()
    deadline = time.monotonic() + 20
    while len(hupped) < WORKERS and time.monotonic() < deadline:
        for pid in set(worker_pids(srv)) - hupped:
            os.kill(pid, signal.SIGHUP)  # at once: it is still starting
            hupped.add(pid)
        time.sleep(0.001)
    assert len(hupped) == WORKERS, srv.log()
    assert wait_until(lambda: srv.log().count("SIGHUP to worker") == WORKERS, timeout=20), \
        srv.log()
    # Three, while the first reload is still starting its workers: the others wait
    # for it and make one more reload (two if the first was already done).
    for _ in range(3):
        srv.signal(signal.SIGHUP)
        time.sleep(0.3)
    reloads = lambda: srv.log().count("workers accept with the configuration")  # noqa: E731
    assert wait_until(lambda: reloads() >= 2, timeout=120), srv.log()
    time.sleep(2)
    assert 2 <= reloads() <= 3, srv.log()
    assert srv.log().count("reload: starting") == reloads()
    assert wait_until(lambda: srv.log().count("of an earlier configuration stopped: exited "
                                              "with status 0") == reloads() * WORKERS,
                      timeout=60), srv.log()
    assert "killed by signal" not in srv.log(), srv.log()


def test_a_stalled_master_is_not_a_dead_one(make_server):
    """docs/scaling.md "Scaling": a master that does not answer for longer than a worker waits
    (here: stopped 12 s) costs new clients a 421 "try again later", not the workers:
    they keep their logged-in sessions, and count with the master again once it answers."""
    srv = make_server("--workers", "2")
    assert wait_until(lambda: srv.log().count("accepting on") == 2), srv.log()
    member = srv.raw(timeout=30)
    member.login(srv.tls_context())
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        newcomer = srv.raw(timeout=30)
        code, lines = newcomer.reply()  # the worker's question goes unanswered
        assert code == 421 and "try again later" in lines[-1], lines
        newcomer.close()
        assert member.cmd("NOOP")[0] == 250
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert member.send_message()[0] == 250
    assert "master gone" not in srv.log()
    # The late admission was given back: the per-address count is whole again.
    for _ in range(3):
        raw = srv.raw(timeout=30)
        raw.login(srv.tls_context())
        assert raw.send_message()[0] == 250
        raw.close()
