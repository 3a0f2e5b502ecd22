"""OAuth 2 bearer tokens: AUTH OAUTHBEARER (RFC 7628) and XOAUTH2 (docs/auth-program.md "OAuth 2 tokens").

Raw sockets for the exact dialogue; msmtp and curl, as users set them up, for
the main paths.  The test auth program takes the token "secret", or any token
starting "good-", and refuses every other.
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import (AUTH, PASSWORD, PROGRAMS, USER, Raw, ServerProcess, b64,
                      lent_to_one_test, plain_token, shared_by_the_module, wait_until)

ENV_DUMP = os.path.join(PROGRAMS, "env-dump")
ALL = "PLAIN,LOGIN,OAUTHBEARER,XOAUTH2"
TOKEN = "secret"
# As long as tokens get: 12000 octets, 16 KB in base64 with the rest of the message.
LONG_TOKEN = "good-" + "t" * (12000 - 5)
OK_LINE = "235 2.7.0 Authentication successful"
INVALID_LINE = "535 5.7.8 Authentication credentials invalid"
MALFORMED_LINE = "501 5.5.2 Malformed authentication response"
TOO_MANY_FAILED_LOGINS = "421 4.7.0 Too many failed logins from your address, try again later"
CLIENT_TIMEOUT = 60
SENDER, RCPT = "sender@example.org", "rcpt@example.org"


def oauthbearer(user=USER, token=TOKEN, header=None) -> bytes:
    """RFC 7628 §3.1 as msmtp and Thunderbird's library send it: host and port too."""
    header = f"n,a={user}," if header is None else header
    return (f"{header}\x01host=mx.test\x01port=587\x01auth=Bearer {token}\x01\x01").encode()


def xoauth2(user=USER, token=TOKEN) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


MESSAGES = {"OAUTHBEARER": oauthbearer, "XOAUTH2": xoauth2}


def open_tls(srv, source="127.0.0.1") -> Raw:
    raw = Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                       source_address=(source, 0)))
    raw.hello(srv.tls_context())
    return raw


def token_auth(raw, mechanism: str, message: str, initial: bool):
    """AUTH with `message` as the initial response, or as the answer to an empty 334."""
    if initial:
        return raw.cmd(f"AUTH {mechanism} {message}")
    assert raw.cmd(f"AUTH {mechanism}")[1] == ["334 "]
    return raw.cmd(message)


def auth_lines(lines):
    return [line[4:] for line in lines if line[4:].startswith("AUTH")]


def error_status(line: str) -> dict:
    """The JSON of a token's error challenge (RFC 7628 §3.2.2)."""
    assert line.startswith("334 "), line
    return json.loads(base64.b64decode(line[4:], validate=True))


def token_runs(srv):
    return [r for r in srv.runs("auth") if "SSMTPD_TOKEN" in r["env"]]


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, certs):
    """One server offering every mechanism, for the module."""
    yield from shared_by_the_module(ServerProcess(str(tmp_path_factory.mktemp("oauth")), certs,
                                                  ["--auth-mechanisms", ALL]).start())


@pytest.fixture
def srv(token_server):
    yield from lent_to_one_test(token_server)


@pytest.fixture
def client(srv):
    opened = []

    def factory(server=srv, source="127.0.0.1"):
        raw = open_tls(server, source)
        opened.append(raw)
        return raw

    yield factory
    for raw in opened:
        raw.close()


# --- what is offered ------------------------------------------------------------------------

@pytest.mark.parametrize("configured, advertised", [
    ("OAUTHBEARER", "AUTH OAUTHBEARER"),
    ("xoauth2, plain", "AUTH XOAUTH2 PLAIN"),
    (ALL, "AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2"),
])
def test_ehlo_advertises_exactly_the_configured_mechanisms(make_server, configured, advertised):
    """docs/auth-program.md "OAuth 2 tokens": EHLO's AUTH line names exactly --auth-mechanisms, in its
    order, and only after STARTTLS (RFC 4954 §4, --require-tls)."""
    srv = make_server("--auth-mechanisms", configured)
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        code, lines = raw.cmd("EHLO client.test")
        assert code == 250 and auth_lines(lines) == [], lines
        raw.starttls(srv.tls_context())
        code, lines = raw.cmd("EHLO client.test")
        assert auth_lines(lines) == [advertised], lines
    finally:
        raw.close()


