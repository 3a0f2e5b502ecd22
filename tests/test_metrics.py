"""--metrics-bind: Prometheus metrics of the whole server (docs/monitoring.md "Monitoring").

The test does known things (logins that work, fail, fail temporarily and are
throttled; messages accepted and rejected; a connection over the limit),
scrapes /metrics with curl while sessions are open, and checks every count.
"""

import glob
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (HOSTNAME, PASSWORD, USER, ServerProcess, free_port, plain_token,
                      shared_tmp_dir, wait_until)
from test_deploy import dedicated_user, in_namespace, views_for  # noqa: F401 (a fixture)


def scrape(port) -> dict:
    """{(sample name, labels as a sorted tuple): value} from curl's GET /metrics."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (.ci/run installs it)")
    out = subprocess.run([curl, "-fsS", f"http://127.0.0.1:{port}/metrics"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    samples = {}
    for family in text_string_to_metric_families(out.stdout.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def traffic(srv, port):
    """What the metrics must then show; returns two sessions still open."""
    for sender in ("a@example.org", "b@example.org", "exit1@example.org"):
        raw = srv.raw()
        raw.login(srv.tls_context())
        raw.send_message(body=b"Subject: m\r\n\r\n" + b"x" * 100 + b"\r\n", sender=sender)
        raw.cmd("QUIT")
        raw.close()
    raw = srv.raw()
    raw.hello(srv.tls_context())
    assert raw.cmd(f"AUTH PLAIN {plain_token('tempfail', PASSWORD)}")[0] == 454
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")[0] == 421  # throttled
    raw.close()
    # Every slot free again before the per-address limit of 2 is tried.
    assert wait_until(lambda: value(scrape(port), "ssmtpd_sessions") == 0, timeout=10)
    held = []
    for _ in range(2):
        raw = srv.raw()
        assert raw.reply()[0] == 220
        held.append(raw)
    refused = srv.raw()
    assert refused.reply()[0] == 421  # the per-address limit of 2
    refused.close()
    return held


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_count_what_happened(make_server, workers):
    """docs/monitoring.md "Monitoring": every SPEC metric, scraped during traffic, matches what the
    test did, with one process and summed over workers."""
    port = free_port()
    srv = make_server("--metrics-bind", f"127.0.0.1:{port}", "--workers", str(workers),
                      "--max-auth-failures-per-ip", "1", "--max-connections-per-ip", "2")
    if workers > 1:
        assert wait_until(lambda: srv.log().count("accepting on") == workers)
    base = scrape(port)
    probes = value(base, "ssmtpd_connections_total", result="accepted")  # the harness's
    held = traffic(srv, port)
    try:
        # The last session's end is recorded after its client saw the close.
        assert wait_until(lambda: value(scrape(port), "ssmtpd_sessions") == 2, timeout=10)
        m = scrape(port)
        assert value(m, "ssmtpd_connections_total", result="accepted") == probes + 6
        assert value(m, "ssmtpd_connections_total", result="max-connections-per-ip") == 1
        assert value(m, "ssmtpd_auth_total", result="ok", cached="no") == 3
        assert value(m, "ssmtpd_auth_total", result="invalid", cached="no") == 1
        assert value(m, "ssmtpd_auth_total", result="tempfail", cached="no") == 1
        assert value(m, "ssmtpd_auth_total", result="throttled", cached="no") == 1
        assert value(m, "ssmtpd_messages_total", code="250") == 2
        assert value(m, "ssmtpd_messages_total", code="554") == 1
        # Each message: the 106 octets sent, plus the Received header.
        assert 3 * 106 < value(m, "ssmtpd_message_bytes_total") < 3 * 106 + 3 * 300
        assert value(m, "ssmtpd_auth_program_seconds_count") == 5
        assert value(m, "ssmtpd_process_program_seconds_count") == 3
        assert value(m, "ssmtpd_process_program_seconds_bucket", le="+Inf") == 3
    finally:
        for raw in held:
            raw.close()
    assert wait_until(lambda: value(scrape(port), "ssmtpd_sessions") == 0, timeout=10)


def test_metrics_port_in_use_is_a_start_up_error(tmp_path, certs):
    """docs/configuration.md "Configuration": a --metrics-bind that cannot be bound: one line, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        srv = ServerProcess(str(tmp_path), certs, ["--metrics-bind", f"127.0.0.1:{port}"])
        result = subprocess.run(srv.argv, env=srv.env, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"ssmtpd: --metrics-bind: cannot listen on 127.0.0.1 port {port}: Address already in use"]


