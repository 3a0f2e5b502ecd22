"""Abuse across connections (docs/limits.md "Limits and abuse"; docs/limits.md "Limits and abuse").

Junk commands, failed logins counted per address, the bound on concurrent auth
programs, the busy timeout under pressure, envelope values that would harm a
program, spool space, logs that cannot be forged (checked with the real
fail2ban-regex against the shipped filter).  Each test plays the attacker
against a real server.
"""

import base64
import datetime
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (PASSWORD, PROGRAMS, ROOT, USER, Raw, ServerProcess, plain_token,
                      wait_until)

AUTH_SLOW = os.path.join(PROGRAMS, "auth-slow")
FILTER = os.path.join(ROOT, "conf", "fail2ban", "filter.d", "ssmtpd.conf")
JSON_FILTER = os.path.join(ROOT, "conf", "fail2ban", "filter.d", "ssmtpd-json.conf")
JAIL = os.path.join(ROOT, "conf", "fail2ban", "jail.d", "ssmtpd.local")
TOO_MANY_FAILED_LOGINS = "421 4.7.0 Too many failed logins from your address, try again later"


def connect_from(srv, source="127.0.0.1", timeout=10) -> Raw:
    return Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=timeout,
                                        source_address=(source, 0)))


def tls_session(srv, source="127.0.0.1") -> Raw:
    """Greeting, EHLO, STARTTLS, EHLO: ready for AUTH."""
    raw = connect_from(srv, source)
    raw.hello(srv.tls_context())
    return raw


def auth(raw, user=USER, password=PASSWORD):
    return raw.cmd(f"AUTH PLAIN {plain_token(user, password)}")


def pipelined(raw, lines):
    """Send every line at once, then read one reply per line."""
    raw.send("".join(line + "\r\n" for line in lines))
    return [raw.reply() for _ in lines]


# --- junk commands ----------------------------------------------------------------

JUNK = ["NOOP", "RSET", "VRFY alice", "HELP"]


def test_junk_commands_count_as_errors(server):
    """docs/limits.md "Limits and abuse": past 100 NOOP/RSET/VRFY/HELP, each counts as an error; with 9 errors
    already, the 101st is answered and then 421 closes the session."""
    raw = server.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    replies = pipelined(raw, [JUNK[i % 4] for i in range(100)])
    assert [code for code, _ in replies] == [250, 250, 252, 214] * 25
    for _ in range(9):
        assert raw.cmd("BOGUS")[0] == 502
    assert raw.cmd("NOOP")[0] == 250
    code, lines = raw.reply()
    assert code == 421 and "Too many errors" in lines[-1]
    assert raw.closed()


def test_junk_alone_ends_a_session_at_110(server):
    """docs/limits.md "Limits and abuse": with no other error, junk commands 101-109 are answered and the 110th
    ends the session (Postfix's smtpd_junk_command_limit, with the error limit of 10)."""
    raw = server.raw()
    assert raw.reply()[0] == 220
    replies = pipelined(raw, ["NOOP"] * 109)
    assert {code for code, _ in replies} == {250}
    assert raw.cmd("NOOP")[0] == 250
    assert raw.reply()[0] == 421
    assert raw.closed()


def test_junk_count_restarts_after_accepted_message(server):
    """docs/limits.md "Limits and abuse": an accepted message starts the junk count again."""
    raw = server.raw()
    raw.login(server.tls_context())
    assert {code for code, _ in pipelined(raw, ["NOOP"] * 100)} == {250}
    assert raw.send_message()[0] == 250
    # Without the restart the tenth of these would be the 110th junk command.
    assert {code for code, _ in pipelined(raw, ["RSET"] * 109)} == {250}
    assert raw.cmd("QUIT")[0] == 221


# --- failed logins across connections ---------------------------------------------

def auth_runs(srv):
    return len(srv.runs("auth"))


