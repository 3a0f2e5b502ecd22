"""Logs for machines and for people (docs/logging.md "Logging").

--log-format json: every line one JSON object with the fields and the event
vocabulary docs/logging.md lists, bounded, never a secret; every refused command
exactly one line, in both formats; a load balancer's health checks at DEBUG
only.  Each test drives a real server over real sockets and reads what it
wrote to stderr.
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import (PASSWORD, ROOT, USER, Raw, free_port, plain_token, stop_process,
                      wait_for_port, wait_until)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = ("debug", "info", "warning", "error")
HEAD = ["ts", "level", "event", "session", "client_ip"]
# SPEC's minimum vocabulary; docs/logging.md "Logging" lists the whole one.
REQUIRED_EVENTS = {"connected", "tls", "auth", "auth_failed", "auth_throttled", "mail", "rcpt",
                   "refused", "message", "rate_limited", "disconnected", "reload", "worker"}
# A text line: time, level, [session] address user: what happened.
TEXT_LINE = re.compile(r"^(\S+) (DEBUG|INFO|WARNING|ERROR) (?:\[([0-9a-f]{12})\] (\S+) "
                       r"(-|\"(?:[^\"\\]|\\.)*\"): )?(.*)$")
MAX_LINE = 1024


def readme_events():
    """The event names of the table of events of docs/logging.md "Events"."""
    with open(os.path.join(ROOT, "docs", "logging.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("\n## Events\n"):]
    table = table[:table.index("\n## ", 1)]
    return set(re.findall(r"(?m)^\| `([a-z_]+)` \|", table))


def json_lines(srv):
    """Every line of the server's stderr, each parsed: a line that is not one
    JSON object fails the test, naming it."""
    parsed = []
    for line in srv.log().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(obj, dict), line
        parsed.append(obj)
    return parsed


def text_lines(srv):
    """(level, session or None, what) of every text line."""
    out = []
    for line in srv.log().splitlines():
        m = TEXT_LINE.match(line)
        assert m, line
        out.append((m.group(2).lower(), m.group(3), m.group(6)))
    return out


def check_json_line(obj, vocabulary):
    """The fields every line has, in their place (docs/logging.md "Logging")."""
    keys = list(obj)
    assert keys[:3] == HEAD[:3], obj
    assert TS.match(obj["ts"]), obj
    assert obj["level"] in LEVELS, obj
    assert obj["event"] in vocabulary, obj
    if "session" in obj:
        assert keys[:5] == HEAD, obj
        assert re.fullmatch(r"[0-9a-f]{12}", obj["session"]), obj
    else:
        assert isinstance(obj.get("message"), str), obj


def tls_client(srv, source="127.0.0.1") -> Raw:
    raw = Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=10,
                                       source_address=(source, 0)))
    raw.hello(srv.tls_context())
    return raw


# --- every line, every event, no secret -------------------------------------------------------

WRONG = "Wr0ng-Pa55-9d1c"
BODY_LINE = "the-body-line-4be1 stays out of every log"


def secrets():
    """The credentials and message data of full_dialogue(), in every form a log
    could hold them."""
    out = {PASSWORD, WRONG, BODY_LINE, "Subject: kept out 77e2"}
    for user, password in (("noisy", PASSWORD), ("noisy", WRONG), (USER, WRONG)):
        out.add(plain_token(user, password))
    for text in (PASSWORD, WRONG, BODY_LINE):
        out.add(base64.b64encode(text.encode()).decode())
        out.add(json.dumps(text)[1:-1])
    return out


def full_dialogue(srv, source):
    """One session through the events of the vocabulary a session can have, then
    a second from the same address whose AUTH is throttled (docs/logging.md "Logging")."""
    raw = Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=10,
                                       source_address=(source, 0)))
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    assert raw.cmd("MAIL FROM:<alice@example.org>")[0] == 530  # before TLS
    raw.starttls(srv.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    # LOGIN, the password in its own line: a failure, then PLAIN, a success.
    assert raw.cmd("AUTH LOGIN " + base64.b64encode(b"noisy").decode())[0] == 334
    assert raw.cmd(base64.b64encode(WRONG.encode()).decode())[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token('noisy', PASSWORD)}")[0] == 235
    assert raw.cmd("RCPT TO:<bob@example.org>")[0] == 503
    assert raw.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<bob>")[0] == 501
    assert raw.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send(f"Subject: kept out 77e2\r\n\r\n{BODY_LINE}\r\n.\r\n")
    assert raw.reply()[0] == 250
    assert raw.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send(f"Subject: kept out 77e2\r\n\r\n{BODY_LINE}\nbare\r\n.\r\n")
    assert raw.reply()[0] == 554
    assert raw.cmd("QUIT")[0] == 221
    raw.close()
    # --max-auth-failures-per-ip 2: this address's second failure blocks its AUTHs.
    raw = tls_client(srv, source)
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, WRONG)}")[0] == 535
    code, lines = raw.cmd(f"AUTH PLAIN {plain_token(USER, WRONG)}")
    assert code == 421, lines
    assert raw.closed()
    raw.close()


SESSION_EVENTS = [  # full_dialogue()'s first session, DEBUG's command lines aside
    ("connected", "info"), ("refused", "info"), ("tls", "info"),
    ("program_output", "info"), ("auth_failed", "warning"),
    ("program_output", "info"), ("auth", "info"),
    ("refused", "info"), ("mail", "info"), ("refused", "info"), ("rcpt", "info"),
    ("message", "info"), ("mail", "info"), ("rcpt", "info"), ("message", "warning"),
    ("disconnected", "info")]
THROTTLED_EVENTS = [("connected", "info"), ("tls", "info"), ("auth_failed", "warning"),
                    ("auth_throttled", "warning"), ("disconnected", "info")]


def test_json_lines_carry_their_fields_and_every_event_in_order(make_server):
    """docs/logging.md "Logging": at --log-level debug --log-format json every line is one JSON
    object with ts, level and event first, a session's with session and client_ip, and
    user from the login on; the events of a session come in the order they happened,
    each with its own fields, and every event is one of docs/logging.md's vocabulary."""
    srv = make_server("--log-level", "debug", "--log-format", "json",
                      "--max-auth-failures-per-ip", "2")
    full_dialogue(srv, "127.0.0.31")
    assert wait_until(lambda: sum(obj["event"] == "disconnected" and obj["client_ip"] ==
                                  "127.0.0.31" for obj in json_lines(srv)) == 2)
    vocabulary = readme_events()
    lines = json_lines(srv)
    for obj in lines:
        check_json_line(obj, vocabulary)
    sessions = []
    for obj in lines:
        if obj.get("client_ip") == "127.0.0.31" and obj["session"] not in sessions:
            sessions.append(obj["session"])
    assert len(sessions) == 2, sessions
    first, second = ([obj for obj in lines if obj.get("session") == s] for s in sessions)
    assert [(o["event"], o["level"]) for o in first if o["event"] != "command"] \
        == SESSION_EVENTS
    assert [(o["event"], o["level"]) for o in second if o["event"] != "command"] \
        == THROTTLED_EVENTS
    # The user from the login's own line on; before it, only the name tried.
    logged_in = [o["event"] for o in first].index("auth")
    assert all("user" not in o for o in first[:logged_in])
    assert all(o["user"] == "noisy" for o in first[logged_in:])
    by_event = {}
    for obj in first + second:
        by_event.setdefault(obj["event"], []).append(obj)
    failed = by_event["auth_failed"][0]
    assert (failed["mechanism"], failed["username"], failed["code"], failed["enhanced"]) == \
        ("LOGIN", "noisy", 535, "5.7.8")
    assert failed["program_exit"] == 1 and isinstance(failed["duration_ms"], int)
    assert by_event["auth"][0]["username"] == "noisy" and by_event["auth"][0]["code"] == 235
    assert [(o["command"], o["code"]) for o in by_event["refused"]] == \
        [("MAIL", 530), ("RCPT", 503), ("RCPT", 501)]
    assert by_event["refused"][2]["argument"] == "TO:<bob>"
    assert by_event["mail"][0]["mail_from"] == "alice@example.org"
    assert by_event["rcpt"][0]["rcpt_to"] == "bob@example.org"
    accepted, refused = by_event["message"]
    assert (accepted["code"], accepted["enhanced"], accepted["rcpts"], accepted["program_exit"]) \
        == (250, "2.0.0", 1, 0)
    assert accepted["size"] > len(BODY_LINE) and accepted["duration_ms"] >= 0
    assert (refused["code"], refused["reason"]) == (554, "bare CR or LF")
    assert by_event["auth_throttled"][0]["code"] == 421
    assert by_event["tls"][0]["tls_version"].startswith("TLSv1.")
    assert by_event["program_output"][0]["program"] == "auth"
    assert by_event["disconnected"][0]["reason"] == "closed after 221"
    assert "health_check" not in by_event["disconnected"][0]
    # The server's own lines name their events too.
    events = {obj["event"] for obj in lines if "session" not in obj}
    assert "listening" in events, events


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_password_token_or_message_data_in_any_line(make_server, log_format):
    """docs/logging.md "Logging": never a password, a token or a line of a message, in any form
    (plain, base64, JSON-escaped), at DEBUG, in either format."""
    srv = make_server("--log-level", "debug", "--log-format", log_format,
                      "--max-auth-failures-per-ip", "2")
    full_dialogue(srv, "127.0.0.32")
    assert wait_until(lambda: "closed after 421" in srv.log()), srv.log()
    log = srv.log()
    assert "AUTH" in log and "message" in log  # the dialogue really was logged
    for secret in secrets():
        assert secret not in log, secret


