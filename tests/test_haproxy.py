"""A real HAProxy in front of two ssmtpd instances, speaking PROXY v2 and v1 (docs/scaling.md "Scaling").

The HAProxy configuration is the one docs/scaling.md "Scaling" shows, with loopback
ports filled in.  Clients connect to HAProxy from 127.0.0.2 and 127.0.0.3;
HAProxy connects to ssmtpd from 127.0.0.1, the only --proxy-trusted address.
"""

import contextlib
import shutil
import socket
import subprocess

import pytest

from conftest import PASSWORD, USER, Raw, free_port, plain_token, stop_process, wait_for_port, wait_until

# The configuration of docs/scaling.md "HAProxy"; {…} are filled in by the test.
HAPROXY_CFG = """\
global
    maxconn 1000

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

# Submission: clients connect here; each server gets a PROXY v2 header.
frontend submission
    bind {bind}:{port_v2}
    default_backend ssmtpd

backend ssmtpd
    balance roundrobin
    # An SMTP health check (greeting, EHLO, 250) that also sends a PROXY
    # header: a v2 LOCAL one, so ssmtpd keeps HAProxy's own address for it.
    option smtpchk EHLO haproxy.test
    default-server send-proxy-v2 check check-send-proxy inter 1s
    server a {server_a}
    server b {server_b}

# The same with PROXY v1 (text), for balancers that only speak that.
frontend submission_v1
    bind {bind}:{port_v1}
    default_backend ssmtpd_v1

backend ssmtpd_v1
    server a {server_a} send-proxy
"""


PROBE_ADDRESSES = ("127.0.0.9", "127.0.0.10")


@contextlib.contextmanager
def haproxy_in_front_of(a, b, tmp_path):
    """HAProxy with the configuration of docs/scaling.md "HAProxy" before servers a and b: (port_v2, port_v1)."""
    if not shutil.which("haproxy"):
        pytest.fail("haproxy is not installed (.ci/run installs Debian's haproxy)")
    port_v2, port_v1 = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(bind="127.0.0.1", port_v2=port_v2, port_v1=port_v1,
                                      server_a=f"127.0.0.1:{a.port}",
                                      server_b=f"127.0.0.1:{b.port}"))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        # Each from an address of its own: HAProxy passes these probes on with
        # a PROXY header, and two from one address, or one from 127.0.0.1 (the
        # health checks' address), could meet in a server and find that
        # address's one slot taken (--max-connections-per-ip 1).
        wait_for_port(port_v2, proc=proc, source=PROBE_ADDRESSES[0])
        wait_for_port(port_v1, proc=proc, source=PROBE_ADDRESSES[1])
        yield port_v2, port_v1
    finally:
        stop_process(proc, timeout=10)
        log.close()


@pytest.fixture
def haproxy_front(make_server, tmp_path):
    # At DEBUG: the health checks' lines are there only (docs/logging.md "Logging").
    common = ("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
              "--max-connections-per-ip", "1", "--log-level", "debug")
    a, b = make_server(*common), make_server(*common)
    with haproxy_in_front_of(a, b, tmp_path) as (port_v2, port_v1):
        yield a, b, port_v2, port_v1


def through(port, source) -> Raw:
    return Raw(socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=(source, 0)))


def submit(srv_tls, port, source, sender):
    raw = through(port, source)
    raw.login(srv_tls)
    code = raw.send_message(sender=sender)[0]
    raw.cmd("QUIT")
    raw.close()
    return code


def all_runs(*servers):
    return {r["env"]["SSMTPD_MAIL_FROM"]: r for srv in servers for r in srv.runs()}


def test_messages_through_haproxy_carry_the_client_address(haproxy_front):
    """docs/scaling.md "Scaling": through PROXY v2 and v1, the program sees the client's address, not
    HAProxy's, in SSMTPD_CLIENT_ADDR and the Received header; both servers serve."""
    a, b, port_v2, port_v1 = haproxy_front
    ctx = a.tls_context()
    for i in range(6):
        assert submit(ctx, port_v2, "127.0.0.2", f"v2-{i}@example.org") == 250
    assert submit(ctx, port_v1, "127.0.0.3", "v1@example.org") == 250
    runs = all_runs(a, b)
    assert len(runs) == 7
    for sender, run in runs.items():
        expected = "127.0.0.3" if sender.startswith("v1") else "127.0.0.2"
        assert run["env"]["SSMTPD_CLIENT_ADDR"] == expected
        assert f"([{expected}])" in run["stdin"]
    assert a.runs() and b.runs(), "round robin should have used both servers"