def test_failed_logins_are_counted_per_address(make_server):
    """docs/limits.md "Limits and abuse": ten wrong passwords over four connections from one address; the
    eleventh AUTH gets 421 without running the auth program; another address is
    unaffected; once the window has passed, the first address may log in again."""
    # Ten runs of the auth program must fit in the window, however slow the
    # machine; the test then waits for the window to pass.
    window = 8.0
    srv = make_server("--max-auth-failures-per-ip", "10", "--auth-failure-window", str(window))
    first_sent = first_answered = None
    for attempts in (3, 3, 3, 1):
        raw = tls_session(srv, "127.0.0.1")
        for _ in range(attempts):
            if first_sent is None:
                first_sent = time.monotonic()
            assert auth(raw, password="wrong")[0] == 535
            if first_answered is None:
                first_answered = time.monotonic()
        raw.close()
    assert auth_runs(srv) == 10

    raw = tls_session(srv, "127.0.0.1")
    # The first failure is counted after first_sent: while less than the window
    # has passed since, all ten are in it.
    if time.monotonic() - first_sent >= window - 0.5:
        pytest.skip(f"ten logins took {time.monotonic() - first_sent:.1f} s here, "
                    f"more than the {window} s window the test can wait for")
    code, lines = auth(raw)  # even the right password
    assert (code, lines[-1]) == (421, TOO_MANY_FAILED_LOGINS)
    assert raw.closed()
    assert auth_runs(srv) == 10, "the auth program ran for a blocked address"
    assert "AUTH refused: too many failed logins from this address" in srv.log()

    other = tls_session(srv, "127.0.0.2")
    assert auth(other, password="wrong")[0] == 535
    assert auth(other)[0] == 235
    other.close()

    # The first failure was counted before its 535 came back: it has left
    # the window, and nine are not enough.
    time.sleep(max(0.0, first_answered + window + 0.5 - time.monotonic()))
    raw = tls_session(srv, "127.0.0.1")
    assert auth(raw)[0] == 235
    raw.close()


def test_tempfail_is_not_a_failed_login(make_server):
    """docs/limits.md "Limits and abuse": a 454 (the auth program's temporary failure) does not count."""
    srv = make_server("--max-auth-failures-per-ip", "2")
    for _ in range(3):
        raw = tls_session(srv)
        assert auth(raw, user="tempfail")[0] == 454
        raw.close()
    raw = tls_session(srv)
    assert auth(raw)[0] == 235
    raw.close()


def test_foreign_authzid_is_a_logged_failure(make_server):
    """docs/dialogue.md "The dialogue", docs/limits.md "Limits and abuse": a PLAIN authzid other than the user is a 535 that counts and is logged."""
    srv = make_server("--max-auth-failures-per-ip", "1")
    raw = tls_session(srv)
    code, _ = raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD, authzid='bob')}")
    assert code == 535
    assert re.search(r'WARNING \[\w+\] 127\.0\.0\.1 -: AUTH PLAIN user="alice": 535, '
                     r'authzid "bob" refused', srv.log())
    assert auth(raw)[0] == 421
    assert auth_runs(srv) == 0


# --- auth programs are bounded ------------------------------------------------------

