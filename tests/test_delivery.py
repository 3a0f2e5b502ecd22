"""Message delivery to the process program (docs/process-program.md "The process program") and the DATA rows of docs/dialogue.md "The dialogue".

Everything goes through a real server, real sockets and the real recording
program: what the program saw is read back from its records.
"""

import base64
import datetime
import email.utils
import hashlib
import os
import random
import re
import socket
import stat
import time

import pytest

from conftest import (HOSTNAME, PROGRAMS, RECORD, USER, Raw, ServerProcess,
                      lent_to_one_test, plain_token, shared_by_the_module, wait_until)
from ssmtpd import replies

ECHO = os.path.join(PROGRAMS, "echo-body")
SENDER = "sender@example.org"
RCPT = "rcpt@example.net"
MIB = 1024 * 1024
DEFAULT_MAX = 26214400

DATE_5322 = (r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?\d{1,2} "
             r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
             r"\d\d:\d\d(?::\d\d)? [+-]\d{4}")


# --- helpers -----------------------------------------------------------------

INHERITED_OCTETS = b"caf\xe9 \xff\xfe \xc3\xa9"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, certs):
    """One server without the TLS and AUTH requirements, to reach every combination."""
    # Stale copies of the per-message variables in the server's own
    # environment must never reach the program.
    inherited = {"SSMTPD_USERNAME": "root", "SSMTPD_MAIL_FROM": "inherited@example.org",
                 "SSMTPD_TLS": "TLSv9", "SSMTPD_RCPT_TO": "inherited@example.net",
                 # Octets that are not UTF-8 (os.environ's surrogateescape form).
                 "TEST_OCTETS": INHERITED_OCTETS.decode("utf-8", "surrogateescape")}
    yield from shared_by_the_module(
        ServerProcess(str(tmp_path_factory.mktemp("open")), certs,
                      ["--no-require-tls", "--no-require-auth"], env=inherited).start())


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory, certs):
    """A server whose process program echoes the message: the test picks its stdout."""
    yield from shared_by_the_module(
        ServerProcess(str(tmp_path_factory.mktemp("echo")), certs, ["--process", ECHO]).start())


@pytest.fixture
def open_srv(open_server):
    yield from lent_to_one_test(open_server)


def session(srv, tls=True, auth=True, helo="EHLO client.test", timeout=30):
    raw = srv.raw(timeout=timeout)
    assert raw.reply()[0] == 220
    assert raw.cmd(helo)[0] == 250
    if tls:
        raw.starttls(srv.tls_context())
        assert raw.cmd(helo)[0] == 250
    if auth:
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert code == 235, lines
    return raw


def stuffed(message: bytes) -> bytes:
    """`message` as a client sends it: dot-stuffed and terminated (RFC 5321 §4.5.2)."""
    assert message == b"" or message.endswith(b"\r\n")
    return (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def envelope(raw, sender=SENDER, rcpts=(RCPT,)):
    raw.start_data(sender, rcpts)


def transaction(raw, message: bytes, sender=SENDER, rcpts=(RCPT,)):
    """MAIL, RCPT..., DATA, the message; the reply to the final dot as (code, line)."""
    envelope(raw, sender, rcpts)
    raw.send(stuffed(message))
    code, lines = raw.reply()
    assert len(lines) == 1, lines
    return code, lines[0]


def stdin_of(run) -> bytes:
    return run["stdin"].encode("latin-1")


def split_received(stdin: bytes):
    """(the leading Received: field with its folded lines, the rest)."""
    m = re.match(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", stdin)
    assert m, stdin[:300]
    return m.group(0), stdin[m.end():]


def check_received(header: bytes, helo: str, protocol: str) -> None:
    """RFC 5321 §4.4 shape: from <helo> (<literal>) by <host> ... with <proto> ...; <date>."""
    unfolded = re.sub(r"\r\n[ \t]+", " ", header.decode("ascii"))
    assert unfolded.endswith("\r\n") and "\r" not in unfolded[:-2] and "\n" not in unfolded[:-2]
    m = re.fullmatch(r"Received: from (\S+) \(\[127\.0\.0\.1\]\) by (\S+)(?: .*)? "
                     r"with (\S+)(?: .*)?; (" + DATE_5322 + r")\r\n", unfolded)
    assert m, unfolded
    assert m.group(1) == helo
    assert m.group(2) == HOSTNAME
    assert m.group(3) == protocol
    when = email.utils.parsedate_to_datetime(m.group(4))
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - when).total_seconds()) < 300


