"""--auth-cache-ttl / --auth-cache-negative-ttl: the auth program's answers reused
(docs/auth-program.md "The auth cache").

The auth program of these tests appends one line per run to a file (its parent's
pid and the username), so a test counts runs and knows which process ran them.
"""

import base64
import json
import os
import re
import signal
import time

import pytest

from conftest import free_port, plain_token, wait_until
from test_abuse import JSON_FILTER, FILTER, fail2ban_ips
from test_metrics import scrape, value

GOOD = "pw-Good-4f1c"
WRONG = "pw-Wrong-9e2d"
OTHER_WRONG = "pw-Other-77ab"

AUTH = """#!/bin/sh
echo "$PPID $SSMTPD_USERNAME $SSMTPD_MECHANISM" >> "$TEST_RECORD/auth-runs"
[ "$SSMTPD_USERNAME" = tempfail ] && exit 75
[ "$SSMTPD_PASSWORD" = '%s' ]
""" % GOOD


@pytest.fixture
def auth_program(tmp_path):
    path = tmp_path / "auth-counting"
    path.write_text(AUTH)
    path.chmod(0o755)
    return str(path)


def runs(srv):
    """(ppid, username, mechanism) of every run so far, in order."""
    try:
        with open(os.path.join(srv.record_dir, "auth-runs")) as f:
            return [tuple(line.split()) for line in f]
    except FileNotFoundError:
        return []


def auth(srv, password, user="alice", mechanism="PLAIN"):
    """(code, seconds) of one AUTH on a fresh TLS connection."""
    raw = srv.raw(timeout=30)
    try:
        raw.hello(srv.tls_context())
        started = time.monotonic()
        if mechanism == "PLAIN":
            code, lines = raw.cmd(f"AUTH PLAIN {plain_token(user, password)}")
        else:
            assert raw.cmd(f"AUTH LOGIN {base64.b64encode(user.encode()).decode()}")[0] == 334
            code, lines = raw.cmd(base64.b64encode(password.encode()).decode())
        seconds = time.monotonic() - started
        if code != 421:  # which closed the connection
            raw.cmd("QUIT")
        return code, seconds
    finally:
        raw.close()


def auth_lines(srv):
    return [line for line in srv.log().splitlines() if ": AUTH " in line]


def assert_no_secret(log):
    for password in (GOOD, WRONG, OTHER_WRONG):
        assert password not in log
        for token in (plain_token("alice", password), base64.b64encode(password.encode()).decode()):
            assert token not in log


def test_a_good_password_is_answered_from_the_cache_until_it_differs(make_server, auth_program):
    """docs/auth-program.md "The auth cache": with --auth-cache-ttl the second login with the same
    password runs no program; a different password (or mechanism) does; the cached
    answer is logged as cached and counted with cached="yes"; no line holds a secret."""
    metrics_port = free_port()
    srv = make_server("--auth", auth_program, "--auth-cache-ttl", "60",
                      "--metrics-bind", f"127.0.0.1:{metrics_port}")
    assert auth(srv, GOOD)[0] == 235
    assert auth(srv, GOOD)[0] == 235
    assert len(runs(srv)) == 1
    assert auth(srv, WRONG)[0] == 535  # another password: asked, and (ttl only) not kept
    assert auth(srv, WRONG)[0] == 535
    assert len(runs(srv)) == 3
    assert auth(srv, GOOD, mechanism="LOGIN")[0] == 235  # the mechanism is part of the key
    assert auth(srv, GOOD, mechanism="LOGIN")[0] == 235
    assert [r[2] for r in runs(srv)] == ["PLAIN", "PLAIN", "PLAIN", "LOGIN"]

    lines = auth_lines(srv)
    assert len(lines) == 6
    cached = [line for line in lines if "(cached)" in line]
    assert len(cached) == 2 and all(': 235, exit 0 (cached) in ' in line for line in cached)
    assert "(cached)" not in lines[0] and "(cached)" in lines[1]
    assert_no_secret(srv.log())

    m = scrape(metrics_port)
    assert value(m, "ssmtpd_auth_total", result="ok", cached="yes") == 2
    assert value(m, "ssmtpd_auth_total", result="ok", cached="no") == 2
    assert value(m, "ssmtpd_auth_total", result="invalid", cached="no") == 2
    assert value(m, "ssmtpd_auth_total", result="invalid", cached="yes") == 0
    # No program ran for a cached answer: only the four runs are timed.
    assert value(m, "ssmtpd_auth_program_seconds_count") == 4


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_cached_wrong_password_is_still_a_failed_login(make_server, auth_program, tmp_path,
                                                          log_format):
    """docs/auth-program.md "The auth cache": with --auth-cache-negative-ttl a repeated wrong password
    runs the program once, and each time still gets 535 after --auth-failure-delay,
    counts toward --max-auth-failures-per-ip, and is the fail2ban line."""
    srv = make_server("--auth", auth_program, "--auth-cache-negative-ttl", "60",
                      "--auth-failure-delay", "0.5", "--max-auth-failures-per-ip", "3",
                      "--log-format", log_format)
    assert auth(srv, GOOD)[0] == 235
    assert auth(srv, GOOD)[0] == 235  # a 235 is not kept: no --auth-cache-ttl
    assert len(runs(srv)) == 2
    for _ in range(3):
        code, seconds = auth(srv, WRONG)
        assert code == 535
        assert seconds >= 0.45  # the pause (a lower bound only: sleeps never end early)
    assert len(runs(srv)) == 3
    # Three failures, two of them cached, fill the address's allowance.
    assert auth(srv, GOOD)[0] == 421
    assert len(runs(srv)) == 3

    log = srv.log()
    assert_no_secret(log)
    if log_format == "json":
        objects = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        failed = [o for o in objects if o["event"] == "auth_failed"]
        assert [o["cached"] for o in failed] == [False, True, True]
        assert all(o["code"] == 535 and o["level"] == "warning" for o in failed)
        ok = [o for o in objects if o["event"] == "auth"]
        assert [o["cached"] for o in ok] == [False, False]
        lines, filter_path = [line for line in log.splitlines() if line.startswith("{")], \
            JSON_FILTER
    else:
        failed = [line for line in auth_lines(srv) if ": 535, " in line]
        assert len(failed) == 3
        assert [("(cached)" in line) for line in failed] == [False, True, True]
        assert all(" WARNING " in line for line in failed)
        lines, filter_path = log.splitlines(), FILTER
    assert fail2ban_ips(tmp_path, "cached", lines, filter_path) == ["127.0.0.1"] * 3


