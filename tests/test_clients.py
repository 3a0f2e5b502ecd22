"""Real mail clients end to end: swaks, msmtp, curl and openssl s_client.

Each client verifies the server's certificate against the test CA, logs in
and submits; the test then looks at what the process program received.  A
client that is not installed skips its tests (CI installs all of them).
"""

import os
import shutil
import subprocess

import pytest

from conftest import (ServerProcess, free_port, lent_to_one_test, make_certs, plain_token,
                      shared_by_the_module, wait_for_port)
from ssmtpd import replies

SENDER = "sender@example.org"
RCPT = "rcpt@example.org"
CLIENT_TIMEOUT = 60


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (.ci/run installs it)")
    return path


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=CLIENT_TIMEOUT, **kwargs)


def output(result) -> str:
    return result.stdout.decode("utf-8", "replace")


def head(reply: replies.Reply) -> str:
    return f"{reply.code} {reply.enhanced}"


@pytest.fixture(scope="module")
def clients_server(tmp_path_factory, certs):
    """One server for the module, with an implicit-TLS port beside the STARTTLS one."""
    smtps_port = free_port()
    srv = ServerProcess(str(tmp_path_factory.mktemp("clients")), certs,
                        ["--smtps-port", str(smtps_port)]).start()
    wait_for_port(smtps_port, proc=srv.proc)
    srv.smtps_port = smtps_port
    yield from shared_by_the_module(srv)


@pytest.fixture
def srv(clients_server):
    yield from lent_to_one_test(clients_server)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA that did not sign the server's certificate."""
    return make_certs(str(tmp_path_factory.mktemp("other-ca")), serial_cn="stranger")[0]


def only_run(srv):
    runs = srv.runs()
    assert len(runs) == 1, runs
    return runs[0]


def assert_delivered(srv, *, user="alice", sender=SENDER, rcpts=(RCPT,), text=None):
    record = only_run(srv)
    env = record["env"]
    assert record["argv"][-1] == user
    assert env["SSMTPD_USERNAME"] == user
    assert env["SSMTPD_MAIL_FROM"] == sender
    assert env["SSMTPD_RCPT_TO"] == "\n".join(rcpts)
    assert env["SSMTPD_TLS"] in ("TLSv1.2", "TLSv1.3")
    assert record["stdin"].startswith("Received: ")
    if text is not None:
        assert text in record["stdin"], record["stdin"]
    return record


# --- swaks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swaks_verify_args(clients_server):
    """Certificate verification options, when this swaks has them."""
    swaks = need("swaks")
    help_text = output(run([swaks, "--help"]))
    if "--tls-verify" in help_text and "--tls-ca-path" in help_text:
        return ["--tls-verify", "--tls-ca-path", clients_server.ca]
    return []


def swaks(srv, *args, port=None, verify=()):
    return run([need("swaks"), "--server", f"127.0.0.1:{port or srv.port}",
                "--helo", "client.test", "--from", SENDER, "--to", RCPT,
                "--header", "Subject: swaks test", "--body", "hello from swaks",
                *verify, *args])


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls_auth(srv, swaks_verify_args, mechanism):
    """docs/dialogue.md "The dialogue" AUTH PLAIN/LOGIN over STARTTLS, §4 the process program's view."""
    result = swaks(srv, "--tls", "--auth", mechanism, "--auth-user", "alice",
                   "--auth-password", "secret", verify=swaks_verify_args)
    assert result.returncode == 0, output(result)
    record = assert_delivered(srv, text="Subject: swaks test")
    assert "hello from swaks" in record["stdin"]
    assert record["env"]["SSMTPD_HELO"] == "client.test"
    auths = srv.runs("auth")
    assert len(auths) == 1 and auths[0]["env"]["SSMTPD_MECHANISM"] == mechanism


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_bad_password(srv, swaks_verify_args, mechanism):
    """docs/auth-program.md "The auth program": a wrong password is 535 5.7.8; swaks fails at AUTH; nothing is processed."""
    result = swaks(srv, "--tls", "--auth", mechanism, "--auth-user", "alice",
                   "--auth-password", "wrong", verify=swaks_verify_args)
    assert result.returncode == 28, output(result)  # swaks: authentication failed
    assert head(replies.BAD_CREDENTIALS) in output(result)
    assert srv.runs() == []
    assert len(srv.runs("auth")) == 1