def process_alive(pid: int) -> bool:
    """A live or unreaped (zombie) process `pid` that is still our record program."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state == "Z" or b"record" in cmdline


def big_message(size: int, seed: int) -> bytes:
    """A CRLF message of exactly `size` octets; some lines start with dots."""
    rnd = random.Random(seed)
    body = base64.b64encode(rnd.randbytes(size))
    lines = [body[i:i + 76] for i in range(0, len(body), 76)]
    for i in range(0, len(lines), 37):
        lines[i] = b"." + lines[i]
    message = b"Subject: big\r\n\r\n" + b"\r\n".join(lines)
    message = message[:size - 2] + b"\r\n"
    assert b"\r\n.\r\n" not in message and len(message) == size
    return message


def disconnects(srv) -> int:
    return srv.log().count("disconnected")


# --- argv, environment and stdin (docs/process-program.md "The process program") ----------------------------------

def test_argv_and_environment_of_authenticated_tls_session(server):
    """docs/process-program.md "The process program": argv [program, USERNAME], SSMTPD_* env, recipients in order, one per line."""
    raw = session(server)
    rcpts = ("first@example.net", '"john doe"@example.net', "third@example.com")
    code, line = transaction(raw, b"Subject: env\r\n\r\nhello\r\n", rcpts=rcpts)
    assert code == 250 and line.startswith("250 2.0.0 "), line
    raw.close()
    [run] = server.runs()
    assert run["argv"] == [RECORD, USER]
    env = run["env"]
    assert env["SSMTPD_USERNAME"] == USER
    assert env["SSMTPD_MAIL_FROM"] == SENDER
    assert env["SSMTPD_RCPT_TO"] == "\n".join(rcpts)
    assert env["SSMTPD_RCPT_TO"].split("\n")[1] == '"john doe"@example.net'
    assert env["SSMTPD_CLIENT_ADDR"] == "127.0.0.1"
    assert env["SSMTPD_HELO"] == "client.test"
    assert env["SSMTPD_TLS"] == "TLSv1.3"
    assert "SSMTPD_PASSWORD" not in env
    # The rest of the server's environment is passed on.
    assert env["TEST_RECORD"] == server.record_dir


def test_argv_and_environment_of_plain_anonymous_session(open_srv):
    """docs/process-program.md "The process program": with no AUTH the user argument and SSMTPD_USERNAME are "", SSMTPD_TLS is empty."""
    raw = session(open_srv, tls=False, auth=False, helo="EHLO plain.client")
    code, line = transaction(raw, b"hello\r\n", sender="", rcpts=("a@example.net",))
    assert code == 250, line
    raw.close()
    [run] = open_srv.runs()
    assert run["argv"] == [RECORD, ""]
    env = run["env"]
    assert env["SSMTPD_USERNAME"] == ""
    assert env["SSMTPD_TLS"] == ""
    assert env["SSMTPD_MAIL_FROM"] == ""
    assert env["SSMTPD_RCPT_TO"] == "a@example.net"
    assert env["SSMTPD_HELO"] == "plain.client"
    # The rest of the server's environment reaches the program octet for octet.
    assert env["TEST_OCTETS"].encode("utf-8", "surrogateescape") == INHERITED_OCTETS


MESSAGES = {
    "headers and body": (b"From: A <a@example.org>\r\nTo: b@example.net\r\nSubject: hi\r\n\r\n"
                         b"line one\r\n\r\n  indented\t tab\r\n"),
    "dot lines": b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmid.dle\r\n. \r\n",
    "8-bit and long line": b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\n" + b"\xff\x00\x7f" * 300 + b"\r\n",
    "no header at all": b"just a body line\r\n",
    "empty": b"",
    "own Received header": b"Received: from elsewhere by there; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                           b"Subject: x\r\n\r\nbody\r\n",
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_stdin_is_exactly_the_data_after_one_received_header(server, name):
    """docs/process-program.md "The process program": stdin is the unstuffed data with CRLF ends, after exactly one Received header."""
    message = MESSAGES[name]
    raw = session(server)
    code, line = transaction(raw, message, sender="bounce+x=y@example.org",
                             rcpts=("x@example.net",))
    assert code == 250, line
    raw.close()
    [run] = server.runs()
    header, rest = split_received(stdin_of(run))
    assert rest == message
    check_received(header, "client.test", "ESMTPSA")
    # MAIL FROM / RCPT TO never change the message: no Return-Path, no
    # Delivered-To, nothing but our one trace line.
    assert b"bounce+x=y" not in stdin_of(run) and b"x@example.net" not in stdin_of(run)


@pytest.mark.parametrize("tls,auth,protocol", [
    (False, False, "ESMTP"), (False, True, "ESMTPA"), (True, False, "ESMTPS"),
])
def test_received_header_protocol(open_srv, tls, auth, protocol):
    """docs/process-program.md "The process program" / RFC 5321 §4.4, RFC 3848: `with` says whether TLS and AUTH were used."""
    raw = session(open_srv, tls=tls, auth=auth, helo="EHLO combo.client")
    code, line = transaction(raw, b"Subject: p\r\n\r\nbody\r\n")
    assert code == 250, line
    raw.close()
    [run] = open_srv.runs()
    header, rest = split_received(stdin_of(run))
    check_received(header, "combo.client", protocol)
    assert rest == b"Subject: p\r\n\r\nbody\r\n"
    assert run["argv"][-1] == (USER if auth else "")
    assert run["env"]["SSMTPD_TLS"] == ("TLSv1.3" if tls else "")


def test_received_header_after_helo_says_smtp(open_srv):
    """RFC 5321 §4.4 / RFC 3848: a HELO session used no service extensions: `with SMTP`."""
    raw = session(open_srv, tls=False, auth=False, helo="HELO old.client")
    code, line = transaction(raw, b"body\r\n")
    assert code == 250, line
    raw.close()
    [run] = open_srv.runs()
    header, _ = split_received(stdin_of(run))
    check_received(header, "old.client", "SMTP")


def test_received_header_cannot_be_forged_through_helo(open_srv):
    """RFC 5321 §4.4: a HELO argument with blanks and parentheses cannot fake a trace clause."""
    raw = session(open_srv, tls=False, auth=False, helo="EHLO ok.client")
    code, lines = raw.cmd("EHLO evil.example ([10.0.0.1]) by trusted.example")
    if code == 501:  # refusing a HELO argument that is no domain is fine too
        raw.close()
        return
    assert code == 250, lines
    assert transaction(raw, b"body\r\n")[0] == 250
    raw.close()
    [run] = open_srv.runs()
    header, _ = split_received(stdin_of(run))
    text = re.sub(r"\r\n[ \t]+", " ", header.decode("ascii", "replace"))
    # The client's name may appear, but only as one token, never as the
    # source address or as a second "by" clause.
    assert re.match(r"Received: from [^\s()\[\]]+ \(\[127\.0\.0\.1\]\) by mx\.test\b", text), text
    assert "[10.0.0.1]" not in text and "by trusted.example" not in text, text


def test_no_received_header(make_server):
    """docs/configuration.md "Configuration" --no-received-header: stdin is exactly the unstuffed data, nothing prepended."""
    srv = make_server("--no-received-header")
    raw = session(srv)
    message = MESSAGES["dot lines"]
    assert transaction(raw, message)[0] == 250
    assert transaction(raw, b"")[0] == 250
    raw.close()
    first, second = srv.runs()
    assert stdin_of(first) == message
    assert stdin_of(second) == b""


# --- the exit table (docs/process-program.md "The process program") -----------------------------------------------

@pytest.mark.parametrize("local,reply", [
    ("exit0", replies.ACCEPTED),
    ("exit75", replies.PROCESS_TEMPFAIL),
    ("exit71", replies.PROCESS_TEMPFAIL),
    ("signal", replies.PROCESS_TEMPFAIL),
    ("exit1", replies.PROCESS_REJECTED),
    ("exit3", replies.PROCESS_REJECTED),
    ("exit64", replies.PROCESS_REJECTED),
])
def test_exit_table(server, local, reply):
    """docs/process-program.md "The process program" table: 0 → 250 2.0.0; 75, 71, signal → 451 4.3.0; other exits → 554 5.3.0."""
    raw = session(server)
    code, line = transaction(raw, b"Subject: t\r\n\r\nbody\r\n", sender=f"{local}@example.org")
    assert line == f"{reply.code} {reply.enhanced} {reply.text}"
    assert code in (250, 451, 554)
    [run] = server.runs()
    assert run["env"]["SSMTPD_MAIL_FROM"] == f"{local}@example.org"
    # Whatever the outcome, the transaction is over (RFC 5321 §4.1.1.4) and the
    # session goes on.
    assert raw.cmd("DATA")[0] == 503
    assert raw.cmd("NOOP")[0] == 250
    raw.close()
    assert len(server.runs()) == 1


def test_process_timeout_kills_the_program(make_server):
    """docs/process-program.md "The process program": over --process-timeout → 451 4.3.0 promptly, and the program is gone."""
    # The program must record its start before the timeout: a Python start-up
    # on a busy machine can take over a second.
    srv = make_server("--process-timeout", "4")
    raw = session(srv)
    started = time.monotonic()
    code, line = transaction(raw, b"body\r\n", sender="sleep30@example.org")
    assert time.monotonic() - started < 15
    assert line.startswith("451 4.3.0"), line
    [run] = srv.runs()
    assert run["done"] is False
    assert wait_until(lambda: not process_alive(run["pid"]), timeout=5)
    # The session survives the kill.
    assert transaction(raw, b"body\r\n")[0] == 250
    raw.close()


def test_program_that_cannot_start(make_server, tmp_path):
    """docs/process-program.md "The process program": a process program that cannot start (it was fine at
    start-up, then broke) → 451 4.3.0, the session goes on, and an ERROR line names it."""
    script = tmp_path / "broken"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    srv = make_server("--process", str(script), "--log-level", "warning")
    script.write_text("exit 0\n")  # no #! line any more: Exec format error
    raw = session(srv)
    code, line = transaction(raw, b"body\r\n")
    assert line.startswith("451 4.3.0"), line
    assert raw.cmd("NOOP")[0] == 250
    code, line = transaction(raw, b"again\r\n")
    assert line.startswith("451 4.3.0"), line
    raw.close()
    assert "ERROR [" in srv.log()
    assert f"process program {script} could not start: Exec format error" in srv.log()


@pytest.mark.parametrize("inner, code", [("/nonexistent/deliver", 127),
                                         ("not-executable", 126)])
def test_wrapper_whose_command_cannot_start(make_server, tmp_path, inner, code):
    """docs/process-program.md "The process program": a wrapper whose inner exec fails exits 126 or 127,
    which is "cannot start": 451 4.3.0 (the client keeps the message), and an ERROR line."""
    if inner == "not-executable":
        inner = tmp_path / inner
        inner.write_text("#!/bin/sh\nexit 0\n")
        inner.chmod(0o644)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f"#!/bin/bash\nexec {inner} \"$@\"\n")
    wrapper.chmod(0o755)
    srv = make_server("--process", str(wrapper), "--log-level", "warning")
    raw = session(srv)
    reply, line = transaction(raw, b"body\r\n")
    assert line.startswith("451 4.3.0"), line
    raw.close()
    assert f"process program {wrapper} could not start: exit {code}, " in srv.log()


# --- the reply text (docs/process-program.md "The process program") -----------------------------------------------

def test_reply_text_from_last_stdout_line(server):
    """docs/process-program.md "The process program": the program's last non-empty stdout line is the reply text."""
    raw = session(server)
    code, line = transaction(raw, b"body\r\n", sender="say@example.org")
    assert line == "250 2.0.0 queued as 4711"
    raw.close()