def test_a_temporary_failure_is_never_cached(make_server, auth_program):
    """docs/auth-program.md "The auth cache": a 454 is asked of the program every time."""
    srv = make_server("--auth", auth_program, "--auth-cache-ttl", "60",
                      "--auth-cache-negative-ttl", "60")
    for _ in range(3):
        assert auth(srv, GOOD, user="tempfail")[0] == 454
    assert len(runs(srv)) == 3


def test_sighup_empties_the_cache(make_server, auth_program):
    """docs/auth-program.md "The auth cache", docs/operations.md "Signals": after SIGHUP the program runs again."""
    srv = make_server("--auth", auth_program, "--auth-cache-ttl", "3600")
    assert auth(srv, GOOD)[0] == 235
    assert auth(srv, GOOD)[0] == 235
    assert len(runs(srv)) == 1
    srv.signal(signal.SIGHUP)
    srv.wait_log("SIGHUP: auth cache emptied (it held 1 answers)")
    assert auth(srv, GOOD)[0] == 235
    assert auth(srv, GOOD)[0] == 235
    assert len(runs(srv)) == 2


def test_the_cache_is_per_worker_and_sighup_empties_each(make_server, auth_program):
    """docs/auth-program.md "The auth cache": with --workers each worker holds its own cache: the
    same password runs the program once in each worker that sees it, then never
    again there; SIGHUP to the master empties every worker's."""
    # A TTL no wait of this test comes near: only SIGHUP may empty the caches.
    srv = make_server("--auth", auth_program, "--auth-cache-ttl", "3600", "--workers", "2",
                      "--max-connection-rate-per-ip", "0")
    assert wait_until(lambda: srv.log().count("accepting on") == 2), srv.log()
    workers = set(int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) started", srv.log()))

    def both_workers_ran():
        deadline = time.monotonic() + 90
        logins = 0
        while time.monotonic() < deadline and logins < 300:
            assert auth(srv, GOOD)[0] == 235
            logins += 1
            if len({r[0] for r in runs(srv)}) == 2:
                return logins
        pytest.fail(f"one worker took all {logins} connections:\n{srv.log()}")

    logins = both_workers_ran()
    ran = [int(r[0]) for r in runs(srv)]
    assert set(ran) == workers
    assert len(ran) == 2, f"{len(ran)} runs for {logins} logins"
    for _ in range(10):
        assert auth(srv, GOOD)[0] == 235
    assert len(runs(srv)) == 2

    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: srv.log().count("SIGHUP: auth cache emptied") == 2), srv.log()
    before = len(runs(srv))

    def both_workers_ran_again():
        return {r[0] for r in runs(srv)[before:]} == {str(pid) for pid in workers}

    deadline = time.monotonic() + 90
    while not both_workers_ran_again() and time.monotonic() < deadline:
        assert auth(srv, GOOD)[0] == 235
    assert both_workers_ran_again(), srv.log()
    assert len(runs(srv)) == 4


# --- the two options, from each place ---------------------------------------------------

@pytest.mark.parametrize("args, env, ini, option", [
    (["--auth-cache-ttl", "-1"], {}, "", "--auth-cache-ttl"),
    (["--auth-cache-negative-ttl", "nan"], {}, "", "--auth-cache-negative-ttl"),
    ([], {"SSMTPD_AUTH_CACHE_TTL": "a minute"}, "", "--auth-cache-ttl"),
    ([], {}, "auth-cache-negative-ttl = soon\n", "--auth-cache-negative-ttl"),
])
def test_a_bad_ttl_stops_the_start_naming_the_option(tmp_path, certs, args, env, ini, option):
    """docs/configuration.md "Configuration": one line naming the option, exit status 2."""
    from test_config import assert_refused, run_ssmtpd, valid_args, write_ini
    if ini:
        args = args + ["-c", write_ini(tmp_path, ini)]
    result = run_ssmtpd(valid_args(certs) + args + ["--check-config"], tmp_path, env)
    assert_refused(result, option)


def test_the_ttls_come_from_the_environment_and_the_ini_file(make_server, auth_program,
                                                              tmp_path):
    """docs/configuration.md "Configuration": SSMTPD_AUTH_CACHE_TTL and the ini key work like the flag."""
    ini = tmp_path / "cache.ini"
    ini.write_text("[ssmtpd]\nauth_cache_negative_ttl = 60\n")
    srv = make_server("--auth", auth_program, "-c", str(ini),
                      env={"SSMTPD_AUTH_CACHE_TTL": "60"})
    for password in (GOOD, GOOD, WRONG, WRONG):
        auth(srv, password)
    assert len(runs(srv)) == 2
