"""AUTH PLAIN and LOGIN, the auth program's contract and the password's secrecy (docs/auth-program.md "The auth program", docs/dialogue.md "The dialogue")."""

import base64
import hashlib
import os
import time

import pytest

from conftest import AUTH, PASSWORD, PROGRAMS, USER, b64, plain_token, wait_until

AUTH_SLEEP = os.path.join(PROGRAMS, "auth-sleep")
AUTH_HASH = os.path.join(PROGRAMS, "auth-hash")
ENV_DUMP = os.path.join(PROGRAMS, "env-dump")

OK_LINE = "235 2.7.0 Authentication successful"
INVALID_LINE = "535 5.7.8 Authentication credentials invalid"
# RFC 4954 §4 / the LOGIN convention: base64 of "Username:" and "Password:".
USERNAME_PROMPT = "334 VXNlcm5hbWU6"
PASSWORD_PROMPT = "334 UGFzc3dvcmQ6"


def raw_token(data: bytes) -> str:
    return base64.b64encode(data).decode()


def open_tls(srv):
    """A Raw client past greeting, EHLO, STARTTLS and the second EHLO."""
    raw = srv.raw()
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO client.test")[0] == 250
    raw.starttls(srv.tls_context())
    assert raw.cmd("EHLO client.test")[0] == 250
    return raw


@pytest.fixture
def tls_client(server):
    """Factory of TLS-ready Raw clients on the shared server, closed after the test."""
    opened = []

    def factory(srv=server):
        raw = open_tls(srv)
        opened.append(raw)
        return raw

    yield factory
    for raw in opened:
        raw.close()


def process_alive(pid: int) -> bool:
    """A zombie counts as gone: it no longer runs, and only its parent can reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def send_message(raw, body="Subject: t\r\n\r\nhello\r\n"):
    return raw.send_message(body)


# --- successful logins -------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial_response", [True, False], ids=["initial", "no-initial"])
def test_smtplib_login(server, mechanism, initial_response):
    """docs/dialogue.md "The dialogue" AUTH, §3: PLAIN and LOGIN, with or without an initial response → 235."""
    with server.smtp() as s:
        s.ehlo()
        s.starttls(context=server.tls_context())
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"].split()
        assert "LOGIN" in s.esmtp_features["auth"].split()
        s.user, s.password = USER, PASSWORD
        method = s.auth_plain if mechanism == "PLAIN" else s.auth_login
        code, text = s.auth(mechanism, method, initial_response_ok=initial_response)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
    runs = server.runs("auth")
    assert len(runs) == 1
    assert runs[0]["env"]["SSMTPD_MECHANISM"] == mechanism


def test_plain_without_initial_response(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: `AUTH PLAIN` gets an empty 334 prompt (RFC 4954 §4), then the token."""
    raw = tls_client()
    code, lines = raw.cmd("AUTH PLAIN")
    assert lines == ["334 "]
    code, lines = raw.cmd(plain_token())
    assert lines == [OK_LINE]
    assert len(server.runs("auth")) == 1


def test_login_without_initial_response(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: LOGIN asks `Username:` then `Password:` in base64."""
    raw = tls_client()
    assert raw.cmd("AUTH LOGIN")[1] == [USERNAME_PROMPT]
    assert raw.cmd(b64(USER))[1] == [PASSWORD_PROMPT]
    assert raw.cmd(b64(PASSWORD))[1] == [OK_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1
    assert runs[0]["env"]["SSMTPD_USERNAME"] == USER
    assert runs[0]["env"]["SSMTPD_MECHANISM"] == "LOGIN"


def test_login_with_initial_response(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: `AUTH LOGIN <user>` skips the username prompt and asks for the password."""
    raw = tls_client()
    assert raw.cmd(f"AUTH LOGIN {b64(USER)}")[1] == [PASSWORD_PROMPT]
    assert raw.cmd(b64(PASSWORD))[1] == [OK_LINE]
    assert len(server.runs("auth")) == 1


def test_authenticated_session_may_send(server, tls_client):
    """docs/dialogue.md "The dialogue": after 235 the session may submit, and the process program sees the user."""
    raw = tls_client()
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]
    code, lines = send_message(raw)
    assert code == 250, lines
    runs = server.runs()
    assert len(runs) == 1
    assert runs[0]["argv"][-1] == USER
    assert runs[0]["env"]["SSMTPD_USERNAME"] == USER