@pytest.mark.parametrize("sender,tail,expected", [
    ("ok@x", b"chatter\r\nqueued as 4711\r\n", "250 2.0.0 queued as 4711"),
    ("exit1@x", b"no such list\r\n", "554 5.3.0 no such list"),
    ("exit75@x", b"disk full, later\r\n", "451 4.3.0 disk full, later"),
    ("ok@x", b"last words\r\n   \r\n\t\r\n\r\n", "250 2.0.0 last words"),
    ("ok@x", b"foo\x01bar\x1b[0m\x7f\xc3\xa9baz\x00\x08!\r\n", "250 2.0.0 foobar[0mbaz!"),
    ("ok@x", b"A" * 150 + b"B" * 150 + b"\r\n", "250 2.0.0 " + "A" * 150 + "B" * 50),
    # A whole reply printed by the program: its codes are not repeated after ours.
    ("ok@x", b"250 2.0.0 queued as 4711\r\n", "250 2.0.0 queued as 4711"),
    ("exit1@x", b"550 5.1.1 no such user\r\n", "554 5.3.0 no such user"),
    ("ok@x", b"2.6.0 stored\r\n", "250 2.0.0 stored"),
    ("ok@x", b"250\r\n", str(replies.ACCEPTED)),
    ("ok@x", b"4711 messages queued\r\n", "250 2.0.0 4711 messages queued"),
], ids=["last-line", "rejected", "tempfail", "blank-lines-skipped", "non-printable",
        "cut-at-200", "own-codes", "own-codes-other-code", "own-enhanced-code",
        "only-a-code", "a-number-is-words"])