def concurrent_logins(srv, count):
    """`count` sessions send AUTH at the same moment; [(code, seconds)] in order."""
    sessions = [tls_session(srv) for _ in range(count)]
    results = [None] * count
    barrier = threading.Barrier(count)

    def login(i):
        barrier.wait()
        started = time.monotonic()
        code, _ = auth(sessions[i])
        results[i] = (code, time.monotonic() - started)

    threads = [threading.Thread(target=login, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for raw in sessions:
        raw.close()
    return sorted(results, key=lambda r: r[1])


def most_at_once(runs):
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_third_login_waits_for_a_free_auth_program(make_server):
    """docs/limits.md "Limits and abuse": with --max-auth-programs 2 and a 1 s auth program, a third AUTH at the
    same moment waits for a slot and then succeeds; never more than two run at once."""
    srv = make_server("--max-auth-programs", "2", "--auth", AUTH_SLOW, "--auth-timeout", "10")
    results = concurrent_logins(srv, 3)
    assert [code for code, _ in results] == [235, 235, 235]
    assert results[2][1] > 1.8, results  # queued behind a whole run
    assert most_at_once(srv.runs("slow")) == 2


def test_login_that_cannot_get_a_slot_in_time_is_454(make_server):
    """docs/limits.md "Limits and abuse": waiting for a slot counts against --auth-timeout; past it, 454."""
    # The first run (a Python start-up, then 3 s) fits in 5.5 s on a slow
    # machine too; the second waits for it and cannot also run 3 s in time.
    srv = make_server("--max-auth-programs", "1", "--auth", AUTH_SLOW, "--auth-timeout", "5.5",
                      env={"TEST_AUTH_SECONDS": "3"})
    results = concurrent_logins(srv, 2)
    assert results[0][0] == 235
    assert results[1][0] == 454
    assert 5.3 < results[1][1] < 7.5, results
    assert "no free slot" in srv.log() or "timed out" in srv.log()


# --- the busy timeout ------------------------------------------------------------------

def test_strangers_are_cut_under_pressure(make_server):
    """docs/limits.md "Limits and abuse": while more than 3/4 of --max-connections are in use, silent
    unauthenticated sessions are cut after --busy-timeout, those that began waiting
    before the pressure too; a logged-in session keeps --timeout."""
    # Sessions that came just before the pressure must outlast the 0.5 s
    # sweep that ends it by a margin a busy machine cannot eat.
    busy = 2.0
    srv = make_server("--max-connections", "8", "--busy-timeout", str(busy), "--timeout", "30")
    member = srv.raw(timeout=30)
    member.login(srv.tls_context())
    early = [srv.raw() for _ in range(2)]  # 3 of 8 in use: no pressure
    for raw in early:
        assert raw.reply()[0] == 220
    time.sleep(busy + 1)  # longer than --busy-timeout, while there is no pressure
    for raw in early:
        assert not raw.closed(timeout=0.1), "cut before the server was under pressure"
        raw.sock.settimeout(10)
    started = time.monotonic()
    late = [srv.raw() for _ in range(4)]  # 7 of 8: over 6, pressure
    for raw in late:
        assert raw.reply()[0] == 220
    # The early two have waited longer than --busy-timeout already: the next
    # sweep cuts them.  The last one came in under pressure and gets
    # --busy-timeout at once.
    for raw in early + late[-1:]:
        code, lines = raw.reply()
        assert lines[-1].startswith("421 4.4.2"), lines
        assert raw.closed(timeout=5)
    assert time.monotonic() - started < busy + 2
    # 4 of 8 now: the pressure is over, and the others keep --timeout.
    assert not late[0].closed(timeout=1.5)
    assert member.cmd("NOOP")[0] == 250
    assert member.cmd("QUIT")[0] == 221


# --- envelope values that would harm a program ------------------------------------

BAD_ENVELOPE = [
    # (command, expected reply prefix)
    ("MAIL FROM:<-X/tmp/pwn@example.org>", "501 5.1.7"),
    ("MAIL FROM:<-X/tmp/pwn>", "501 5.1.7"),
    ('MAIL FROM:<"-oQ/tmp/"@example.org>', "501 5.1.7"),
    ("MAIL FROM:<a\u202eb@example.org>", "501 5.1.7"),
    ("RCPT TO:<-C/tmp/evil.cf@example.org>", "501 5.1.3"),
    ('RCPT TO:<"-C/tmp/evil.cf"@x>', "501 5.1.3"),
    ("RCPT TO:<nobody>", "501 5.1.3"),
    ("RCPT TO:<a\u2028b@example.org>", "501 5.1.3"),
    ("RCPT TO:<a\u2029b@example.org>", "501 5.1.3"),
    ("RCPT TO:<a\u200bb@example.org>", "501 5.1.3"),
    ("RCPT TO:<bob@exa\u2066mple.org>", "501 5.1.3"),
    ("EHLO client\u202e.test", "501 5.5.4"),
    ("HELO \u2029client.test", "501 5.5.4"),
]


@pytest.mark.parametrize("command,expected", BAD_ENVELOPE)
def test_harmful_envelope_value_is_refused(server, command, expected):
    """docs/limits.md "Limits and abuse": option-like local parts, RCPT without a domain, separators and format
    characters: 501, the session goes on, and the program never sees the value."""
    raw = server.raw()
    raw.login(server.tls_context())
    in_mail = command.startswith("RCPT")
    if in_mail:
        assert raw.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, lines = raw.cmd(command)
    assert lines[-1].startswith(expected), lines
    if not in_mail:
        assert raw.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<Postmaster>")[0] == 250  # the one address without a domain
    assert raw.cmd("DATA")[0] == 354
    raw.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    assert raw.reply()[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    (run,) = server.runs()
    env = run["env"]
    assert env["SSMTPD_MAIL_FROM"] == "alice@example.org"
    assert env["SSMTPD_RCPT_TO"] == "bob@example.org\nPostmaster"
    assert env["SSMTPD_HELO"] == "client.test"


@pytest.mark.parametrize("name", ["a\u202eb", "\u2028alice", "alice\u200d", "al\u2029ice"])
def test_harmful_username_is_refused(server, name):
    """docs/limits.md "Limits and abuse": a username with a separator or format character is 501; the auth program
    never sees it."""
    raw = tls_session(server)
    code, lines = raw.cmd("AUTH PLAIN " + base64.b64encode(
        b"\0" + name.encode() + b"\0" + PASSWORD.encode()).decode())
    assert lines[-1].startswith("501 5.5.2"), lines
    assert auth(raw)[0] == 235
    assert raw.cmd("QUIT")[0] == 221
    names = [run["env"]["SSMTPD_USERNAME"] for run in server.runs("auth")]
    assert names == [USER]


# --- spool space ----------------------------------------------------------------------

def mount_tmpfs(path, options):
    """A tmpfs of our own, or a skip where this machine may not mount one."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    return str(path)


@pytest.fixture
def small_fs(tmp_path):
    mount = mount_tmpfs(tmp_path / "spool", "size=4m,mode=0777")
    yield mount
    subprocess.run(["umount", "-l", mount], check=False)


def test_spool_without_room_is_452_at_mail(make_server, small_fs):
    """docs/limits.md "Limits and abuse": with less than twice --max-message-size free in --spool-dir, MAIL gets
    452 4.3.1; with room again, large messages are spooled there and delivered."""
    srv = make_server("--spool-dir", small_fs, "--max-message-size", str(1024 * 1024))
    raw = srv.raw()
    raw.login(srv.tls_context())
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 900  # over the memory spool
    assert raw.send_message(big)[0] == 250
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * (3 * 1024 * 1024))
    code, lines = raw.cmd("MAIL FROM:<alice@example.org>")
    assert lines[-1] == "452 4.3.1 Insufficient system storage"
    assert "MAIL refused: 452 4.3.1 spool directory nearly full" in srv.log()
    os.unlink(filler)
    assert raw.send_message(big)[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    assert [len(run["stdin"]) > 900_000 for run in srv.runs()] == [True, True]


def test_spool_check_uses_the_real_free_space(make_server, tmp_path):
    """docs/limits.md "Limits and abuse" without mounting anything: a --max-message-size of more than half the
    free space of --spool-dir makes every MAIL a 452 4.3.1."""
    st = os.statvfs(str(tmp_path))
    free = st.f_bavail * st.f_frsize
    srv = make_server("--spool-dir", str(tmp_path), "--max-message-size", str(free // 2 + 2**30))
    raw = srv.raw()
    raw.login(srv.tls_context())
    assert raw.cmd("MAIL FROM:<alice@example.org>")[1][-1].startswith("452 4.3.1")
    assert raw.cmd("QUIT")[0] == 221


@pytest.mark.parametrize("value,why", [("/nonexistent/spool", "is not a directory")])
def test_bad_spool_dir_is_a_start_up_error(tmp_path, certs, value, why):
    """docs/limits.md "Limits and abuse", docs/configuration.md "Configuration": a missing --spool-dir stops start-up: one line naming it, exit 2."""
    srv = ServerProcess(str(tmp_path), certs, ["--spool-dir", value])
    result = subprocess.run(srv.argv, env=srv.env, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [f"ssmtpd: --spool-dir: {value} {why}"]


def test_unwritable_spool_dir_is_a_start_up_error(tmp_path, certs):
    """docs/limits.md "Limits and abuse", docs/configuration.md "Configuration": a --spool-dir we cannot create files in (here a read-only
    filesystem, which stops root too) stops start-up with one line, exit 2."""
    spool = mount_tmpfs(tmp_path / "ro", "size=1m,ro")
    try:
        srv = ServerProcess(str(tmp_path), certs, ["--spool-dir", spool])
        result = subprocess.run(srv.argv, env=srv.env, capture_output=True, timeout=30)
    finally:
        subprocess.run(["umount", "-l", spool], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().splitlines() == [
        f"ssmtpd: --spool-dir: cannot create files in {spool}: Read-only file system"]


# --- logs that cannot be forged ---------------------------------------------------

FORGED = "] 198.51.100.23 -: AUTH PLAIN user=admin"
# The same trick against the JSON line: a name that would end the string and
# write a client_ip of its own, were it not escaped.
FORGED_JSON = '","client_ip":"198.51.100.24","x":"'
FORGED_OBJECT = ('{"ts":"2026-12-01T04:07:20.123Z","level":"warning","event":"auth_failed",'
                 '"session":"0123456789ab","client_ip":"198.51.100.25"}')
# Where fail2ban finds the failed-login line, made from the real lines (docs/logging.md
# "fail2ban"): `stamp` is the line's own time (UTC) and `line` the line as
# written to stderr.
FORMS = {
    "stderr": lambda stamp, line: line,
    # rsyslog's file, with ssmtpd's own time kept in the message.
    "syslog": lambda stamp, line: f"{stamp:%b %d %H:%M:%S} mx ssmtpd[812]: {line}",
    # The same without ssmtpd's own time (a syslog template that drops it).
    "syslog-no-own-time": lambda stamp, line: f"{stamp:%b %e %H:%M:%S} mx ssmtpd[812]: "
                                              f"{line.split(' ', 1)[1]}",
    # `journalctl -u ssmtpd -o short-iso`, as older and newer systemd write the zone.
    "journal-short-iso": lambda stamp, line: f"{stamp:%Y-%m-%dT%H:%M:%S+0000} mx "
                                             f"ssmtpd[812]: {line}",
    "journal-short-iso-colon": lambda stamp, line: f"{stamp:%Y-%m-%dT%H:%M:%S+00:00} mx "
                                                   f"ssmtpd[812]: {line}",
    # What fail2ban's systemd backend (the jail's) matches: host and identifier in
    # front of the journal's MESSAGE, the time taken from the entry itself.
    "journal-backend": lambda stamp, line: f"mx ssmtpd[812]: {line}",
}


def line_time(line: str, log_format: str) -> datetime.datetime:
    text = json.loads(line)["ts"] if log_format == "json" else line.split(" ", 1)[0]
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")


def fail2ban_ips(tmp_path, name: str, lines, filter_path: str):
    """The addresses the real fail2ban-regex finds in `lines` with `filter_path`."""
    path = tmp_path / f"{name}.log"
    path.write_text("".join(line + "\n" for line in lines))
    result = subprocess.run(["fail2ban-regex", "-o", "ip", str(path), filter_path],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted(result.stdout.decode().split())


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_fail2ban_finds_every_real_failure_and_no_forged_address(make_server, tmp_path,
                                                                   log_format):
    """docs/logging.md "Logging": the shipped filter for each --log-format, run by the real
    fail2ban-regex over the server's own lines as stderr, a syslog file, journalctl's
    output and the journal backend have them, finds the address of every failed login
    of every mechanism, and never an address forged inside a username, nor a success
    or a temporary failure."""
    if not shutil.which("fail2ban-regex"):
        pytest.fail("fail2ban-regex is not installed (.ci/run installs Debian's fail2ban)")
    srv = make_server("--log-format", log_format,
                      "--auth-mechanisms", "PLAIN,LOGIN,OAUTHBEARER,XOAUTH2")
    failures = {}  # address -> how it failed
    logins = {"127.0.0.2": "bob", "127.0.0.3": FORGED, "127.0.0.4": "john smith",
              "127.0.0.5": 'quo"te\\back', "127.0.0.6": "x" * 300,
              "127.0.0.9": FORGED_JSON, "127.0.0.10": FORGED_OBJECT}
    for source, name in logins.items():  # LOGIN
        raw = tls_session(srv, source)
        code, _ = raw.cmd("AUTH LOGIN " + base64.b64encode(name.encode()).decode())
        assert code == 334
        assert raw.cmd(base64.b64encode(b"wrong").decode())[0] == 535
        raw.close()
        failures[source] = name
    for source, name in {"127.0.0.11": "carol", "127.0.0.12": FORGED_JSON}.items():  # PLAIN
        raw = tls_session(srv, source)
        assert auth(raw, user=name, password="wrong")[0] == 535
        raw.close()
        failures[source] = name
    raw = tls_session(srv, "127.0.0.13")  # PLAIN, an authzid of someone else's
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD, authzid='root')}")[0] == 535
    raw.close()
    failures["127.0.0.13"] = "authzid"
    # Rejected tokens (docs/auth-program.md "OAuth 2 tokens"): one client answers the error
    # challenge, the other hangs up at it, as curl does for XOAUTH2.
    raw = tls_session(srv, "127.0.0.14")
    bearer = b"n,a=dave,\x01auth=Bearer expired\x01\x01"
    assert raw.cmd("AUTH OAUTHBEARER " + base64.b64encode(bearer).decode())[0] == 334
    assert raw.cmd("AQ==")[0] == 535
    raw.close()
    failures["127.0.0.14"] = "dave"
    raw = tls_session(srv, "127.0.0.15")
    xoauth2 = f"user={FORGED}\x01auth=Bearer expired\x01\x01".encode()
    assert raw.cmd("AUTH XOAUTH2 " + base64.b64encode(xoauth2).decode())[0] == 334
    raw.close()
    failures["127.0.0.15"] = FORGED
    raw = tls_session(srv, "127.0.0.7")
    assert auth(raw)[0] == 235  # a success is not a failure
    raw.close()
    raw = tls_session(srv, "127.0.0.8")
    assert auth(raw, user="tempfail")[0] == 454  # nor a temporary one
    raw.close()
    failed = '"event":"auth_failed"' if log_format == "json" else ": 535, "
    assert wait_until(lambda: srv.log().count(failed) == len(failures)), srv.log()
    lines = [line for line in srv.log().splitlines() if line]
    assert not any("198.51.100." in line for line in lines if "127.0.0." not in line)
    filter_path = JSON_FILTER if log_format == "json" else FILTER
    for form, make in FORMS.items():
        if form == "syslog-no-own-time" and log_format == "json":
            continue  # the JSON object carries its time inside
        found = fail2ban_ips(tmp_path, form, [make(line_time(line, log_format), line)
                                              for line in lines], filter_path)
        assert found == sorted(failures), (form, found)
    if log_format == "text":
        forged_line = next(line for line in lines if "198.51.100.23" in line)
        assert ' 127.0.0.3 -: AUTH LOGIN user="] 198.51.100.23 -: AUTH PLAIN user=admin": 535' \
            in forged_line


def test_fail2ban_jail_reads_the_units_journal(tmp_path):
    """docs/logging.md "Logging": the example jail reads the shipped unit's journal (backend
    systemd, journalmatch on conf/ssmtpd.service) with the shipped filter, as
    fail2ban itself reads the configuration."""
    if not shutil.which("fail2ban-client"):
        pytest.fail("fail2ban-client is not installed (.ci/run installs Debian's fail2ban)")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, symlinks=True,
                    ignore=shutil.ignore_patterns("jail.d", "jail.local"))
    (conf / "jail.d").mkdir()
    shutil.copyfile(JAIL, conf / "jail.d" / "ssmtpd.local")
    shutil.copyfile(FILTER, conf / "filter.d" / "ssmtpd.conf")
    result = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True,
                            timeout=60, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dump = result.stdout
    assert "['add', 'ssmtpd', 'systemd']" in dump, dump
    assert "['set', 'ssmtpd', 'addjournalmatch', '_SYSTEMD_UNIT=ssmtpd.service']" in dump, dump
    assert "['set', 'ssmtpd', 'addfailregex', " in dump, dump
    # The unit the journalmatch names is the one conf/ ships.
    assert os.path.exists(os.path.join(ROOT, "conf", "ssmtpd.service"))


def test_log_lines_stay_short_and_escaped(server):
    """docs/limits.md "Limits and abuse": a MAIL FROM of characters that must be escaped stays one quoted field
    and the line stays under about 1 KiB."""
    raw = server.raw()
    raw.login(server.tls_context())
    sender = "\U000f0000" * 60 + "@example.org"  # private use: not printable, allowed
    assert raw.cmd(f"MAIL FROM:<{sender}> SMTPUTF8")[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    line = [line for line in server.log().splitlines() if "MAIL FROM:" in line][-1]
    assert '\\U000f0000' in line
    assert re.search(r'MAIL FROM:"(\\U000f0000)+\.\.\."$', line), line
    assert len(line) < 1100


def test_no_log_line_exceeds_one_kib():
    """docs/limits.md "Limits and abuse": whatever an event carries (a program's 1000-character stderr line
    behind a long prefix, say), the line is cut at 1 KiB, marked, and stays one line."""
    from ssmtpd import events, log

    stream = io.StringIO()
    logger = log.setup("info", stream)
    session = log.SessionLog(logger, "0123456789ab", "2001:db8::1")
    session.set_user("u" * 500)
    session.say(events.WARNING, events.PROGRAM_OUTPUT, program="process", stderr="e" * 5000)
    session.say(events.INFO, events.MAIL, mail_from='"\\\n' * 1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        message = line.split(" ", 2)[2]  # after the time and the level
        assert len(message) <= log.MAX_LINE
    assert lines[0].endswith(" [truncated]")
    assert '"uuuu' in lines[0]
    # 25 escaped triples of 8 characters fill the 200 a value may have.
    assert lines[1].endswith('MAIL FROM:"' + r'\"\\\x0a' * 25 + '..."')


# --- IPv6 prefixes, end to end in a network namespace of our own --------------------

NS_CLIENT = r"""
import base64, json, smtplib, ssl, sys
port, attempts = int(sys.argv[1]), json.loads(sys.argv[2])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
codes = []
for source, password in attempts:
    s = smtplib.SMTP("2001:db8:1:2::1", port, source_address=(source, 0), timeout=20)
    s.ehlo("client.test")
    s.starttls(context=ctx)
    s.ehlo("client.test")
    token = base64.b64encode(b"\0alice\0" + password.encode()).decode()
    codes.append(s.docmd("AUTH", "PLAIN " + token)[0])
    s.close()
print(json.dumps(codes))
"""


@pytest.fixture
def netns():
    """A network namespace with IPv6 addresses in two /64s on its loopback."""
    name = f"ssmtpd-test-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        for address in ("2001:db8:1:2::1", "2001:db8:1:2::a", "2001:db8:1:2::b",
                        "2001:db8:1:3::a"):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/128", "dev", "lo"],
                           check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_ipv6_addresses_in_one_prefix_share_the_failed_login_count(make_server, netns):
    """docs/limits.md "Limits and abuse": two IPv6 addresses in one /64 share the failed-login count; an address
    in another /64 does not."""
    srv = make_server("--bind", "2001:db8:1:2::1", "--max-auth-failures-per-ip", "2",
                      start=False)
    srv.argv = ["ip", "netns", "exec", netns] + srv.argv  # execs: the pid stays the server's
    srv._log = open(srv.log_path, "ab")
    srv.proc = subprocess.Popen(srv.argv, env=srv.env, cwd=srv.workdir, stdin=subprocess.DEVNULL,
                                stdout=srv._log, stderr=subprocess.STDOUT)
    srv.wait_log("listening on 2001:db8:1:2::1")
    attempts = [("2001:db8:1:2::a", "wrong"), ("2001:db8:1:2::b", "wrong"),
                ("2001:db8:1:2::b", PASSWORD), ("2001:db8:1:3::a", PASSWORD)]
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", NS_CLIENT,
                             str(srv.port), json.dumps(attempts)],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == [535, 535, 421, 235]
    assert "2001:db8:1:2::b -: AUTH refused: too many failed logins" in srv.log()