# --- empty responses, cancel, bad base64 ---------------------------------------

def test_plain_empty_initial_response(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: `AUTH PLAIN =` is an empty response (RFC 4954 §4): malformed, 501 5.5.2."""
    raw = tls_client()
    code, lines = raw.cmd("AUTH PLAIN =")
    assert code == 501 and lines[0].startswith("501 5.5.2"), lines
    assert server.runs("auth") == []
    # Not a failed login: the session is usable.
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]


def test_login_empty_initial_response(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: `AUTH LOGIN =` is an empty username: the password is asked, then 501 5.5.2."""
    raw = tls_client()
    assert raw.cmd("AUTH LOGIN =")[1] == [PASSWORD_PROMPT]
    code, lines = raw.cmd(b64(PASSWORD))
    assert code == 501 and lines[0].startswith("501 5.5.2"), lines
    assert server.runs("auth") == []


def test_plain_empty_line_at_prompt(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: an empty line at the PLAIN prompt is an empty response: 501, no run."""
    raw = tls_client()
    assert raw.cmd("AUTH PLAIN")[0] == 334
    code, lines = raw.cmd("")
    assert code == 501, lines
    assert server.runs("auth") == []


CANCEL_DIALOGUES = {
    "plain-prompt": ["AUTH PLAIN"],
    "login-username-prompt": ["AUTH LOGIN"],
    "login-password-prompt": ["AUTH LOGIN", b64(USER)],
    "login-initial-then-password-prompt": [f"AUTH LOGIN {b64(USER)}"],
}


@pytest.mark.parametrize("steps", list(CANCEL_DIALOGUES.values()), ids=list(CANCEL_DIALOGUES))
def test_cancel_at_prompt(server, tls_client, steps):
    """docs/dialogue.md "The dialogue" AUTH: `*` at any prompt cancels with 501; no program runs; AUTH may be retried."""
    raw = tls_client()
    for step in steps:
        assert raw.cmd(step)[0] == 334
    code, lines = raw.cmd("*")
    assert code == 501, lines
    assert server.runs("auth") == []
    # A cancel is no failed login and leaves no half-open exchange behind.
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]


BAD_BASE64 = {
    "plain-initial": ["AUTH PLAIN not*base64!"],
    "plain-initial-missing-padding": ["AUTH PLAIN YWJjZA"],
    "plain-prompt": ["AUTH PLAIN", "%%%%"],
    "login-initial": ["AUTH LOGIN a"],
    "login-username-prompt": ["AUTH LOGIN", "YW Jj"],
    "login-password-prompt": ["AUTH LOGIN", b64(USER), "c2Vj cmV0"],
    # Padding past the last quantum is not base64 either (RFC 4648 §3.3).
    "excess-padding-login-password": ["AUTH LOGIN", b64(USER), b64(PASSWORD) + "="],
    "excess-padding-login-username": ["AUTH LOGIN", b64(PASSWORD) + "=="],
    "excess-padding-plain-initial": ["AUTH PLAIN " + plain_token("alice12", PASSWORD) + "="],
}


@pytest.mark.parametrize("steps", list(BAD_BASE64.values()), ids=list(BAD_BASE64))
def test_bad_base64(server, tls_client, steps):
    """docs/dialogue.md "The dialogue" AUTH: a response that is not strict base64 gets 501 5.5.2 and runs no program."""
    raw = tls_client()
    for step in steps[:-1]:
        assert raw.cmd(step)[0] == 334
    code, lines = raw.cmd(steps[-1])
    assert lines == ["501 5.5.2 Cannot decode base64 response"]
    assert server.runs("auth") == []
    assert raw.cmd("NOOP")[0] == 250


# --- authzid, mechanisms, order ---------------------------------------------------

def test_plain_authzid_equal_to_authcid(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: a PLAIN authzid equal to the authcid is accepted (235)."""
    raw = tls_client()
    assert raw.cmd(f"AUTH PLAIN {plain_token(authzid=USER)}")[1] == [OK_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1 and runs[0]["env"]["SSMTPD_USERNAME"] == USER


def test_plain_authzid_differs(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: a PLAIN authzid other than the authcid is refused with 535."""
    raw = tls_client()
    code, lines = raw.cmd(f"AUTH PLAIN {plain_token(authzid='bob')}")
    assert code == 535 and lines[0].startswith("535 5.7.8"), lines
    # Refused means not logged in, whatever the password.
    assert raw.cmd("MAIL FROM:<a@example.org>")[1] == ["530 5.7.0 Authentication required"]


@pytest.mark.parametrize("command", ["AUTH CRAM-MD5", "AUTH DIGEST-MD5 abcd", "AUTH XOAUTH2 abcd"])
def test_unknown_mechanism(server, tls_client, command):
    """docs/dialogue.md "The dialogue" AUTH: by default only PLAIN and LOGIN are offered; another
    mechanism, a token one too, gets 504 (RFC 4954 §4)."""
    raw = tls_client()
    code, lines = raw.cmd(command)
    assert code == 504, lines
    assert server.runs("auth") == []


def test_second_auth_after_success(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: a second AUTH after success gets 503 5.5.1 and runs no program."""
    raw = tls_client()
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]
    code, lines = raw.cmd(f"AUTH PLAIN {plain_token('bob')}")
    assert code == 503 and lines[0].startswith("503 5.5.1"), lines
    assert len(server.runs("auth")) == 1


def test_auth_before_ehlo(server):
    """docs/dialogue.md "The dialogue": AUTH before EHLO gets 503 5.5.1."""
    raw = server.raw()
    try:
        assert raw.reply()[0] == 220
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert code == 503 and lines[0].startswith("503 5.5.1"), lines
        assert server.runs("auth") == []
    finally:
        raw.close()


def test_auth_before_tls(server):
    """docs/dialogue.md "The dialogue": AUTH before TLS is refused (530 5.7.0) and not advertised (RFC 4954 §4)."""
    raw = server.raw()
    try:
        assert raw.reply()[0] == 220
        code, lines = raw.cmd("EHLO client.test")
        assert code == 250
        assert not any(line[4:].startswith("AUTH") for line in lines), lines
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert lines == ["530 5.7.0 Must issue a STARTTLS command first"]
        assert server.runs("auth") == []
        raw.starttls(server.tls_context())
        code, lines = raw.cmd("EHLO client.test")
        assert any(line[4:] == "AUTH PLAIN LOGIN" for line in lines), lines
    finally:
        raw.close()


def test_auth_during_transaction(make_server):
    """docs/dialogue.md "The dialogue": AUTH during a mail transaction gets 503 5.5.1."""
    srv = make_server("--no-require-auth")
    raw = open_tls(srv)
    try:
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert code == 503 and lines[0].startswith("503 5.5.1"), lines
        assert srv.runs("auth") == []
    finally:
        raw.close()


# --- the exit table (docs/auth-program.md "The auth program") ---------------------------------------------------

@pytest.mark.parametrize("user,password,expected", [
    (USER, PASSWORD, "235 2.7.0"),
    (USER, "wrong", "535 5.7.8"),
    ("crash", PASSWORD, "535 5.7.8"),
    ("tempfail", PASSWORD, "454 4.7.0"),
    ("signal", PASSWORD, "454 4.7.0"),
])
def test_exit_table(server, tls_client, user, password, expected):
    """docs/auth-program.md "The auth program": exit 0 → 235, 75 or a signal → 454 4.7.0, any other exit → 535 5.7.8."""
    raw = tls_client()
    code, lines = raw.cmd(f"AUTH PLAIN {plain_token(user, password)}")
    assert len(lines) == 1 and lines[0].startswith(expected + " "), lines
    if expected.startswith("535"):
        assert lines == [INVALID_LINE]
    assert len(server.runs("auth")) == 1


def test_tempfail_does_not_log_in(server, tls_client):
    """docs/auth-program.md "The auth program": a 454 is no login: MAIL is still refused and AUTH may be retried."""
    raw = tls_client()
    assert raw.cmd(f"AUTH PLAIN {plain_token('tempfail', PASSWORD)}")[0] == 454
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 530
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]


def test_auth_timeout_kills_program(make_server):
    """docs/auth-program.md "The auth program": over --auth-timeout → 454 4.7.0, and the program and its child are gone."""
    # The program must start its child and record both pids before the
    # timeout: a Python start-up on a busy machine can take over a second.
    srv = make_server("--auth-timeout", "4", "--auth", AUTH_SLEEP)
    raw = open_tls(srv)
    try:
        raw.sock.settimeout(30)
        started = time.monotonic()
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        elapsed = time.monotonic() - started
        assert code == 454 and lines[0].startswith("454 4.7.0"), lines
        assert elapsed < 15, f"454 only after {elapsed:.1f}s with --auth-timeout 4"
        records = srv.runs("authpid")
        assert len(records) == 1
        pids = [records[0]["pid"], records[0]["child"]]
        assert wait_until(lambda: not any(process_alive(p) for p in pids), timeout=5), \
            f"auth program processes {pids} still running after the timeout"
        assert raw.cmd("NOOP")[0] == 250
    finally:
        raw.close()


def test_auth_program_cannot_start(make_server, tmp_path):
    """docs/auth-program.md "The auth program": an auth program that cannot start (it was fine at
    start-up, then lost its execute bit) → 454 4.7.0, the session goes on, and an ERROR
    line names it, even at --log-level warning."""
    broken = tmp_path / "broken-auth"
    broken.write_text("#!/bin/sh\nexit 0\n")
    broken.chmod(0o755)
    srv = make_server("--auth", str(broken), "--log-level", "warning")
    broken.chmod(0o644)
    raw = open_tls(srv)
    try:
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert code == 454 and lines[0].startswith("454 4.7.0"), lines
        assert raw.cmd("NOOP")[0] == 250
    finally:
        raw.close()
    assert " ERROR [" in srv.log()
    assert f"auth program {broken} could not start: Permission denied" in srv.log()


def test_auth_wrapper_whose_command_cannot_start(make_server, tmp_path):
    """docs/auth-program.md "The auth program": a wrapper exiting 127 (its command not found) is
    "cannot start": 454 4.7.0, not a failed login (535)."""
    wrapper = tmp_path / "auth-wrapper"
    wrapper.write_text("#!/bin/sh\nexec /nonexistent/auth\n")
    wrapper.chmod(0o755)
    srv = make_server("--auth", str(wrapper))
    raw = open_tls(srv)
    try:
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert code == 454 and lines[0].startswith("454 4.7.0"), lines
    finally:
        raw.close()
    assert f"auth program {wrapper} could not start: exit 127, " in srv.log()


# --- what the auth program receives -----------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_program_environment(server, tls_client, mechanism):
    """docs/auth-program.md "The auth program": SSMTPD_USERNAME/PASSWORD/MECHANISM/CLIENT_ADDR, no arguments, empty stdin."""
    raw = tls_client()
    if mechanism == "PLAIN":
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]
    else:
        assert raw.cmd(f"AUTH LOGIN {b64(USER)}")[0] == 334
        assert raw.cmd(b64(PASSWORD))[1] == [OK_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1
    run = runs[0]
    assert run["argv"] == [AUTH]
    assert run["stdin"] == ""
    env = run["env"]
    assert env["SSMTPD_USERNAME"] == USER
    assert env["SSMTPD_PASSWORD"] == PASSWORD
    assert env["SSMTPD_MECHANISM"] == mechanism
    assert env["SSMTPD_CLIENT_ADDR"] == "127.0.0.1"


def test_password_never_appears(make_server):
    """docs/auth-program.md "The auth program", docs/logging.md "Logging": the password is in no log line, no argv, not in the process program's env."""
    password = "Qx7-unusual-Pa55w0rd-Zk41"
    wrong = "Wm3-other-Pa55w0rd-Yt92"
    body_marker = "body-marker-8c1f5e"
    srv = make_server("--log-level", "debug", "--auth", AUTH_HASH, "--process", ENV_DUMP,
                      env={"TEST_PASSWORD_SHA256":
                           hashlib.sha256(password.encode()).hexdigest()})
    raw = open_tls(srv)
    try:
        assert raw.cmd(f"AUTH PLAIN {plain_token(USER, wrong)}")[0] == 535
        assert raw.cmd("AUTH LOGIN")[0] == 334
        assert raw.cmd(b64(USER))[0] == 334
        assert raw.cmd(b64(wrong))[0] == 535
        assert raw.cmd(f"AUTH PLAIN {plain_token(USER, password)}")[1] == [OK_LINE]
        code, lines = send_message(raw, f"Subject: t\r\n\r\n{body_marker}\r\n")
        assert code == 250, lines
        assert raw.cmd("QUIT")[0] == 221
    finally:
        raw.close()
    srv.wait_log("disconnected")

    secrets = {password, wrong, b64(password), b64(wrong),
               plain_token(USER, password), plain_token(USER, wrong)}
    log = srv.log()
    assert "AUTH" in log  # debug logging really was on and saw the logins
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the server log"
    assert body_marker not in log

    auth_runs = srv.runs("auth")
    assert len(auth_runs) == 3
    assert [r["env"]["SSMTPD_PASSWORD"] for r in auth_runs] == [wrong, wrong, password]
    for run in auth_runs:
        assert not any(s in arg for s in secrets for arg in run["argv"]), run["argv"]

    (delivery,) = srv.runs("envdump")
    assert body_marker in delivery["stdin"]
    exposed = list(delivery["argv"]) + [f"{k}={v}" for k, v in delivery["env"].items()]
    for secret in secrets:
        assert not any(secret in item for item in exposed), f"{secret!r} reached the program"


# --- failed logins: delay and three strikes ---------------------------------------

def test_three_failures_close(server, tls_client):
    """docs/dialogue.md "The dialogue": the third failed AUTH is answered 535, then 421 4.7.0, then the server closes."""
    raw = tls_client()
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong1')}")[1] == [INVALID_LINE]
    assert raw.cmd("AUTH LOGIN")[0] == 334
    assert raw.cmd(b64(USER))[0] == 334
    assert raw.cmd(b64("wrong2"))[1] == [INVALID_LINE]
    code, lines = raw.cmd(f"AUTH PLAIN {plain_token('crash', PASSWORD)}")
    assert lines == [INVALID_LINE]
    code, lines = raw.reply()
    assert code == 421 and lines[0].startswith("421 4.7.0"), lines
    assert raw.closed(timeout=5)
    assert len(server.runs("auth")) == 3


def test_two_failures_then_success(server, tls_client):
    """docs/dialogue.md "The dialogue": two failed AUTHs leave the connection open and a good login still works."""
    raw = tls_client()
    for _ in range(2):
        assert raw.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]
    assert raw.cmd("NOOP")[0] == 250


def test_failures_counted_per_connection(server, tls_client):
    """docs/dialogue.md "The dialogue": the three-strikes count belongs to one connection, not to the client address."""
    first = tls_client()
    for _ in range(2):
        assert first.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")[0] == 535
    second = tls_client()
    for _ in range(2):
        assert second.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")[0] == 535
    assert first.cmd("NOOP")[0] == 250
    assert second.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]