def test_token_mechanisms_not_offered_by_default(server):
    """docs/auth-program.md "OAuth 2 tokens": the default is PLAIN and LOGIN; a token mechanism gets
    504 5.5.4 (RFC 4954 §4) and runs no program."""
    raw = open_tls(server)
    try:
        for mechanism, message in MESSAGES.items():
            code, lines = raw.cmd(f"AUTH {mechanism} {b64(message())}")
            assert lines == ["504 5.5.4 Unrecognized authentication mechanism"], lines
            code, lines = raw.cmd(f"AUTH {mechanism}")
            assert code == 504, lines
        assert server.runs("auth") == []
    finally:
        raw.close()


def test_mechanism_not_offered_is_504(make_server):
    """docs/auth-program.md "OAuth 2 tokens": with --auth-mechanisms OAUTHBEARER, PLAIN, LOGIN and
    XOAUTH2 get 504 5.5.4 without a program run; OAUTHBEARER works."""
    srv = make_server("--auth-mechanisms", "OAUTHBEARER")
    raw = open_tls(srv)
    try:
        for line in (f"AUTH PLAIN {plain_token()}", "AUTH LOGIN", f"AUTH XOAUTH2 {b64(xoauth2())}"):
            code, lines = raw.cmd(line)
            assert lines == ["504 5.5.4 Unrecognized authentication mechanism"], (line, lines)
        assert srv.runs("auth") == []
        assert raw.cmd(f"AUTH OAUTHBEARER {b64(oauthbearer())}")[1] == [OK_LINE]
    finally:
        raw.close()


@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_token_mechanism_before_tls(srv, mechanism):
    """docs/auth-program.md "OAuth 2 tokens": token mechanisms follow --require-tls: before STARTTLS
    they are not advertised and AUTH gets 530 5.7.0, running no program."""
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        code, lines = raw.cmd("EHLO client.test")
        assert auth_lines(lines) == [], lines
        code, lines = raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism]())}")
        assert lines == ["530 5.7.0 Must issue a STARTTLS command first"]
        assert srv.runs("auth") == []
    finally:
        raw.close()


# --- successful logins -------------------------------------------------------------------

@pytest.mark.parametrize("initial", [True, False], ids=["initial", "after-334"])
@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_token_login_and_the_programs_view(srv, client, mechanism, initial):
    """docs/auth-program.md "OAuth 2 tokens": with an initial response or after an empty 334, a good
    token logs in; the auth program gets SSMTPD_MECHANISM, SSMTPD_USERNAME and
    SSMTPD_TOKEN and no SSMTPD_PASSWORD; the process program sees the user."""
    raw = client()
    message = b64(MESSAGES[mechanism]())
    code, lines = token_auth(raw, mechanism, message, initial)
    assert lines == [OK_LINE]
    (run,) = srv.runs("auth")
    assert run["argv"] == [AUTH] and run["stdin"] == ""
    env = run["env"]
    assert env["SSMTPD_MECHANISM"] == mechanism
    assert env["SSMTPD_USERNAME"] == USER
    assert env["SSMTPD_TOKEN"] == TOKEN
    assert "SSMTPD_PASSWORD" not in env
    assert raw.send_message()[0] == 250
    (delivery,) = srv.runs()
    assert delivery["env"]["SSMTPD_USERNAME"] == USER and delivery["argv"][-1] == USER
    assert "SSMTPD_TOKEN" not in delivery["env"]


def test_authzid_escapes_are_decoded(srv, client):
    """RFC 7628 §3.1 / RFC 5801 §4: `,` and `=` in the authzid come as =2C and =3D."""
    raw = client()
    message = oauthbearer(header="n,a=a=2Cb=3Dc@example.org,")
    assert raw.cmd(f"AUTH OAUTHBEARER {b64(message)}")[1] == [OK_LINE]
    (run,) = srv.runs("auth")
    assert run["env"]["SSMTPD_USERNAME"] == "a,b=c@example.org"


def test_client_that_would_bind_but_thinks_we_cannot(srv, client):
    """RFC 5801 §4: the `y` flag (client supports channel binding, thinks the server does
    not) is accepted like `n`."""
    raw = client()
    assert raw.cmd(f"AUTH OAUTHBEARER {b64(oauthbearer(header=f'y,a={USER},'))}")[1] == [OK_LINE]