# --- bounded like the SMTP side (docs/monitoring.md "Monitoring") ----------------------------

IDLE = 2000
# docs/monitoring.md "Monitoring": the listener's bounds.
METRICS_CLIENTS = 16
METRICS_DEADLINE = 5.0
# What the process serving /metrics may open: the systemd default soft limit,
# well above what --max-connections 100 needs, well below 2000 idle connections.
SERVER_FILES = 1024


def fd_count(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connections_held(pid, port) -> int:
    """Descriptors `pid` holds of TCP connections to its `port` (its listener not
    counted): a client's close reaches the server a moment after the client."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        except OSError:
            pass  # closed meanwhile
    return held


def enough_descriptors(count) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"{count} descriptors needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def idle_connections(port, count, seconds=60.0):
    """Up to `count` connections that send nothing; stops early when the port
    stops taking them (five connects in a row fail)."""
    held, failed_in_a_row = [], 0
    deadline = time.monotonic() + seconds
    while len(held) < count and failed_in_a_row < 5 and time.monotonic() < deadline:
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            failed_in_a_row = 0
        except OSError:
            failed_in_a_row += 1
    return held


def closed_by_server(socks, seconds):
    """Wait up to `seconds` for EOF (or a reset) on every socket; the ones still open."""
    left = {sock.fileno(): sock for sock in socks}
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + seconds
    while left and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            try:
                data = left[fd].recv(4096)
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del left[fd]
    return list(left.values())


def submit(srv) -> int:
    raw = srv.raw(timeout=10)
    try:
        raw.login(srv.tls_context())
        return raw.send_message()[0]
    finally:
        raw.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_idle_metrics_connections_leave_smtp_and_supervision_alone(make_server, workers):
    """docs/monitoring.md "Monitoring": 2000 idle connections to the metrics port while SMTP
    sessions run: at most 16 are served at once, the rest closed at once, so new
    SMTP clients are greeted and served and (with --workers) a killed worker is
    replaced; the 16 are cut at the 5 s deadline, and /metrics counts right."""
    enough_descriptors(IDLE + 256)
    mport = free_port()
    srv = make_server("--metrics-bind", f"127.0.0.1:{mport}", "--workers", str(workers),
                      "--max-connections", "100")
    if workers > 1:
        assert wait_until(lambda: srv.log().count("accepting on") == workers)
    metrics_pid = srv.proc.pid  # the one process, or the master
    _, hard = resource.prlimit(metrics_pid, resource.RLIMIT_NOFILE)
    resource.prlimit(metrics_pid, resource.RLIMIT_NOFILE, (SERVER_FILES, hard))
    base = scrape(mport)
    accepted = value(base, "ssmtpd_connections_total", result="accepted")
    files_before = fd_count(metrics_pid)

    running = srv.raw(timeout=10)  # a session under way through all of it
    running.login(srv.tls_context())
    idle = idle_connections(mport, IDLE)
    try:
        flooded = time.monotonic()
        assert running.send_message()[0] == 250
        for _ in range(3):
            assert submit(srv) == 250
        messages, sessions = 4, 4
        running.close()
        if workers > 1:
            victim = sorted(int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) started",
                                                            srv.log()))[0]
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: srv.log().count("accepting on") == workers + 1,
                              timeout=15), srv.log()[-2000:]
            assert submit(srv) == 250
            messages, sessions = messages + 1, sessions + 1
        assert fd_count(metrics_pid) <= files_before + METRICS_CLIENTS + 8
        assert len(idle) == IDLE, f"the metrics port stopped taking connections at {len(idle)}"
        # Over the cap: closed at once; the others (all accepted before the flood
        # ended) at the deadline, not much later.
        left = closed_by_server(
            idle, max(2.0, METRICS_DEADLINE + 5 - (time.monotonic() - flooded)))
        assert not left, f"{len(left)} idle metrics connections still open"
    finally:
        for sock in idle:
            sock.close()
        running.close()
    assert wait_until(lambda: value(scrape(mport), "ssmtpd_sessions") == 0, timeout=10)
    m = scrape(mport)
    assert value(m, "ssmtpd_connections_total", result="accepted") == accepted + sessions
    assert value(m, "ssmtpd_messages_total", code="250") == messages
    assert value(m, "ssmtpd_auth_total", result="ok", cached="no") == sessions
    assert "Traceback" not in srv.log()


def http(port, request: bytes, timeout=10.0):
    """(status line, the rest) of the one answer the connection gets, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_answer(sock)


def read_answer(sock):
    data = b""
    deadline = time.monotonic() + sock.gettimeout()
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status, _, rest = data.partition(b"\r\n")
    return status.decode("latin-1"), rest


def test_one_answer_per_connection_and_only_metrics(make_server):
    """docs/monitoring.md "Monitoring": GET or HEAD /metrics, one answer, then the connection
    closes; other paths 404, other methods 405, a request head over 8 KiB 431."""
    mport = free_port()
    make_server("--metrics-bind", f"127.0.0.1:{mport}")
    status, rest = http(mport, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers.split(b"\r\n")
    assert body.count(b"# TYPE ssmtpd_sessions gauge") == 1  # not a second answer
    status, rest = http(mport, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.1 200 OK" and rest.endswith(b"\r\n\r\n")
    assert http(mport, b"GET / HTTP/1.0\r\n\r\n")[0] == "HTTP/1.1 404 Not Found"
    assert http(mport, b"POST /metrics HTTP/1.0\r\n\r\n")[0] == \
        "HTTP/1.1 405 Method Not Allowed"
    long = b"GET /metrics HTTP/1.0\r\nX: " + b"x" * 9000 + b"\r\n\r\n"
    assert http(mport, long)[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert http(mport, b"nonsense\r\n\r\n")[0] == "HTTP/1.1 400 Bad Request"


def test_out_of_descriptors_scrapes_wait_with_one_line_logged(make_server):
    """docs/monitoring.md "Monitoring": while the server is out of descriptors, a scrape waits
    (one line in the log, however long it lasts; no traceback) and is answered
    once descriptors are free again."""
    mport = free_port()
    srv = make_server("--metrics-bind", f"127.0.0.1:{mport}", "--max-connections-per-ip", "100")
    pid = srv.proc.pid
    scrape(mport)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = fd_count(pid) + 4
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    held, waiting = [], []
    try:
        # More SMTP clients than descriptors left: the rest wait in the backlog.
        held = [srv.raw(timeout=5) for _ in range(10)]
        assert wait_until(lambda: fd_count(pid) >= limit - 1)
        for _ in range(6):  # scrapes over 3 s, each met by a full descriptor table
            sock = socket.create_connection(("127.0.0.1", mport), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            waiting.append(sock)
            time.sleep(0.5)
    finally:
        for raw in held:
            raw.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    try:
        for sock in waiting:
            assert read_answer(sock)[0] == "HTTP/1.1 200 OK"
    finally:
        for sock in waiting:
            sock.close()
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("metrics: accept: Too many open files") == 1, log[-3000:]


def test_master_out_of_descriptors_answers_503(make_server):
    """docs/monitoring.md "Monitoring": a master that cannot open the workers' files answers
    503 (one line in the log, no traceback), and 200 once it can again."""
    mport = free_port()
    srv = make_server("--metrics-bind", f"127.0.0.1:{mport}", "--workers", "2")
    assert wait_until(lambda: srv.log().count("accepting on") == 2)
    scrape(mport)
    pid = srv.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Counted once the last scrape's connection is closed: a descriptor that
    # went with it would leave room for a file.
    assert wait_until(lambda: connections_held(pid, mport) == 0)
    # Room for the scrape's connection, none for the files it reads.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid) + 1, hard))
    try:
        for _ in range(3):
            assert http(mport, b"GET /metrics HTTP/1.0\r\n\r\n")[0] == \
                "HTTP/1.1 503 Service Unavailable"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert http(mport, b"GET /metrics HTTP/1.0\r\n\r\n")[0] == "HTTP/1.1 200 OK"
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("metrics: cannot collect the values: Too many open files") == 1, log[-3000:]


# A process program of the same user as the workers, looking for a way to
# write into their metrics directory: by its path, and through the
# descriptors of the worker that started it and of the master.
TRESPASSER = r"""#!/bin/sh
out="$TEST_RECORD/tries"
id -u > "$out"
master=$(sed 's/.*) //' "/proc/$PPID/stat" | cut -d' ' -f2)
for d in "$TMPDIR"/ssmtpd-metrics-* "$TMPDIR"/ssmtpd-metrics-*/* \
         /proc/$PPID/fd/* /proc/$master/fd/*; do
    if ls "$d/" > /dev/null 2>&1; then echo "listed $d" >> "$out"; fi
    if (: > "$d/forged.db") 2>/dev/null; then echo "wrote $d" >> "$out"; fi
done
echo "variable ${PROMETHEUS_MULTIPROC_DIR:-unset}" >> "$out"
cat > /dev/null
"""
PASSWORD_CHECK = """#!/bin/sh
[ "$SSMTPD_PASSWORD" = secret ]
"""


def test_programs_cannot_write_the_workers_metrics(dedicated_user, certs):
    """docs/monitoring.md "Monitoring": started as root with --user and --workers, the
    directory of the workers' metric files is out of the programs' reach,
    though they run as the same user: not by its path, not through /proc."""
    user = dedicated_user
    with shared_tmp_dir("ssmtpd-metrics-test-", 0o755) as top:
        records, tmpdir = os.path.join(top, "records"), os.path.join(top, "tmp")
        os.mkdir(records, 0o755)
        os.chown(records, user.pw_uid, user.pw_gid)
        os.mkdir(tmpdir)
        os.chmod(tmpdir, 0o1777)
        programs = []
        for name, text in (("auth", PASSWORD_CHECK), ("process", TRESPASSER)):
            programs.append(os.path.join(top, name))
            with open(programs[-1], "w") as f:
                f.write(text)
            os.chmod(programs[-1], 0o755)
        mport = free_port()
        srv = ServerProcess(top, certs, defaults=False)
        srv.argv = in_namespace(views=views_for(user, top), cwd=top, argv=srv.argv + [
            "--bind", "127.0.0.1", "--port", str(srv.port), "--hostname", HOSTNAME,
            "--ssl-cert", srv.cert, "--ssl-key", srv.key, "--auth", programs[0],
            "--process", programs[1], "--workers", "2", "--user", user.pw_name,
            "--metrics-bind", f"127.0.0.1:{mport}"])
        srv.env.update(TEST_RECORD=records, TMPDIR=tmpdir)
        srv.start(wait_port=srv.port)
        try:
            assert wait_until(lambda: srv.log().count("accepting on") == 2, timeout=30), \
                srv.log()
            raw = srv.raw()
            raw.login(srv.tls_context())
            assert raw.send_message()[0] == 250
            raw.close()
            with open(os.path.join(records, "tries")) as f:
                uid, *tries = f.read().splitlines()
            assert uid == str(user.pw_uid)
            assert tries == ["variable unset"], tries
            # Not for want of a directory: the workers' values are in it.
            values = glob.glob(os.path.join(tmpdir, "ssmtpd-metrics-*", "values"))
            assert len(values) == 1 and glob.glob(os.path.join(values[0], "*.db"))
            assert value(scrape(mport), "ssmtpd_messages_total", code="250") == 1
        finally:
            assert srv.stop() == 0, srv.log()
        assert os.listdir(values[0]) == []  # what the master could remove