def test_swaks_rejects_unknown_ca(srv, other_ca):
    """docs/configuration.md "Configuration": the server presents the configured certificate, not something else."""
    swaks_path = need("swaks")
    if "--tls-verify" not in output(run([swaks_path, "--help"])):
        pytest.skip("this swaks cannot verify certificates")
    result = swaks(srv, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                   "--auth-password", "secret",
                   verify=["--tls-verify", "--tls-ca-path", other_ca])
    assert result.returncode == 29, output(result)  # swaks: TLS failed
    assert srv.runs("auth") == [] and srv.runs() == []


# (protocol, port kind, authenticate, expected exit, text in the transcript)
SWAKS_PROTOCOLS = [
    ("ESMTPSA", "plain", True, 0, head(replies.ACCEPTED)),
    ("SSMTPA", "smtps", True, 0, head(replies.ACCEPTED)),
    ("ESMTPS", "plain", False, 23, head(replies.AUTH_REQUIRED)),
    ("SSMTP", "smtps", False, 23, head(replies.AUTH_REQUIRED)),
    ("ESMTP", "plain", False, 23, head(replies.MUST_STARTTLS)),
    ("SMTP", "plain", False, 23, head(replies.MUST_STARTTLS)),
]


@pytest.mark.parametrize("protocol, port, authenticate, status, text", SWAKS_PROTOCOLS,
                         ids=[p[0] for p in SWAKS_PROTOCOLS])
def test_swaks_protocols(srv, swaks_verify_args, protocol, port, authenticate, status, text):
    """docs/configuration.md "Configuration" --smtps-port, §5 530 before TLS / before AUTH: swaks --protocol variants."""
    args = ["--protocol", protocol]
    if authenticate:
        args += ["--auth-user", "alice", "--auth-password", "secret"]
    result = swaks(srv, *args, port=srv.smtps_port if port == "smtps" else srv.port,
                   verify=swaks_verify_args)
    assert result.returncode == status, output(result)  # swaks 23: MAIL FROM refused
    assert text in output(result)
    if status == 0:
        assert_delivered(srv, text="hello from swaks")
    else:
        assert srv.runs() == []


def test_swaks_tls_1_1_refused(srv):
    """docs/dialogue.md "The dialogue": TLS 1.2 and newer only, seen from swaks."""
    result = swaks(srv, "--tls", "--tls-protocol", "tlsv1_1", "--auth-user", "alice",
                   "--auth-password", "secret")
    text = output(result)
    if "no protocols available" in text:
        pytest.skip(f"this swaks/OpenSSL cannot offer TLS 1.1:\n{text[-1000:]}")
    assert result.returncode == 29, text
    assert "alert protocol version" in text, text
    assert srv.runs("auth") == [] and srv.runs() == []


# --- msmtp ----------------------------------------------------------------------------

MSMTP_MESSAGE = (f"From: {SENDER}\nTo: {RCPT}\nSubject: msmtp test\n\n"
                 "hello from msmtp\n.leading dot survives\n")


@pytest.fixture
def msmtprc(srv, other_ca, tmp_path):
    """An msmtp configuration with one account per case; 0600 as msmtp insists."""
    text = f"""\
defaults
tls on
tls_starttls on
tls_certcheck on
tls_trust_file {srv.ca}
domain client.test
from {SENDER}
host 127.0.0.1
port {srv.port}
user alice
password secret

account plain
auth plain

account login
auth login

account badpass : plain
password wrong

account wrongca : plain
tls_trust_file {other_ca}

account smtps : plain
port {srv.smtps_port}
tls_starttls off
"""
    path = str(tmp_path / "msmtprc")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def msmtp(rc_path, account):
    return run([need("msmtp"), "-C", rc_path, "-a", account, RCPT],
               input=MSMTP_MESSAGE.encode(), stdin=None)