@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_inherited_secrets_never_reach_the_auth_program(make_server, mechanism):
    """docs/auth-program.md "OAuth 2 tokens": SSMTPD_TOKEN and SSMTPD_PASSWORD are the server's own
    variables: copies in the server's environment never reach a program; a password
    login gets no SSMTPD_TOKEN, a token login no SSMTPD_PASSWORD."""
    srv = make_server("--auth-mechanisms", ALL,
                      env={"SSMTPD_TOKEN": "inherited-token",
                           "SSMTPD_PASSWORD": "inherited-password"})
    raw = open_tls(srv)
    try:
        assert raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism]())}")[1] == [OK_LINE]
    finally:
        raw.close()
    raw = open_tls(srv)
    try:
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[1] == [OK_LINE]
    finally:
        raw.close()
    token_run, password_run = srv.runs("auth")
    assert token_run["env"]["SSMTPD_TOKEN"] == TOKEN
    assert "SSMTPD_PASSWORD" not in token_run["env"]
    assert password_run["env"]["SSMTPD_PASSWORD"] == PASSWORD
    assert "SSMTPD_TOKEN" not in password_run["env"]


# --- rejected tokens -------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism, reply_line", [
    ("OAUTHBEARER", "AQ=="),  # RFC 7628 §3.2.3: a lone %x01
    ("XOAUTH2", ""),  # what Google documents for XOAUTH2
    ("OAUTHBEARER", "*"),  # a cancel changes nothing: the login failed
    ("XOAUTH2", "not even base64!"),
])
def test_rejected_token_gets_the_error_challenge(srv, client, mechanism, reply_line):
    """docs/auth-program.md "OAuth 2 tokens" (RFC 7628 §3.2.2): a rejected token gets 334 with the base64
    JSON status, and after whatever the client replies, 535 5.7.8; one auth_failed
    WARNING line names the mechanism and the user."""
    raw = client()
    code, lines = raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism](token='expired'))}")
    assert code == 334 and len(lines) == 1, lines
    status = error_status(lines[0])
    assert status["status"] == "invalid_token" and status["schemes"] == "bearer", status
    assert raw.cmd(reply_line)[1] == [INVALID_LINE]
    assert raw.cmd("MAIL FROM:<a@example.org>")[1] == ["530 5.7.0 Authentication required"]
    assert raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism]())}")[1] == [OK_LINE]
    assert len(srv.runs("auth")) == 2
    line = f'-: AUTH {mechanism} user="{USER}": 535, exit 1'
    assert wait_until(lambda: any(" WARNING [" in x and line in x
                                  for x in srv.log().splitlines())), srv.log()


def test_temporary_failure_has_no_challenge(srv, client):
    """docs/auth-program.md "OAuth 2 tokens": the auth program's 454 is sent directly, without the
    error challenge, and is not a failed login."""
    raw = client()
    for mechanism, message in MESSAGES.items():
        code, lines = raw.cmd(f"AUTH {mechanism} {b64(message(user='tempfail'))}")
        assert code == 454 and lines[0].startswith("454 4.7.0"), lines
    assert raw.cmd(f"AUTH XOAUTH2 {b64(xoauth2())}")[1] == [OK_LINE]


def test_three_rejected_tokens_close(srv, client):
    """docs/dialogue.md "The dialogue": the third failed login on a connection, token or not, is
    answered 535 (after its challenge), then 421 4.7.0 and close."""
    raw = client()
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")[1] == [INVALID_LINE]
    for mechanism, reply_line in (("OAUTHBEARER", "AQ=="), ("XOAUTH2", "")):
        assert raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism](token='bad'))}")[0] == 334
        code, lines = raw.cmd(reply_line)
    assert lines == [INVALID_LINE]
    code, lines = raw.reply()
    assert code == 421 and lines[0].startswith("421 4.7.0"), lines
    assert raw.closed(timeout=10)