def test_per_address_limit_counts_real_clients_behind_haproxy(haproxy_front):
    """docs/scaling.md "Scaling": --max-connections-per-ip 1 counts the clients in the headers: two
    servers hold at most two connections of 127.0.0.2, so of three one is refused;
    127.0.0.3 is still served."""
    a, b, port_v2, _ = haproxy_front
    held = []
    try:
        codes = []
        for _ in range(3):
            raw = through(port_v2, "127.0.0.2")
            code, lines = raw.reply()
            codes.append(code)
            held.append(raw)
            if code == 421:
                assert "from your address" in lines[-1]
        assert codes.count(220) <= 2 and 421 in codes, codes
        other = through(port_v2, "127.0.0.3")
        held.append(other)
        assert other.reply()[0] == 220
    finally:
        for raw in held:
            raw.close()


def test_health_checks_do_not_disturb(haproxy_front):
    """docs/scaling.md "Scaling", docs/logging.md "Logging": HAProxy's SMTP health checks (v2 LOCAL) are served as
    HAProxy's own connections, end cleanly, are logged at DEBUG only, and leave service and
    limits alone."""
    a, b, port_v2, _ = haproxy_front
    checked = "DEBUG [", "127.0.0.1 -: disconnected: closed after 221"  # EHLO, 250, QUIT
    for srv in (a, b):
        assert wait_until(lambda: sum(all(part in line for part in checked)
                                      for line in srv.log().splitlines()) >= 2,
                          timeout=15), srv.log()
        assert not [line for line in srv.log().splitlines()
                    if "] 127.0.0.1 " in line and " DEBUG " not in line], srv.log()
    ctx = a.tls_context()
    for i in range(4):
        assert submit(ctx, port_v2, "127.0.0.2", f"hc-{i}@example.org") == 250
    for srv in (a, b):
        log = srv.log()
        assert "Traceback" not in log
        # Only the test harness's own probe of the port, before HAProxy started:
        # a connection that closed before its header, a health check too.
        assert log.count("closed: PROXY header") == 0, log
        assert log.count("disconnected: closed before a PROXY header") == 1, log
        assert "refused" not in log


def test_direct_connection_from_untrusted_address_gets_nothing(haproxy_front):
    """docs/scaling.md "Scaling": a client that goes around HAProxy is closed without a byte."""
    a, _, _, _ = haproxy_front
    raw = Raw(socket.create_connection(("127.0.0.1", a.port), timeout=10,
                                       source_address=("127.0.0.5", 0)))
    raw.send(b"EHLO sneaky.test\r\n")
    assert raw.closed(timeout=5)
    assert raw.buf == b""


def test_instances_behind_haproxy_share_failed_logins_through_redis(make_server, tmp_path):
    """docs/scaling.md "Scaling": both instances behind HAProxy name one --state Redis, as the
    docs/scaling.md shows: a client's failed logins, spread over both by round robin, are counted
    together, so its next login is refused 421 by whichever instance it reaches."""
    from test_state import Redis
    redis = Redis(tmp_path).start()
    try:
        common = ("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
                  "--max-auth-failures-per-ip", "4", "--state", redis.url)
        a, b = make_server(*common), make_server(*common)
        ctx = a.tls_context()
        with haproxy_in_front_of(a, b, tmp_path) as (port_v2, _):
            codes = []
            for password in ("wrong",) * 4 + (PASSWORD,) * 2:
                raw = through(port_v2, "127.0.0.4")
                raw.hello(ctx)
                codes.append(raw.cmd(f"AUTH PLAIN {plain_token(USER, password)}")[0])
                raw.close()
            assert codes == [535] * 4 + [421] * 2, codes
            failed = [srv.log().count("127.0.0.4") for srv in (a, b)]
            assert all(failed), f"round robin sent every login to one instance: {failed}"
            # Another client is not blocked.
            raw = through(port_v2, "127.0.0.5")
            raw.hello(ctx)
            assert raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")[0] == 235
            raw.close()
    finally:
        redis.kill()