@pytest.mark.parametrize("account", ["plain", "login", "smtps"])
def test_msmtp_delivers(srv, msmtprc, account):
    """docs/dialogue.md "The dialogue" AUTH over STARTTLS and on the smtps port, §4 CRLF message on stdin."""
    result = msmtp(msmtprc, account)
    assert result.returncode == 0, output(result)
    record = assert_delivered(srv, text="\r\nSubject: msmtp test\r\n")
    # msmtp dot-stuffs; the server un-stuffs (RFC 5321 §4.5.2).
    assert record["stdin"].endswith("hello from msmtp\r\n.leading dot survives\r\n")
    assert record["env"]["SSMTPD_HELO"] == "client.test"


def test_msmtp_bad_password(srv, msmtprc):
    """docs/auth-program.md "The auth program": a wrong password fails the submission and nothing is processed."""
    result = msmtp(msmtprc, "badpass")
    assert result.returncode != 0, output(result)
    assert head(replies.BAD_CREDENTIALS) in output(result)
    assert srv.runs() == []


def test_msmtp_wrong_ca(srv, msmtprc):
    """docs/configuration.md "Configuration": tls_certcheck with a CA that did not sign the server's certificate fails."""
    result = msmtp(msmtprc, "wrongca")
    assert result.returncode != 0, output(result)
    assert "certificate" in output(result).lower()
    assert srv.runs("auth") == [] and srv.runs() == []


# --- curl -------------------------------------------------------------------------------

CURL_MESSAGE = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: curl test\r\n\r\n"
                "hello from curl\r\n")


@pytest.fixture
def message_file(tmp_path):
    path = tmp_path / "message.txt"
    path.write_bytes(CURL_MESSAGE.encode())
    return str(path)


def curl(srv, url, message, *args, user="alice:secret", rcpts=(RCPT,)):
    argv = [need("curl"), "-sS", "--cacert", srv.ca, "--mail-from", SENDER,
            "--user", user, "-T", message]
    for rcpt in rcpts:
        argv += ["--mail-rcpt", rcpt]
    return run(argv + [*args, url])


CURL_URLS = ["smtp-ip", "smtp-name", "smtps-name"]


@pytest.mark.parametrize("target", CURL_URLS)
def test_curl_delivers(srv, message_file, target):
    """docs/dialogue.md "The dialogue" STARTTLS (--ssl-reqd) and §2 --smtps-port, with curl checking the name."""
    rcpts = (RCPT, "second@example.org")
    if target == "smtp-ip":
        args, url = ["--ssl-reqd"], f"smtp://127.0.0.1:{srv.port}/client.test"
    elif target == "smtp-name":
        args = ["--ssl-reqd", "--resolve", f"mx.test:{srv.port}:127.0.0.1"]
        url = f"smtp://mx.test:{srv.port}/client.test"
    else:
        args = ["--resolve", f"mx.test:{srv.smtps_port}:127.0.0.1"]
        url = f"smtps://mx.test:{srv.smtps_port}/client.test"
    result = curl(srv, url, message_file, *args, rcpts=rcpts)
    assert result.returncode == 0, output(result)
    record = assert_delivered(srv, rcpts=rcpts)
    assert record["stdin"].endswith(CURL_MESSAGE)
    assert record["env"]["SSMTPD_HELO"] == "client.test"


def test_curl_bad_password(srv, message_file):
    """docs/auth-program.md "The auth program": curl reports the 535 as "login denied" (exit 67); nothing is processed."""
    result = curl(srv, f"smtp://127.0.0.1:{srv.port}", message_file, "--ssl-reqd",
                  user="alice:wrong")
    assert result.returncode == 67, output(result)
    assert srv.runs() == []