@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_hang_up_at_the_challenge_is_a_failed_login(make_server, mechanism):
    """docs/auth-program.md "OAuth 2 tokens": the failure is counted and --auth-failure-delay taken
    before the error challenge, so a client that hangs up there (curl does, for
    XOAUTH2) has failed a login: with --max-auth-failures-per-ip 3, three such hang-ups
    make the next AUTH from the address 421 without a program run, and each left its
    auth_failed line."""
    srv = make_server("--auth-mechanisms", ALL, "--max-auth-failures-per-ip", "3",
                      "--auth-failure-delay", "1")
    bad = b64(MESSAGES[mechanism](token="revoked"))
    for attempt in range(3):
        raw = open_tls(srv)
        started = time.monotonic()
        code, lines = raw.cmd(f"AUTH {mechanism} {bad}")
        waited = time.monotonic() - started
        assert code == 334, lines
        assert error_status(lines[0])["status"] == "invalid_token"
        assert waited >= 0.9, f"the challenge came {waited:.3f}s after AUTH, before the pause"
        raw.close()
    assert len(srv.runs("auth")) == 3
    raw = open_tls(srv)
    try:
        code, lines = raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism]())}")
        assert lines == [TOO_MANY_FAILED_LOGINS]
        assert raw.closed(timeout=10)
    finally:
        raw.close()
    assert len(srv.runs("auth")) == 3
    needle = f'-: AUTH {mechanism} user="{USER}": 535, exit 1'
    assert wait_until(lambda: srv.log().count(needle) == 3), srv.log()
    assert "Traceback" not in srv.log()


# --- malformed responses -------------------------------------------------------------------

MALFORMED = {
    "oauthbearer-no-auth": b"n,a=alice,\x01host=mx.test\x01\x01",
    "oauthbearer-no-bearer": b"n,a=alice,\x01auth=secret\x01\x01",
    "oauthbearer-basic-scheme": b"n,a=alice,\x01auth=Basic c2VjcmV0\x01\x01",
    "oauthbearer-bearer-without-token": b"n,a=alice,\x01auth=Bearer \x01\x01",
    "oauthbearer-token-with-space": b"n,a=alice,\x01auth=Bearer sec ret\x01\x01",
    "oauthbearer-no-separators": b"n,a=alice,auth=Bearer secret",
    "oauthbearer-no-final-separator": b"n,a=alice,\x01auth=Bearer secret\x01",
    "oauthbearer-no-first-separator": b"n,a=alice,auth=Bearer secret\x01\x01",
    "oauthbearer-channel-binding": b"p=tls-unique,a=alice,\x01auth=Bearer secret\x01\x01",
    "oauthbearer-no-gs2-header": b"\x01auth=Bearer secret\x01\x01",
    "oauthbearer-no-authzid": b"n,,\x01auth=Bearer secret\x01\x01",
    "oauthbearer-empty-authzid": b"n,a=,\x01auth=Bearer secret\x01\x01",
    "oauthbearer-bad-escape": b"n,a=al=41ice,\x01auth=Bearer secret\x01\x01",
    "oauthbearer-bidi-authzid": "n,a=al\u202eice,\x01auth=Bearer secret\x01\x01".encode(),
    "oauthbearer-just-kvsep": b"\x01",
    "xoauth2-no-user": b"auth=Bearer secret\x01\x01",
    "xoauth2-no-auth": b"user=alice\x01\x01",
    "xoauth2-no-bearer": b"user=alice\x01auth=secret\x01\x01",
    "xoauth2-no-separators": b"user=alice auth=Bearer secret",
    "xoauth2-one-separator": b"user=alice\x01auth=Bearer secret",
    "xoauth2-bidi-user": "user=\u200ealice\x01auth=Bearer secret\x01\x01".encode(),
    "xoauth2-line-feed-user": b"user=ali\nce\x01auth=Bearer secret\x01\x01",
    "xoauth2-nul-in-token": b"user=alice\x01auth=Bearer sec\x00ret\x01\x01",
}


@pytest.mark.parametrize("initial", [True, False], ids=["initial", "after-334"])
@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_token_message(srv, client, case, initial):
    """docs/auth-program.md "OAuth 2 tokens": a response that does not parse gets 501 5.5.2, runs no
    program, is no failed login, and the session goes on."""
    mechanism = "OAUTHBEARER" if case.startswith("oauthbearer") else "XOAUTH2"
    raw = client()
    message = b64(MALFORMED[case])
    code, lines = token_auth(raw, mechanism, message, initial)
    assert lines == [MALFORMED_LINE]
    assert srv.runs("auth") == []
    assert raw.cmd("NOOP")[0] == 250
    assert raw.cmd(f"AUTH {mechanism} {b64(MESSAGES[mechanism]())}")[1] == [OK_LINE]