def test_readme_lists_every_event_and_the_required_ones():
    """docs/logging.md "Logging": the table of events holds SPEC's vocabulary and every event the
    server can write, and nothing else."""
    from ssmtpd import events
    listed = readme_events()
    assert REQUIRED_EVENTS <= listed, REQUIRED_EVENTS - listed
    assert listed == set(events.VOCABULARY), listed ^ set(events.VOCABULARY)


# --- every refused command: one line ---------------------------------------------------------

REFUSALS = [("AUTH", 530), ("MAIL", 530), ("MAIL", 530), ("AUTH", 454), ("AUTH", 504),
            ("AUTH", 501), ("RCPT", 503), ("DATA", 503), ("MAIL", 552), ("MAIL", 501),
            ("DATA", 503), ("RCPT", 501), ("RCPT", 452), ("MAIL", 503), ("DATA", 501)]


def refusing_dialogue(srv):
    """A dialogue of REFUSALS, in order, then a message and QUIT."""
    raw = srv.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 530  # before TLS
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 530
    raw.starttls(srv.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 530  # before AUTH
    assert raw.cmd(f"AUTH PLAIN {plain_token('tempfail', PASSWORD)}")[0] == 454
    assert raw.cmd("AUTH CRAM-MD5")[0] == 504
    assert raw.cmd("AUTH PLAIN")[0] == 334
    assert raw.cmd("*")[0] == 501
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    assert raw.cmd("RCPT TO:<b@example.org>")[0] == 503
    assert raw.cmd("DATA")[0] == 503
    assert raw.cmd("MAIL FROM:<a@example.org> SIZE=2000")[0] == 552
    assert raw.cmd("MAIL FROM:<-X/tmp/x@example.org>")[0] == 501
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert raw.cmd("DATA")[0] == 503
    assert raw.cmd("RCPT TO:<nodomain>")[0] == 501
    assert raw.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<c@example.org>")[0] == 452  # --max-recipients 1
    assert raw.cmd("MAIL FROM:<x@example.org>")[0] == 503
    assert raw.cmd("DATA now")[0] == 501
    assert raw.cmd("DATA")[0] == 354
    raw.send("Subject: t\r\n\r\nhi\r\n.\r\n")
    assert raw.reply()[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    raw.close()


def text_refusals(lines):
    """(command, code, level) of each text line that says a command was refused: its
    `refused` line, or an AUTH line the auth program answered other than 235 or 535."""
    out = []
    for level, _, what in lines:
        m = re.match(r"(MAIL|RCPT|DATA|AUTH) refused: (\d{3}) \d\.\d{1,3}\.\d{1,3} ", what)
        if m:
            out.append((m.group(1), int(m.group(2)), level))
            continue
        m = re.match(r'AUTH [A-Z0-9-]+ user="(?:[^"\\]|\\.)*": (\d{3}), ', what)
        if m and m.group(1) not in ("235", "535"):
            out.append(("AUTH", int(m.group(1)), level))
    return out


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_refused_command_is_exactly_one_line(make_server, log_format):
    """docs/logging.md "Logging": each refused MAIL, RCPT, DATA and AUTH is exactly one INFO line
    with its command and code, in both formats; the reply after the final dot is the
    message line, not a refusal."""
    srv = make_server("--log-format", log_format, "--max-recipients", "1",
                      "--max-message-size", "1000")
    refusing_dialogue(srv)
    if log_format == "json":
        done = lambda: any(o["event"] == "disconnected" for o in json_lines(srv))  # noqa: E731
        assert wait_until(done), srv.log()
        lines = json_lines(srv)
        refused = [(o["command"], o["code"], o["level"]) for o in lines
                   if o["event"] == "refused"]
        for obj in lines:
            if obj["event"] == "refused":
                assert obj["enhanced"] and obj["reason"], obj
        assert [o["code"] for o in lines if o["event"] == "message"] == [250]
    else:
        assert wait_until(lambda: "disconnected" in srv.log()), srv.log()
        refused = text_refusals(text_lines(srv))
        assert srv.log().count(" message from=") == 1
    assert refused == [(command, code, "info") for command, code in REFUSALS], refused


def test_a_refusal_for_want_of_spool_space_is_one_warning(make_server, tmp_path):
    """docs/logging.md "Logging": a MAIL refused because the spool is nearly full is one line, a
    warning: the server's own trouble, which --log-level warning must still show."""
    spool = tmp_path / "spool"
    spool.mkdir()
    free = shutil.disk_usage(spool).free
    srv = make_server("--spool-dir", str(spool), "--log-format", "json",
                      "--max-message-size", str(free))  # twice it never fits
    raw = tls_client(srv)
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 452
    assert raw.cmd("QUIT")[0] == 221
    raw.close()
    assert wait_until(lambda: any(o["event"] == "disconnected" for o in json_lines(srv)))
    refused = [o for o in json_lines(srv) if o["event"] == "refused"]
    assert [(o["command"], o["code"], o["level"], o["reason"]) for o in refused] == \
        [("MAIL", 452, "warning", "spool directory nearly full")]


# --- health checks --------------------------------------------------------------------------

def session_levels(srv, log_format):
    """{session: [(level, event), ...]} of the connected and disconnected lines."""
    out = {}
    if log_format == "json":
        for obj in json_lines(srv):
            if obj["event"] in ("connected", "disconnected"):
                out.setdefault(obj["session"], []).append((obj["level"], obj["event"]))
    else:
        for level, session, what in text_lines(srv):
            event = what.split(" ", 1)[0].rstrip(":")
            if session and event in ("connected", "disconnected"):
                out.setdefault(session, []).append((level, event))
    return out


def ended(srv, log_format, level, count):
    return sum(events[-1] == (level, "disconnected")
               for events in session_levels(srv, log_format).values()) == count


def reset(raw) -> None:
    """Close with a TCP reset, as HAProxy ends its checks."""
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def v2_local() -> bytes:
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_health_checks_are_logged_at_debug_only(make_server, log_format):
    """docs/logging.md "Logging": a connection that closes or resets, or QUITs after at most one
    HELO/EHLO, before anything else, on either port, is logged at DEBUG only, both its
    lines; a connection that times out, or does anything else, is logged at INFO."""
    smtps = free_port()
    srv = make_server("--log-level", "debug", "--log-format", log_format,
                      "--smtps-port", str(smtps), "--timeout", "2")
    wait_for_port(smtps, proc=srv.proc)
    # The harness's own probes of both ports are health checks too.
    probes = 2
    assert wait_until(lambda: ended(srv, log_format, "debug", probes)), srv.log()

    def plain(*lines, close=Raw.close):
        raw = srv.raw()
        assert raw.reply()[0] == 220
        for line in lines:
            raw.cmd(line)
        close(raw)

    plain()
    plain(close=reset)
    plain("QUIT")
    plain("EHLO lb.test", "QUIT")
    plain("HELO lb.test", "QUIT")
    plain("EHLO lb.test")
    socket.create_connection(("127.0.0.1", smtps), timeout=10).close()
    context = srv.tls_context()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", smtps), timeout=10),
                             server_hostname="mx.test") as tls:
        raw = Raw(tls)
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO lb.test")[0] == 250
        assert raw.cmd("QUIT")[0] == 221
    checks = probes + 8
    assert wait_until(lambda: ended(srv, log_format, "debug", checks)), srv.log()
    for events in session_levels(srv, log_format).values():
        assert events == [("debug", "connected"), ("debug", "disconnected")], events
    if log_format == "json":
        assert all(o["level"] == "debug" for o in json_lines(srv) if "session" in o)
        assert sum(o.get("health_check", False) for o in json_lines(srv)) == checks
    else:
        assert all(level == "debug" for level, session, _ in text_lines(srv) if session)

    # Not health checks: a NOOP, a second EHLO, a timeout, a timeout after EHLO.
    plain("NOOP", "QUIT")
    plain("EHLO lb.test", "EHLO lb.test", "QUIT")
    timed_out = srv.raw()
    assert timed_out.reply()[0] == 220
    after_ehlo = srv.raw()
    assert after_ehlo.reply()[0] == 220
    assert after_ehlo.cmd("EHLO lb.test")[0] == 250
    assert timed_out.closed(timeout=10) and after_ehlo.closed(timeout=10)
    timed_out.close()
    after_ehlo.close()
    assert wait_until(lambda: ended(srv, log_format, "info", 4)), srv.log()
    sessions = session_levels(srv, log_format)
    assert sum(events == [("info", "connected"), ("info", "disconnected")]
               for events in sessions.values()) == 4, sessions
    assert srv.log().count("timed out") == 2


def test_proxy_health_checks_are_logged_at_debug_only(make_server):
    """docs/logging.md "Logging": behind --proxy-protocol, a trusted peer that closes (or resets)
    before its header, and a v2 LOCAL connection that QUITs (after one EHLO or not) or
    closes, are health checks, logged at DEBUG only; a v2 LOCAL connection that does
    more is a session logged at INFO; a peer silent past --timeout is a warning."""
    srv = make_server("--log-level", "debug", "--log-format", "json", "--proxy-protocol",
                      "--proxy-trusted", "127.0.0.1", "--timeout", "2")
    health = lambda: sum(o.get("health_check", False) for o in json_lines(srv))  # noqa: E731
    assert wait_until(lambda: health() == 1), srv.log()  # the harness's probe

    def local(*lines, close=Raw.close):
        raw = srv.raw()
        raw.send(v2_local())
        assert raw.reply()[0] == 220
        for line in lines:
            raw.cmd(line)
        close(raw)

    srv.raw().close()
    reset(srv.raw())
    local()
    local("QUIT")
    local("EHLO haproxy.test", "QUIT")
    local("EHLO haproxy.test", close=reset)
    assert wait_until(lambda: health() == 7), srv.log()
    lines = json_lines(srv)
    assert all(o["level"] == "debug" for o in lines if "session" in o), srv.log()
    assert sum(o["event"] == "disconnected" and o["reason"] == "closed before a PROXY header"
               for o in lines) == 3
    local("NOOP", "QUIT")
    silent = srv.raw()
    assert silent.closed(timeout=10)
    silent.close()
    assert wait_until(lambda: any(o["event"] == "proxy_refused" for o in json_lines(srv)))
    assert wait_until(lambda: any(o["event"] == "disconnected" and o["level"] == "info"
                                  for o in json_lines(srv)))
    lines = json_lines(srv)
    session = next(o["session"] for o in lines
                   if o["event"] == "connected" and o["level"] == "info")
    assert [(o["level"], o["event"]) for o in lines if o.get("session") == session
            and o["event"] != "command"] == \
        [("debug", "proxy"), ("info", "connected"), ("info", "disconnected")]
    (late,) = [o for o in lines if o["event"] == "proxy_refused"]
    assert late["level"] == "warning" and "no complete header in time" in late["reason"]


# --- bounded lines -------------------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["text", "json"])
def test_lines_stay_within_one_kib_whatever_the_client_sends(make_server, tmp_path,
                                                             log_format):
    """docs/logging.md "Logging": huge values from the client (a user name of 8000 octets in
    characters JSON escapes six and twelve times over, a long address, a long HELO, a
    long stderr line) leave every line at most 1 KiB, whole (one line, valid JSON)."""
    process = tmp_path / "stderr-flood"
    process.write_text("#!/usr/bin/env python3\n"
                       "import sys\n"
                       "sys.stdin.buffer.read()\n"
                       "sys.stderr.write('\\u00e9\\U0001f600\"\\\\' * 3000 + '\\n')\n")
    process.chmod(0o755)
    srv = make_server("--log-level", "debug", "--log-format", log_format,
                      "--process", str(process))
    raw = srv.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO " + "h" * 250)[0] == 250
    raw.starttls(srv.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    name = "é" * 3000 + "\U0001f600" * 500 + '"\\'
    assert raw.cmd("AUTH LOGIN " + base64.b64encode(name.encode()).decode())[0] == 334
    assert raw.cmd(base64.b64encode(WRONG.encode()).decode())[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    sender = "\U000f0000" * 60 + '"@example.org'
    raw.cmd(f"MAIL FROM:<{sender}> SMTPUTF8")
    raw.cmd("MAIL FROM:<" + "\U0001f600" * 200 + "@example.org> SMTPUTF8")
    raw.cmd("RCPT TO:<" + "é" * 240 + "@example.org>")
    raw.cmd("RSET")
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send("Subject: t\r\n\r\nhi\r\n.\r\n")
    assert raw.reply()[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    raw.close()
    assert wait_until(lambda: "disconnected" in srv.log()), srv.log()
    lines = srv.log().splitlines()
    assert any("stderr" in line for line in lines), srv.log()
    for line in lines:
        if log_format == "json":
            obj = json.loads(line)
            assert len(line) <= MAX_LINE, line
            assert line.isascii(), line
            check_json_line(obj, readme_events())
        else:
            message = line.split(" ", 2)[2]  # after the time and the level
            assert len(message) <= MAX_LINE, line
    if log_format == "json":
        failed = next(json.loads(line) for line in lines if '"auth_failed"' in line)
        assert failed["truncated"] is True
        assert failed["username"].endswith("...") and failed["username"].startswith("ééé")
        stderr = next(json.loads(line) for line in lines if '"program_output"' in line)
        assert stderr["truncated"] is True and stderr["stderr"].startswith('é\U0001f600"\\')


# --- choosing the format --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cli", "env", "ini"])
def test_log_format_from_each_source(make_server, tmp_path, how):
    """docs/configuration.md "Configuration": --log-format, SSMTPD_LOG_FORMAT and the ini key
    log-format (or log_format) each choose JSON."""
    args, env = [], None
    if how == "cli":
        args = ["--log-format", "json"]
    elif how == "env":
        env = {"SSMTPD_LOG_FORMAT": "JSON"}
    else:
        ini = tmp_path / "ssmtpd.ini"
        ini.write_text("[ssmtpd]\nlog_format = json\n")
        args = ["--config", str(ini)]
    srv = make_server(*args, env=env)
    raw = tls_client(srv)
    raw.cmd("QUIT")
    raw.close()
    assert wait_until(lambda: any(o["event"] == "disconnected" for o in json_lines(srv)))
    assert json_lines(srv)[0]["event"] in ("listening", "config")


def test_a_bad_log_format_is_one_line_and_exit_2():
    """docs/configuration.md "Configuration": a --log-format other than text or json stops start-up with
    one line naming the option, exit status 2."""
    from conftest import AUTH, RECORD
    result = subprocess.run(
        [sys.executable, "-m", "ssmtpd", "--process", RECORD, "--auth", AUTH, "--log-format", "xml",
         "--check-config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert result.stderr == "ssmtpd: --log-format: must be text or json\n"


def test_text_is_the_default_and_unchanged(server):
    """docs/logging.md "Logging": without --log-format, the text lines of before."""
    raw = tls_client(server)
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
    raw.cmd("QUIT")
    raw.close()
    log = server.wait_log('"alice": disconnected: closed after 221 after ')
    assert re.search(r'(?m)^\S+Z INFO \[[0-9a-f]{12}\] 127\.0\.0\.1 -: AUTH PLAIN user="alice": '
                     r'235, exit 0 in \d+\.\d{3}s$', log), log
    assert re.search(r'(?m) INFO \[[0-9a-f]{12}\] 127\.0\.0\.1 "alice": '
                     r'MAIL FROM:"a@example\.org"$', log), log


# --- the server's own lines -----------------------------------------------------------------

def test_workers_master_and_signals_write_json_events(make_server):
    """docs/logging.md "Logging": with --workers, the master's and the workers' own lines are
    JSON too, each with its event: listening, worker, reload, shutdown, stopped."""
    srv = make_server("--workers", "2", "--log-format", "json")
    assert wait_until(lambda: sum(o["event"] == "listening" for o in json_lines(srv)) == 3)
    raw = tls_client(srv)
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    raw.cmd("QUIT")
    raw.close()
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: sum(o["event"] == "reload" for o in json_lines(srv)) >= 2)
    assert srv.stop() == 0
    vocabulary = readme_events()
    lines = json_lines(srv)
    for obj in lines:
        check_json_line(obj, vocabulary)
    events = [o["event"] for o in lines]
    for event in ("listening", "worker", "reload", "shutdown", "stopped", "auth"):
        assert event in events, (event, events)
    started = [o for o in lines if o["event"] == "worker" and "started" in o["message"]]
    # Two at start, two more for the reload.
    assert len(started) == 4 and all(isinstance(o["pid"], int) for o in started)
    assert lines[-1]["event"] == "stopped"


# --- behind the real HAProxy ----------------------------------------------------------------

HAPROXY_CFG = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend submission
    bind 127.0.0.1:{port}
    default_backend ssmtpd

backend ssmtpd
    option smtpchk EHLO haproxy.test
    default-server send-proxy-v2 check check-send-proxy inter 1s
    server a 127.0.0.1:{server}
"""
CHECK_SECONDS = 30.0


def test_thirty_seconds_of_haproxy_health_checks_add_no_info_line(make_server, tmp_path):
    """docs/logging.md "Logging": behind the real HAProxy of docs/scaling.md "Scaling" (its SMTP checks,
    each a PROXY v2 LOCAL connection, EHLO and QUIT, here every second), 30 s of health
    checks add no line at INFO or above; at DEBUG each is there."""
    if not shutil.which("haproxy"):
        pytest.fail("haproxy is not installed (.ci/run installs Debian's haproxy)")
    srv = make_server("--proxy-protocol", "--proxy-trusted", "127.0.0.1",
                      "--log-level", "debug")
    started = len(srv.log().splitlines())
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=free_port(), server=srv.port))
    with open(tmp_path / "haproxy.log", "wb") as out:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + CHECK_SECONDS
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
        finally:
            stop_process(proc, timeout=10)
    caused = srv.log().splitlines()[started:]
    checks = [line for line in caused if "disconnected: closed after 221" in line]
    # One a second; a busy machine may run fewer.
    assert len(checks) >= 10, "\n".join(caused)
    assert all(" DEBUG " in line for line in caused), \
        "\n".join(line for line in caused if " DEBUG " not in line)