def test_failure_delay(make_server):
    """docs/dialogue.md "The dialogue": with --auth-failure-delay 1 a failed AUTH is answered no sooner than ~1 s."""
    srv = make_server("--auth-failure-delay", "1")
    raw = open_tls(srv)
    try:
        started = time.monotonic()
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")
        elapsed = time.monotonic() - started
        assert lines == [INVALID_LINE]
        assert elapsed >= 0.9, f"535 after only {elapsed:.3f}s"
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]
    finally:
        raw.close()


# --- line lengths (RFC 4954 §4: 12288 octets) ---------------------------------------

def long_plain_line(prefix: str, total: int) -> str:
    """`prefix` + spaces + a PLAIN token (wrong, long password), exactly `total` octets."""
    room = total - len(prefix)
    token_len = room - room % 4
    # Each 3 raw octets become 4 base64 characters; "\0alice\0" is 7 octets.
    password = "x" * (token_len // 4 * 3 - 2 - len(USER))
    token = plain_token(USER, password)
    assert len(token) == token_len
    line = prefix + " " * (room - token_len) + token
    assert len(line) == total
    return line


def test_auth_line_of_12288_octets(server, tls_client):
    """docs/dialogue.md "The dialogue": an AUTH command line of 12288 octets is read whole and judged (535, not 500)."""
    raw = tls_client()
    line = long_plain_line("AUTH PLAIN ", 12288)
    assert raw.cmd(line)[1] == [INVALID_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1
    assert len(runs[0]["env"]["SSMTPD_PASSWORD"]) > 9000


def test_auth_response_of_12288_octets(server, tls_client):
    """docs/dialogue.md "The dialogue": a response line of 12288 octets at the 334 prompt is accepted (535, not 500)."""
    raw = tls_client()
    assert raw.cmd("AUTH PLAIN")[0] == 334
    assert raw.cmd(long_plain_line("", 12288))[1] == [INVALID_LINE]
    assert len(server.runs("auth")) == 1


def test_auth_line_too_long(server, tls_client):
    """docs/dialogue.md "The dialogue": an AUTH line over 12288 octets gets 500 5.5.2, runs nothing, session goes on."""
    raw = tls_client()
    code, lines = raw.cmd("AUTH PLAIN " + "A" * 12278)  # 12289 octets before CRLF
    assert lines == ["500 5.5.2 Line too long"]
    assert raw.cmd("NOOP")[0] == 250
    code, lines = raw.cmd("AUTH PLAIN " + "A" * 40000)
    assert lines == ["500 5.5.2 Line too long"]
    assert raw.cmd("NOOP")[0] == 250
    assert server.runs("auth") == []
    assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]


def test_auth_response_too_long(server, tls_client):
    """docs/dialogue.md "The dialogue": a response over 12288 octets at the 334 prompt gets 500 5.5.2."""
    raw = tls_client()
    assert raw.cmd("AUTH LOGIN")[0] == 334
    code, lines = raw.cmd("A" * 20000)
    assert lines == ["500 5.5.2 Line too long"]
    assert raw.cmd("NOOP")[0] == 250
    assert server.runs("auth") == []


# --- what names and passwords may contain ------------------------------------------

ODD_NAMES = [
    "john smith",
    "a;b|c&d>e<f",
    "$(id)`id`${HOME}",
    "it's \"quoted\"",
    "back\\slash*?[x]",
    "ünïcödé-名前-🙂",
    " leading and trailing ",
]


@pytest.mark.parametrize("name", ODD_NAMES)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_odd_usernames_verbatim(server, tls_client, name, mechanism):
    """docs/auth-program.md "The auth program": shell metacharacters, spaces and Unicode reach SSMTPD_USERNAME unchanged."""
    raw = tls_client()
    if mechanism == "PLAIN":
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token(name, PASSWORD)}")
    else:
        assert raw.cmd(f"AUTH LOGIN {b64(name)}")[0] == 334
        code, lines = raw.cmd(b64(PASSWORD))
    assert lines == [OK_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1
    assert runs[0]["env"]["SSMTPD_USERNAME"] == name
    assert runs[0]["argv"] == [AUTH]


def test_shell_metacharacters_never_run(server, tls_client, tmp_path):
    """docs/configuration.md "Configuration", docs/auth-program.md "The auth program": a username is data, never shell input."""
    marker = tmp_path / "pwned"
    raw = tls_client()
    name = f"x; touch {marker}; $(touch {marker}) `touch {marker}`"
    assert raw.cmd(f"AUTH PLAIN {plain_token(name, PASSWORD)}")[1] == [OK_LINE]
    assert send_message(raw)[0] == 250
    assert not marker.exists()


BAD_NAMES = {
    "control-char": b"al\x01ice",
    "carriage-return": b"ali\rce",
    "line-feed": b"ali\nce",
    "escape": b"\x1b[31malice",
    "delete": b"alice\x7f",
    "invalid-utf8": b"\xff\xfealice",
    "overlong-utf8": b"\xc0\xafalice",
    "lone-surrogate": "a\udc80".encode("utf-8", "surrogatepass"),
    "empty": b"",
}


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_username_plain(server, tls_client, name):
    """docs/auth-program.md "The auth program": a PLAIN username with control characters or invalid UTF-8 gets 501, no run."""
    raw = tls_client()
    code, lines = raw.cmd("AUTH PLAIN " + raw_token(b"\0" + name + b"\0" + PASSWORD.encode()))
    assert code == 501, lines
    assert server.runs("auth") == []


@pytest.mark.parametrize("name", [b"al\x00ice", b"ali\nce", b"\xffalice"],
                         ids=["nul", "line-feed", "invalid-utf8"])
def test_bad_username_login(server, tls_client, name):
    """docs/auth-program.md "The auth program": a LOGIN username with NUL, control characters or invalid UTF-8 gets 501."""
    raw = tls_client()
    assert raw.cmd(f"AUTH LOGIN {raw_token(name)}")[0] == 334
    code, lines = raw.cmd(b64(PASSWORD))
    assert code == 501, lines
    assert server.runs("auth") == []


def test_plain_token_with_wrong_field_count(server, tls_client):
    """docs/dialogue.md "The dialogue" AUTH: a PLAIN token without exactly two NULs is malformed: 501."""
    raw = tls_client()
    for data in (b"alice\0secret", b"\0alice\0secret\0extra", b"alicesecret"):
        code, lines = raw.cmd("AUTH PLAIN " + raw_token(data))
        assert code == 501, (data, lines)
    assert server.runs("auth") == []


@pytest.mark.parametrize("password",
                         [b"pw\xff\xfe\x80", "pässwörd-密码".encode(), b"tab\there"],
                         ids=["latin1-bytes", "utf8", "tab"])
def test_password_octets_reach_program(server, tls_client, password):
    """docs/auth-program.md "The auth program": the password's octets, UTF-8 or not, reach SSMTPD_PASSWORD unchanged."""
    raw = tls_client()
    code, lines = raw.cmd("AUTH PLAIN " + raw_token(b"\0alice\0" + password))
    assert lines == [INVALID_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1
    # The recorder saw os.environ, which decodes with surrogateescape.
    seen = runs[0]["env"]["SSMTPD_PASSWORD"].encode("utf-8", "surrogateescape")
    assert seen == password


def test_password_octets_reach_program_login(server, tls_client):
    """docs/auth-program.md "The auth program": LOGIN passes a non-UTF-8 password unchanged too."""
    raw = tls_client()
    assert raw.cmd(f"AUTH LOGIN {b64(USER)}")[0] == 334
    assert raw.cmd(raw_token(b"\xe9t\xe9"))[1] == [INVALID_LINE]
    runs = server.runs("auth")
    assert len(runs) == 1
    assert runs[0]["env"]["SSMTPD_PASSWORD"].encode("utf-8", "surrogateescape") == b"\xe9t\xe9"


def test_password_with_nul_refused(server, tls_client):
    """docs/auth-program.md "The auth program": a LOGIN password containing NUL cannot be put in the environment: 501."""
    raw = tls_client()
    assert raw.cmd(f"AUTH LOGIN {b64(USER)}")[0] == 334
    code, lines = raw.cmd(raw_token(b"sec\0ret"))
    assert code == 501, lines
    assert server.runs("auth") == []