@pytest.mark.parametrize("mechanism", list(MESSAGES))
@pytest.mark.parametrize("response", ["c2VjcmV0=", "%%%", "="], ids=["padding", "junk", "empty"])
def test_bad_base64_token_message(srv, client, mechanism, response):
    """docs/auth-program.md "OAuth 2 tokens": bad base64 gets 501 5.5.2, an empty response (RFC 4954 §4
    `=`) is malformed: 501 5.5.2 too; no program runs."""
    raw = client()
    code, lines = raw.cmd(f"AUTH {mechanism} {response}")
    assert code == 501 and lines[0].startswith("501 5.5.2"), lines
    assert srv.runs("auth") == []


# --- line lengths -----------------------------------------------------------------------------

def token_line(line_octets: int, mechanism: str, prefix: str):
    """(line, token): `prefix`, blanks and the base64 message of a good token, exactly
    `line_octets` long."""
    blanks = " " * ((line_octets - len(prefix)) % 4)
    room = (line_octets - len(prefix) - len(blanks)) // 4 * 3
    overhead = len(MESSAGES[mechanism](token=""))
    token = "good-" + "A" * (room - overhead - len("good-"))
    line = prefix + blanks + b64(MESSAGES[mechanism](token=token))
    assert len(line) == line_octets
    return line, token


@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_token_lines_of_16384_octets(srv, client, mechanism):
    """docs/auth-program.md "OAuth 2 tokens": an AUTH line, or a response, of a token mechanism may
    be 16384 octets without its CRLF; one octet more is 500 5.5.2 with no program run."""
    line, token = token_line(16384, mechanism, f"AUTH {mechanism} ")
    raw = client()
    assert raw.cmd(line)[1] == [OK_LINE]
    (run,) = srv.runs("auth")
    assert run["env"]["SSMTPD_TOKEN"] == token
    raw = client()
    assert raw.cmd(f"AUTH {mechanism}")[0] == 334
    response, _ = token_line(16384, mechanism, "")
    assert raw.cmd(response)[1] == [OK_LINE]
    assert len(srv.runs("auth")) == 2
    srv.clear_runs()
    raw = client()
    assert raw.cmd(line.replace(" ", "  ", 1))[1] == ["500 5.5.2 Line too long"]
    assert raw.cmd(f"AUTH {mechanism}")[0] == 334
    assert raw.cmd(" " + response)[1] == ["500 5.5.2 Line too long"]
    assert raw.cmd("NOOP")[0] == 250
    assert srv.runs("auth") == []


def test_password_lines_keep_12288_octets(srv, client):
    """docs/dialogue.md "The dialogue": PLAIN and LOGIN keep 12288 octets, also on a server that
    offers token mechanisms and reads their longer lines."""
    raw = client()
    assert raw.cmd("AUTH PLAIN " + "A" * 12278)[1] == ["500 5.5.2 Line too long"]
    assert raw.cmd("AUTH LOGIN")[0] == 334
    assert raw.cmd("A" * 12289)[1] == ["500 5.5.2 Line too long"]
    assert raw.cmd("NOOP")[0] == 250
    assert srv.runs("auth") == []


def xoauth2_authobject(user, token):
    return lambda challenge=None: (f"user={user}\x01auth=Bearer {token}\x01\x01"
                                   if challenge is None else "")


def test_12_kb_token_with_smtplib(srv):
    """docs/auth-program.md "OAuth 2 tokens": a 12000-octet token (its base64 well above PLAIN's whole
    line) logs in through smtplib's AUTH with an initial response, and the message is
    delivered."""
    token = LONG_TOKEN
    with srv.smtp(timeout=30) as s:
        s.ehlo()
        s.starttls(context=srv.tls_context())
        s.ehlo()
        assert "XOAUTH2" in s.esmtp_features["auth"].split()
        code, text = s.auth("XOAUTH2", xoauth2_authobject(USER, token))
        assert code == 235, text
        s.sendmail(SENDER, [RCPT], b"Subject: big token\r\n\r\nhello\r\n")
    (run,) = srv.runs("auth")
    assert run["env"]["SSMTPD_TOKEN"] == token
    assert len(srv.runs()) == 1