def test_reply_text_is_printable_and_cut(echo_server, sender, tail, expected):
    """docs/process-program.md "The process program": printable ASCII only, cut at 200 characters; the code stays the server's."""
    raw = session(echo_server)
    code, line = transaction(raw, b"Subject: t\r\n\r\n" + tail, sender=sender)
    assert line == expected
    raw.close()


def test_default_reply_text_without_stdout(server):
    """docs/process-program.md "The process program": without a stdout line the server's default text is used."""
    raw = session(server)
    assert transaction(raw, b"x\r\n")[1] == str(replies.ACCEPTED)
    assert transaction(raw, b"x\r\n", sender="exit64@x")[1] == str(replies.PROCESS_REJECTED)
    raw.close()


def test_program_stderr_goes_to_the_log_with_the_session_id(server):
    """docs/process-program.md "The process program", docs/logging.md "Logging": the program's stderr is logged, tagged with the session."""
    raw = session(server)
    assert transaction(raw, b"x\r\n", sender="stderr@example.org")[0] == 250
    raw.close()
    log = server.wait_log("process: second line")
    lines = log.splitlines()
    first = [ln for ln in lines if "process: first line" in ln]
    second = [ln for ln in lines if "process: second line" in ln]
    mail = [ln for ln in lines if 'MAIL FROM:"stderr@example.org"' in ln]
    assert len(first) == len(second) == len(mail) == 1, log
    tag = re.search(r"\[(\w+)\]", mail[0]).group(1)
    assert f"[{tag}]" in first[0] and f"[{tag}]" in second[0]
    # Diagnostics, not a problem of the server's: INFO (docs/monitoring.md "Monitoring").
    assert f" INFO [{tag}]" in first[0] and f" INFO [{tag}]" in second[0]
    # One stderr line, one log line: it cannot be confused with the session's own lines.
    assert "process: second line" not in first[0]