def test_curl_bare_lf_message_refused(srv, tmp_path):
    """docs/dialogue.md "The dialogue": curl sends a file as it is; bare LF line ends get 554 5.6.0 and no run."""
    path = tmp_path / "lf.txt"
    path.write_bytes(CURL_MESSAGE.replace("\r\n", "\n").encode())
    result = curl(srv, f"smtp://127.0.0.1:{srv.port}", str(path), "--ssl-reqd", "-v")
    assert result.returncode == 8, output(result)  # curl: weird server reply
    assert head(replies.BARE_LINE_ENDING) in output(result)
    assert srv.runs() == []
    # The same file with --crlf is a proper message.
    result = curl(srv, f"smtp://127.0.0.1:{srv.port}", str(path), "--ssl-reqd", "--crlf")
    assert result.returncode == 0, output(result)
    assert only_run(srv)["stdin"].endswith(CURL_MESSAGE)


def test_curl_tls_1_1_refused(srv, message_file):
    """docs/dialogue.md "The dialogue": TLS 1.2 and newer only, seen from curl."""
    result = curl(srv, f"smtp://127.0.0.1:{srv.port}", message_file, "--ssl-reqd",
                  "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0")
    text = output(result)
    if "no protocols available" in text or "not supported" in text.lower():
        pytest.skip(f"this curl cannot offer TLS 1.1:\n{text}")
    assert result.returncode == 35, text  # curl: TLS handshake failed
    assert "alert protocol version" in text, text
    assert srv.runs("auth") == [] and srv.runs() == []


# --- openssl s_client ---------------------------------------------------------------------


def s_client_script() -> bytes:
    """A whole submission typed into s_client; -crlf turns the LFs into CRLFs."""
    return "\n".join([
        "EHLO client.test",
        f"AUTH PLAIN {plain_token()}",
        f"MAIL FROM:<{SENDER}>",
        f"RCPT TO:<{RCPT}>",
        "DATA",
        "Subject: s_client test",
        "",
        "hello from s_client",
        "..dot-stuffed line",
        ".",
        "QUIT",
        "",
    ]).encode()


def s_client(srv, mode, *args):
    if mode == "starttls":
        target = ["-starttls", "smtp", "-connect", f"127.0.0.1:{srv.port}"]
    else:
        target = ["-connect", f"127.0.0.1:{srv.smtps_port}"]
    # -quiet implies -ign_eof: s_client keeps reading until the server closes.
    return run([need("openssl"), "s_client", *target, "-CAfile", srv.ca,
                "-verify_return_error", "-quiet", "-crlf", *args],
               input=s_client_script())


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_openssl_s_client_submission(srv, mode):
    """docs/dialogue.md "The dialogue": a pipelined submission typed into openssl s_client is delivered."""
    result = s_client(srv, mode)
    text = output(result)
    assert f"\n{head(replies.ACCEPTED)} " in text, text
    assert f"\n{head(replies.BYE)} " in text, text
    record = assert_delivered(srv, text="Subject: s_client test")
    assert record["stdin"].endswith("hello from s_client\r\n.dot-stuffed line\r\n")


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_openssl_s_client_clean_tls_close(srv, mode):
    """RFC 5246 §7.2.1: after QUIT the server ends TLS with close_notify, so s_client exits 0."""
    result = s_client(srv, mode)
    assert result.returncode == 0, output(result)
    assert "unexpected eof" not in output(result), output(result)
    assert len(srv.runs()) == 1


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_openssl_s_client_tls_1_1_refused(srv, mode):
    """docs/dialogue.md "The dialogue": TLS 1.2 and newer only: openssl s_client -tls1_1 fails the handshake."""
    result = s_client(srv, mode, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    text = output(result)
    if "no protocols available" in text or "unknown option" in text.lower():
        pytest.skip(f"this openssl cannot offer TLS 1.1:\n{text[-1000:]}")
    assert result.returncode != 0, text
    assert "alert protocol version" in text, text
    assert srv.runs("auth") == [] and srv.runs() == []
