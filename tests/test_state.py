"""--state redis://...: the windowed counts shared by several instances
(docs/limits.md "Accounts and limits", docs/scaling.md "Scaling").

A real Redis (Debian's redis-server, which .ci/run installs) started by the
test on a loopback port with its own configuration, and stopped after.
"""

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import PASSWORD, free_port, make_certs, plain_token, wait_for_port, wait_until
from test_accounts import send, session
from test_metrics import scrape, value
from test_workers import worker_pids

from ssmtpd.state import RETRY_AFTER

REDIS_PASSWORD = "r3dis-pw-5e1f"


class Redis:
    def __init__(self, directory, certs=None):
        self.directory = str(directory)
        self.port = free_port()
        self.proc = None
        self.certs = certs  # (ca, cert, key): TLS only, on self.port

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, "redis.sock")

    @property
    def url(self) -> str:
        if self.certs:
            return (f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"
                    f"?ssl_cert_reqs=required&ssl_ca_certs={self.certs[0]}")
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        conf = os.path.join(self.directory, "redis.conf")
        if self.certs:
            ca, cert, key = self.certs
            ports = (f"port 0\ntls-port {self.port}\ntls-cert-file {cert}\n"
                     f"tls-key-file {key}\ntls-ca-cert-file {ca}\ntls-auth-clients no\n")
        else:
            ports = f"port {self.port}\n"
        with open(conf, "w") as f:
            f.write(f"bind 127.0.0.1\n{ports}requirepass {REDIS_PASSWORD}\n"
                    f"dir {self.directory}\nsave \"\"\nappendonly no\ndaemonize no\n"
                    "protected-mode yes\nlogfile \"\"\n"
                    f"unixsocket {self.socket}\nunixsocketperm 700\n")
        self.proc = subprocess.Popen([binary, conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis(tmp_path):
    server = Redis(tmp_path)
    server.start()
    yield server
    server.kill()


def auth_code(srv, password):
    raw = srv.raw(timeout=30)
    try:
        raw.hello(srv.tls_context())
        return raw.cmd(f"AUTH PLAIN {plain_token('alice', password)}")[0]
    finally:
        raw.close()


def test_two_instances_share_failed_logins_and_the_per_user_limit(make_server, redis):
    """docs/limits.md "Accounts and limits": two instances naming one Redis (one of them with
    --workers 2) count together: the failure past --max-auth-failures-per-ip across both
    gets 421 from either, and a user's fourth message with 3/1h is refused on either; the
    Redis password is in no line."""
    common = ["--state", redis.url, "--max-connections-per-ip", "100",
              "--max-auth-failures-per-ip", "3", "--max-messages-per-user", "3/1h"]
    a, b = make_server(*common, "--workers", "2"), make_server(*common)
    assert wait_until(lambda: a.log().count("accepting on") == 2), a.log()
    assert [send(a), send(b), send(a)] == [250] * 3
    for srv in (a, b, a, b):
        raw = session(srv)
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
        raw.close()
    assert [auth_code(a, "wrong"), auth_code(b, "wrong"), auth_code(a, "wrong")] == [535] * 3
    assert auth_code(b, PASSWORD) == 421 and auth_code(a, PASSWORD) == 421
    for srv in (a, b):
        assert REDIS_PASSWORD not in srv.log()


def test_recipients_are_counted_together_and_a_take_is_seen_at_once(make_server, redis):
    """docs/limits.md "Accounts and limits": --max-recipients-per-user 3/1h over two instances:
    two recipients taken on one leave room for one RCPT on either, even right after the
    take on the instance that made it."""
    common = ["--state", redis.url, "--max-connections-per-ip", "100",
              "--max-recipients-per-user", "3/1h"]
    a, b = make_server(*common), make_server(*common)
    for srv in (a, b):  # each has seen the room before the take
        raw = session(srv, "erin")
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        raw.close()
    assert send(a, user="erin", rcpts=("one@example.org", "two@example.org")) == 250
    for srv in (a, b):
        raw = session(srv, "erin")
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<three@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<four@example.org>")[0] == 450
        raw.close()


def test_in_redis_a_window_frees_up_and_a_refused_message_counts_for_nothing(make_server,
                                                                             redis):
    """docs/limits.md "Accounts and limits", with --state: 2/3s,10/1h: a message the program
    refuses is given back, two are accepted, the third refused, and once 3 s have passed
    the short window has room again while the hour's still counts; several rounds, so
    the windows' running sums in Redis are taken down as messages leave them."""
    srv = make_server("--state", redis.url, "--max-connections-per-ip", "100",
                      "--max-messages-per-user", "2/3s,10/1h")
    assert send(srv, user="frank", sender="exit1@example.org") == 554
    for _ in range(3):
        assert [send(srv, user="frank"), send(srv, user="frank")] == [250, 250]
        raw = session(srv, "frank")
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
        raw.close()
        time.sleep(3.5)
    # 6 of the hour's 10 taken: two more rounds of two fit, the eleventh does not.
    assert [send(srv, user="frank"), send(srv, user="frank")] == [250, 250]
    time.sleep(3.5)
    assert [send(srv, user="frank"), send(srv, user="frank")] == [250, 250]
    time.sleep(3.5)
    raw = session(srv, "frank")
    assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
    raw.close()
    assert "counting locally" not in srv.log()


def test_redis_failing_is_not_a_mail_outage(make_server, redis):
    """docs/limits.md "Accounts and limits": Redis stopped (SIGSTOP) and then killed during traffic:
    every message is still accepted, each instance counts locally, one ERROR line, the
    metric counts the failures; Redis back: counting is shared again."""
    mport = free_port()
    common = ["--state", redis.url, "--state-timeout", "0.5", "--max-connections-per-ip",
              "100", "--max-messages-per-user", "3/1h"]
    a = make_server(*common, "--metrics-bind", f"127.0.0.1:{mport}")
    b = make_server(*common)
    assert send(a, user="before") == 250
    redis.proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    assert send(a, user="bob") == 250 and send(b, user="bob") == 250
    # Each call waited --state-timeout at most: a handful per message.
    assert time.monotonic() - started < 30
    redis.kill()
    assert [send(a, user="bob"), send(b, user="bob")] == [250, 250]
    for srv in (a, b):
        assert wait_until(lambda: "counting locally" in srv.log()), srv.log()
        assert srv.log().count("counting locally") == 1, srv.log()
        assert REDIS_PASSWORD not in srv.log()
    assert wait_until(lambda: value(scrape(mport), "ssmtpd_state_errors_total") > 0)
    # Locally, each instance counts only what it saw: a fourth of bob's on a is refused.
    assert send(a, user="bob") == 250
    raw = session(a, "bob")
    assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
    raw.close()
    # Back on the same port: shared again, from the first call made once the
    # second each instance leaves a failed Redis alone has passed.
    redis.start()
    time.sleep(RETRY_AFTER + 0.5)
    assert [send(a, user="carol"), send(b, user="carol"), send(a, user="carol")] == [250] * 3
    for srv in (b, a):
        raw = session(srv, "carol")
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
        raw.close()
        assert "answers again; counting there" in srv.log(), srv.log()


def test_a_failing_redis_is_one_error_line_for_the_whole_server(make_server, redis):
    """docs/limits.md "Accounts and limits": with --workers 2, Redis killed, both workers count
    locally and the server logs one ERROR line about it, not one per worker; and a
    stopped Redis is waited for once a second, not at every call."""
    mport = free_port()
    srv = make_server("--state", redis.url, "--state-timeout", "1", "--workers", "2",
                      "--max-connections-per-ip", "100", "--metrics-bind", f"127.0.0.1:{mport}")
    assert wait_until(lambda: srv.log().count("accepting on") == 2), srv.log()
    redis.proc.send_signal(signal.SIGSTOP)
    # A message makes four calls (AUTH's look, MAIL, RCPT, DATA's take): the
    # first waits --state-timeout and fails, the others find Redis left alone
    # (a second more between two commands would make one more try).
    assert send(srv, user="bob") == 250
    assert wait_until(lambda: value(scrape(mport), "ssmtpd_state_errors_total") >= 1)
    assert value(scrape(mport), "ssmtpd_state_errors_total") <= 2
    redis.kill()
    workers = set(worker_pids(srv))
    for _ in range(40):  # the kernel picks the worker: until both have served
        assert send(srv, user="bob") == 250
        if {run["ppid"] for run in srv.runs()} >= workers:
            break
    assert {run["ppid"] for run in srv.runs()} >= workers, "one worker served every message"
    assert srv.log().count("counting locally") == 1, srv.log()


def test_a_stopped_redis_never_stalls_other_clients(make_server, redis):
    """docs/limits.md "Accounts and limits": Redis calls run off the event loop: while a session
    waits --state-timeout (1.5 s) on a stopped Redis, another client's replies come at
    once."""
    srv = make_server("--state", redis.url, "--state-timeout", "1.5")
    probe = srv.raw(timeout=30)
    assert probe.reply()[0] == 220
    redis.proc.send_signal(signal.SIGSTOP)
    results = []
    sender = threading.Thread(target=lambda: results.append(send(srv, user="bob")))
    sender.start()
    slowest = 0.0
    deadline = time.monotonic() + 60
    while sender.is_alive() and time.monotonic() < deadline:
        began = time.monotonic()
        assert probe.cmd("EHLO client.test")[0] == 250
        slowest = max(slowest, time.monotonic() - began)
        time.sleep(0.05)
    sender.join(60)
    assert results == [250]
    assert "counting locally" in srv.log()
    assert slowest < 0.5, slowest
    probe.close()


def test_rediss_shares_counts_over_tls_and_checks_the_certificate(make_server, tmp_path, certs):
    """docs/limits.md "Accounts and limits": rediss:// with the CA named in the URL: two instances
    share a user's limit over TLS, --check-config says Redis answered; with another CA
    the certificate is refused, the server counts locally and mail still goes."""
    certs_dir = tmp_path / "redis-certs"
    certs_dir.mkdir()
    redis = Redis(tmp_path, make_certs(str(certs_dir), serial_cn="redis test")).start()
    try:
        common = ["--state", redis.url, "--max-connections-per-ip", "100",
                  "--max-messages-per-user", "2/1h"]
        a, b = make_server(*common), make_server(*common)
        assert [send(a, user="dave"), send(b, user="dave")] == [250, 250]
        for srv in (a, b):
            raw = session(srv, "dave")
            assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
            raw.close()
            assert "counting locally" not in srv.log(), srv.log()
        check = make_server("--state", redis.url, "--check-config", start=False)
        out = subprocess.run(check.argv, env=check.env, capture_output=True, timeout=60,
                             cwd=check.workdir)
        assert out.returncode == 0 and b"--state rediss://127.0.0.1" in out.stdout, out
        assert b" answered" in out.stdout and REDIS_PASSWORD.encode() not in out.stdout, out
        # The server's own test CA is not the one that signed Redis's certificate.
        other_ca = redis.url.replace(redis.certs[0], certs[0])
        c = make_server("--state", other_ca, "--max-connections-per-ip", "100",
                        "--max-messages-per-user", "2/1h")
        assert [send(c, user="dave"), send(c, user="dave")] == [250, 250]
        assert wait_until(lambda: "counting locally" in c.log()), c.log()
        assert "certificate verify failed" in c.log(), c.log()
        assert REDIS_PASSWORD not in c.log() + a.log() + b.log()
    finally:
        redis.kill()


def test_check_config_says_whether_redis_answered(make_server, redis, tmp_path):
    """docs/limits.md "Accounts and limits": --check-config connects and says whether Redis
    answered; one that does not is reported, not an error; the password is not shown."""
    for url, words in ((redis.url, "answered"),
                       (f"unix://{redis.socket}?db=0&password={REDIS_PASSWORD}", "answered"),
                       (f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
                        "did not answer")):
        srv = make_server("--state", url, "--check-config", start=False)
        out = subprocess.run(srv.argv, env=srv.env, capture_output=True, timeout=60,
                             cwd=srv.workdir)
        text = out.stdout.decode() + out.stderr.decode()
        assert out.returncode == 0, text
        assert f"ssmtpd: --state {url.split(':', 1)[0]}://" in text and words in text, text
        assert "configuration OK" in text and REDIS_PASSWORD not in text, text


def test_concurrent_sessions_over_two_instances_take_exactly_the_limit(make_server, redis):
    """docs/limits.md "Accounts and limits": 20 sessions of one user at once, spread over two
    instances sharing one Redis, against --max-messages-per-user 10/1h, all past MAIL,
    RCPT and DATA before any final dot: exactly 10 accepted, the others answered 450."""
    common = ["--state", redis.url, "--max-connections-per-ip", "100",
              "--max-messages-per-user", "10/1h"]
    servers = (make_server(*common), make_server(*common))
    results = [None] * 20
    # Every session waits here with its data sent but the final dot: the
    # limit is then decided by the check-and-take alone.
    ready = threading.Barrier(20, timeout=90)

    def one(i):
        try:
            raw = session(servers[i % 2])
            raw.start_data()
            raw.send(b"Subject: t\r\n\r\nhello\r\n")
            ready.wait()
            raw.send(b".\r\n")
            results[i] = raw.reply()[0]
            raw.close()
        except Exception as e:  # reported by the assertion on results
            results[i] = repr(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [250] * 10 + [450] * 10, results
    assert sum(len(srv.runs()) for srv in servers) == 10


def test_the_password_of_a_state_url_is_never_shown():
    """docs/limits.md "Accounts and limits": a password in the URL, in the user part or in a
    unix:// query, is left out of what the server writes about --state."""
    from ssmtpd.state import safe_url
    assert safe_url(f"redis://:{REDIS_PASSWORD}@10.0.0.20:6379/0") == "redis://10.0.0.20:6379/0"
    assert safe_url(f"rediss://u:{REDIS_PASSWORD}@[::1]:6380/2") == "rediss://[::1]:6380/2"
    assert safe_url(f"unix:///run/redis.sock?db=1&password={REDIS_PASSWORD}") == \
        "unix:///run/redis.sock"