# --- the size limit (docs/dialogue.md "The dialogue") -----------------------------------------------

def test_size_parameter_over_the_limit(server):
    """docs/dialogue.md "The dialogue": SIZE= over the limit at MAIL → 552 5.3.4, no transaction, no program run."""
    raw = session(server)
    code, lines = raw.cmd(f"MAIL FROM:<{SENDER}> SIZE={DEFAULT_MAX + 1}")
    assert lines == [str(replies.TOO_BIG)]
    assert raw.cmd(f"RCPT TO:<{RCPT}>")[0] == 503
    assert raw.cmd(f"MAIL FROM:<{SENDER}> SIZE={DEFAULT_MAX}")[0] == 250
    assert raw.cmd("RSET")[0] == 250
    assert server.runs() == []
    assert transaction(raw, b"fine\r\n")[0] == 250
    raw.close()
    assert len(server.runs()) == 1


def test_message_growing_over_the_limit(make_server):
    """docs/dialogue.md "The dialogue": a message over --max-message-size → 552 5.3.4 after the final dot, no run,
    and the session goes on."""
    srv = make_server("--max-message-size", "1000")
    raw = session(srv)
    # Exactly at the limit is fine; the server's own Received line is not the client's size.
    at_limit = b"Subject: s\r\n\r\n" + b"a" * (1000 - 16) + b"\r\n"
    assert len(at_limit) == 1000
    assert transaction(raw, at_limit)[0] == 250
    assert len(srv.runs()) == 1
    srv.clear_runs()

    code, line = transaction(raw, at_limit[:-2] + b"b\r\n")
    assert line == str(replies.TOO_BIG)
    assert srv.runs() == []

    # The rest of an oversized message is read as data, never as commands: were
    # the server to answer early, these NOOP lines would each get a 250.
    envelope(raw)
    raw.send(b"NOOP\r\n" * 400)
    time.sleep(0.3)
    raw.send(b".\r\n")
    assert raw.reply()[1] == [str(replies.TOO_BIG)]
    assert raw.cmd("NOOP")[1] == [str(replies.OK)]
    assert raw.cmd(f"RCPT TO:<{RCPT}>")[0] == 503
    assert srv.runs() == []

    assert transaction(raw, b"small again\r\n")[0] == 250
    raw.close()
    [run] = srv.runs()
    assert split_received(stdin_of(run))[1] == b"small again\r\n"