# --- secrecy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["text", "json"])
def test_token_never_appears(make_server, log_format):
    """docs/auth-program.md "OAuth 2 tokens", docs/logging.md "Logging": a token, good or rejected, is in no log line
    (at debug, in either format, plain or in base64) and never reaches the process
    program, whose whole environment and argv are looked at."""
    good = "good-Zq8-unusual-T0ken-Xv31"
    bad = "Rk2-rejected-T0ken-Hs07"
    srv = make_server("--auth-mechanisms", ALL, "--log-level", "debug",
                      "--log-format", log_format, "--process", ENV_DUMP)
    raw = open_tls(srv)
    try:
        assert raw.cmd(f"AUTH OAUTHBEARER {b64(oauthbearer(token=bad))}")[0] == 334
        assert raw.cmd("AQ==")[0] == 535
        assert raw.cmd("AUTH XOAUTH2")[0] == 334
        assert raw.cmd(b64(xoauth2(token=bad)))[0] == 334
        assert raw.cmd("")[0] == 535
        assert raw.cmd(f"AUTH XOAUTH2 {b64(xoauth2(token=good))}")[1] == [OK_LINE]
        assert raw.send_message()[0] == 250
        assert raw.cmd("QUIT")[0] == 221
    finally:
        raw.close()
    srv.wait_log("disconnected")
    secrets = {good, bad, b64(good), b64(bad), b64(xoauth2(token=good)),
               b64(xoauth2(token=bad)), b64(oauthbearer(token=bad)),
               hashlib.sha256(good.encode()).hexdigest()}
    log = srv.log()
    assert "XOAUTH2" in log and "OAUTHBEARER" in log
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the server log"
    assert [r["env"]["SSMTPD_TOKEN"] for r in srv.runs("auth")] == [bad, bad, good]
    for run in srv.runs("auth"):
        assert not any(s in arg for s in secrets for arg in run["argv"])
    (delivery,) = srv.runs("envdump")
    exposed = list(delivery["argv"]) + [f"{k}={v}" for k, v in delivery["env"].items()]
    for secret in secrets:
        assert not any(secret in item for item in exposed), f"{secret!r} reached the program"


# --- real clients ------------------------------------------------------------------------------

def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed (.ci/run installs it)")
    return path


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=CLIENT_TIMEOUT, **kwargs)


def text(result) -> str:
    """The client's transcript, long lines (a 12 KB token) cut for failure messages."""
    lines = result.stdout.decode("utf-8", "replace").splitlines()
    return "\n".join(line if len(line) < 300 else line[:300] + "..." for line in lines)


def assert_token_login_delivered(srv, mechanism, token=TOKEN):
    (login,) = srv.runs("auth")
    env = login["env"]
    assert env["SSMTPD_MECHANISM"] == mechanism
    assert env["SSMTPD_USERNAME"] == USER
    assert env["SSMTPD_TOKEN"] == token
    assert "SSMTPD_PASSWORD" not in env
    (delivery,) = srv.runs()
    assert delivery["argv"][-1] == USER
    assert delivery["env"]["SSMTPD_TLS"] in ("TLSv1.2", "TLSv1.3")
    assert "SSMTPD_TOKEN" not in delivery["env"]
    return delivery


def write_msmtprc(srv, tmp_path, token_file) -> str:
    """msmtp as docs/auth-program.md "Clients" sets it up: `auth oauthbearer` or `auth xoauth2`, the token
    from `passwordeval`."""
    rc = f"""\
defaults
tls on
tls_starttls on
tls_certcheck on
tls_trust_file {srv.ca}
domain client.test
from {SENDER}
host 127.0.0.1
port {srv.port}
user {USER}
passwordeval cat {token_file}

account oauthbearer
auth oauthbearer

account xoauth2
auth xoauth2
"""
    path = str(tmp_path / "msmtprc")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(rc)
    return path