# --- big messages and spooling ------------------------------------------------

@pytest.mark.parametrize("mib", [3, 5, 20])
def test_large_message_arrives_intact(server, mib):
    """docs/process-program.md "The process program": large messages (in memory or spooled to a file) reach the program intact."""
    message = big_message(mib * MIB, seed=mib)
    raw = session(server, timeout=120)
    code, line = transaction(raw, message)
    assert code == 250, line
    raw.close()
    [run] = server.runs()
    _, rest = split_received(stdin_of(run))
    assert len(rest) == len(message)
    assert hashlib.sha256(rest).hexdigest() == hashlib.sha256(message).hexdigest()


@pytest.mark.parametrize("size", [100, DEFAULT_MAX])
def test_program_that_does_not_read_stdin(server, size):
    """docs/process-program.md "The process program": a program that exits without reading its stdin is answered at once."""
    message = big_message(size, seed=7) if size > 1000 else b"x" * (size - 2) + b"\r\n"
    raw = session(server, timeout=60)
    envelope(raw, sender="noread@example.org")
    raw.send(stuffed(message))
    # The wire part is bounded by the socket timeout; what follows the upload
    # must not wait for a pipe nobody reads (or for --process-timeout, 300 s).
    started = time.monotonic()
    code, lines = raw.reply()
    assert lines == [str(replies.ACCEPTED)]
    assert time.monotonic() - started < 30
    [run] = server.runs()
    assert run["done"] is True and run["stdin"] == ""
    assert raw.cmd("NOOP")[0] == 250
    raw.close()


# --- a client that vanishes mid-DATA (docs/dialogue.md "The dialogue") ---------------------------------

@pytest.mark.parametrize("how", ["close", "shutdown", "after-fake-end"])
def test_disconnect_mid_data_runs_nothing(server, how):
    """docs/dialogue.md "The dialogue": a client that vanishes mid-DATA causes no process run; the server keeps serving."""
    before = disconnects(server)
    raw = session(server)
    envelope(raw)
    raw.send(b"Subject: cut\r\n\r\n" + b"partial data\r\n" * 1000)
    if how == "after-fake-end":
        # Looks like an end to a sloppy reader, is not one.
        raw.send(b"last line\r\n.\n")
    if how == "shutdown":
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.reply() == (None, [])
    raw.close()
    assert wait_until(lambda: disconnects(server) > before, timeout=10), server.log()
    time.sleep(0.5)
    assert server.runs() == []
    raw = session(server)
    assert transaction(raw, b"next\r\n")[0] == 250
    raw.close()
    assert len(server.runs()) == 1


# --- pipelining and several transactions (RFC 2920, RFC 5321 §4.1.1.4) --------

def test_pipelined_envelope(server):
    """docs/dialogue.md "The dialogue" PIPELINING: MAIL, RCPT, RCPT, DATA in one write → four replies in order."""
    raw = session(server)
    raw.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@example.net>\r\n"
             "RCPT TO:<b@example.net>\r\nDATA\r\n")
    assert [raw.reply()[1] for _ in range(3)] == [
        [str(replies.SENDER_OK)], [str(replies.RECIPIENT_OK)], [str(replies.RECIPIENT_OK)]]
    assert raw.reply()[0] == 354
    raw.send(b"Subject: p\r\n\r\nbody\r\n.\r\n")
    assert raw.reply()[0] == 250
    raw.close()
    [run] = server.runs()
    assert run["env"]["SSMTPD_RCPT_TO"] == "a@example.net\nb@example.net"


def test_commands_after_the_final_dot_run_after_the_data_reply(server):
    """RFC 2920: commands in the same write as the final dot are executed after its reply."""
    raw = session(server)
    envelope(raw)
    raw.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<second@example.org>\r\n"
             b"RCPT TO:<c@example.net>\r\nDATA\r\n")
    assert raw.reply()[1] == [str(replies.ACCEPTED)]
    assert [raw.reply()[0] for _ in range(3)] == [250, 250, 354]
    raw.send(b"second body\r\n.\r\nQUIT\r\n")
    assert raw.reply()[0] == 250
    assert raw.reply()[0] == 221
    assert raw.closed()
    first, second = server.runs()
    assert split_received(stdin_of(first))[1] == b"Subject: p\r\n\r\nbody\r\n"
    assert split_received(stdin_of(second))[1] == b"second body\r\n"
    assert second["env"]["SSMTPD_MAIL_FROM"] == "second@example.org"
    assert second["env"]["SSMTPD_RCPT_TO"] == "c@example.net"


def test_one_run_per_message_on_one_connection(server):
    """docs/process-program.md "The process program": exactly one run per accepted message; no envelope leaks into the next one."""
    raw = session(server)
    sent = []
    for i in range(4):
        rcpts = tuple(f"r{i}-{j}@example.net" for j in range(i + 1))
        body = f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode()
        assert transaction(raw, body, sender=f"s{i}@example.org", rcpts=rcpts)[0] == 250
        sent.append((f"s{i}@example.org", "\n".join(rcpts), body))
    raw.close()
    runs = server.runs()
    assert len(runs) == 4
    got = [(r["env"]["SSMTPD_MAIL_FROM"], r["env"]["SSMTPD_RCPT_TO"],
            split_received(stdin_of(r))[1]) for r in runs]
    assert got == sent


def test_rset_clears_the_transaction(server):
    """RFC 5321 §4.1.1.5: RSET drops sender and recipients; nothing is delivered."""
    raw = session(server)
    assert raw.cmd("MAIL FROM:<old@example.org>")[0] == 250
    assert raw.cmd("RCPT TO:<old@example.net>")[0] == 250
    assert raw.cmd("RSET")[1] == [str(replies.RESET_OK)]
    assert raw.cmd("DATA")[0] == 503
    assert raw.cmd("RCPT TO:<x@example.net>")[0] == 503
    assert transaction(raw, b"fresh\r\n", sender="new@example.org",
                       rcpts=("new@example.net",))[0] == 250
    raw.close()
    [run] = server.runs()
    assert run["env"]["SSMTPD_MAIL_FROM"] == "new@example.org"
    assert run["env"]["SSMTPD_RCPT_TO"] == "new@example.net"


def test_ipv6_client_address_and_received_literal(tmp_path, certs):
    """docs/configuration.md "Configuration" --bind ::1, §4 SSMTPD_CLIENT_ADDR, RFC 5321 §4.4: an IPv6 client is [IPv6:::1]."""
    srv = ServerProcess(str(tmp_path), certs, ["--bind", "::1"])
    srv.start(wait_host="::1")
    try:
        raw = Raw(socket.create_connection(("::1", srv.port), timeout=10))
        raw.login(srv.tls_context())
        code, line = transaction(raw, b"Subject: v6\r\n\r\nhi\r\n")
        raw.close()
        assert code == 250, line
        (run,) = srv.runs()
        assert run["env"]["SSMTPD_CLIENT_ADDR"] == "::1"
        header, _ = split_received(stdin_of(run))
        assert header.startswith(b"Received: from client.test ([IPv6:::1])\r\n"), header
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()