def msmtp(rc_path, account):
    message = f"From: {SENDER}\nTo: {RCPT}\nSubject: msmtp {account}\n\nhello\n"
    return run([need("msmtp"), "-C", rc_path, "-a", account, RCPT],
               input=message.encode(), stdin=None)


@pytest.mark.parametrize("account", ["oauthbearer", "xoauth2"])
def test_msmtp_token_login(srv, tmp_path, account):
    """docs/auth-program.md "OAuth 2 tokens": msmtp with `auth oauthbearer` / `auth xoauth2` and the
    token from `passwordeval` logs in and submits.  (msmtp sends no command over 4094
    characters: the long tokens are curl's and smtplib's tests.)"""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = msmtp(write_msmtprc(srv, tmp_path, token_file), account)
    assert result.returncode == 0, text(result)
    delivery = assert_token_login_delivered(srv, account.upper())
    assert f"Subject: msmtp {account}" in delivery["stdin"]


@pytest.mark.parametrize("account", ["oauthbearer", "xoauth2"])
def test_msmtp_rejected_token(srv, tmp_path, account):
    """docs/auth-program.md "OAuth 2 tokens": msmtp answers the error challenge and hears 535 5.7.8;
    nothing is delivered."""
    token_file = tmp_path / "token"
    token_file.write_text("expired-token\n")
    result = msmtp(write_msmtprc(srv, tmp_path, token_file), account)
    assert result.returncode != 0, text(result)
    assert "535 5.7.8" in text(result), text(result)
    assert srv.runs() == [] and len(srv.runs("auth")) == 1


def curl(srv, message_path, token, *args):
    return run([need("curl"), "-sS", "-v", "--ssl-reqd", "--cacert", srv.ca,
                "--mail-from", SENDER, "--mail-rcpt", RCPT, "-T", message_path,
                "--user", f"{USER}:", "--oauth2-bearer", token, *args,
                f"smtp://127.0.0.1:{srv.port}/client.test"])


@pytest.fixture
def curl_message(tmp_path):
    path = tmp_path / "message.txt"
    path.write_bytes(f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: curl\r\n\r\nhello\r\n".encode())
    return str(path)


@pytest.mark.parametrize("token", [TOKEN, LONG_TOKEN], ids=["short", "12KB"])
@pytest.mark.parametrize("initial", [False, True], ids=["after-334", "sasl-ir"])
@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_curl_oauth2_bearer(make_server, curl_message, mechanism, initial, token):
    """docs/auth-program.md "OAuth 2 tokens": `curl --oauth2-bearer` against a server that offers only
    OAUTHBEARER, then only XOAUTH2, logs in with it (a 12000-octet token too, with or
    without an initial response) and submits."""
    srv = make_server("--auth-mechanisms", mechanism)
    result = curl(srv, curl_message, token, *(["--sasl-ir"] if initial else []))
    assert result.returncode == 0, text(result)
    sent = [line.rstrip("\r") for line in text(result).splitlines()
            if line.startswith(f"> AUTH {mechanism}")]
    # curl sends an initial response only in an AUTH line of 512 octets at most.
    assert len(sent) == 1, text(result)
    assert (sent[0] != f"> AUTH {mechanism}") == (initial and token == TOKEN), text(result)
    assert_token_login_delivered(srv, mechanism, token)


@pytest.mark.parametrize("mechanism", list(MESSAGES))
def test_curl_rejected_token_counts_as_failed_login(make_server, curl_message, mechanism):
    """docs/auth-program.md "OAuth 2 tokens": curl with a rejected token fails (it hangs up at XOAUTH2's
    challenge), and each attempt is a failed login: with --max-auth-failures-per-ip 2 the
    third attempt hears 421 without a program run."""
    srv = make_server("--auth-mechanisms", mechanism, "--max-auth-failures-per-ip", "2")
    for attempt in range(2):
        result = curl(srv, curl_message, "revoked-token")
        assert result.returncode != 0, text(result)
        assert "334 " in text(result), text(result)
    assert wait_until(lambda: srv.log().count(f"AUTH {mechanism} user=") == 2), srv.log()
    result = curl(srv, curl_message, TOKEN)
    assert result.returncode != 0, text(result)
    assert TOO_MANY_FAILED_LOGINS in text(result), text(result)
    assert len(srv.runs("auth")) == 2 and srv.runs() == []
