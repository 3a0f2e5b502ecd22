"""TLS: STARTTLS, the injection guard, the implicit-TLS port, certificates and SIGHUP.

Every test speaks real TLS to a real server; the client side verifies the
server's certificate against the test CA unless the test is about a
certificate nobody can verify.
"""

import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import warnings

import pytest

from conftest import (HOSTNAME, Raw, client_context, free_port, make_certs, plain_token,
                      two_certificates, wait_for_port, wait_until)
from ssmtpd import replies

MESSAGE = b"Subject: tls test\r\n\r\nhello over TLS\r\n"


def reply_head(reply: replies.Reply) -> str:
    """The start of the wire form, e.g. '503 5.5.1'."""
    return f"{reply.code} {reply.enhanced}"


def submit(raw: Raw, sender="a@example.org", rcpt="b@example.org", body=MESSAGE):
    """MAIL, RCPT, DATA and the body on an authenticated session; the final reply."""
    return raw.send_message(body, sender, (rcpt,))


def keywords(lines) -> list:
    """EHLO keywords from the reply lines, without the greeting line."""
    return [line[4:] for line in lines[1:]]


def peer_cn(sock) -> str:
    subject = dict(item for rdn in sock.getpeercert()["subject"] for item in rdn)
    return subject["commonName"]


def old_tls_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers nothing newer than `version`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated on purpose
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = version
        # OpenSSL 3 only offers TLS 1.0/1.1 at security level 0.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this Python/OpenSSL cannot configure a {version.name} client: {e}")
    return ctx


def assert_refused_old_version(handshake) -> None:
    """`handshake()` must fail because the server refused the protocol version.

    A client library that cannot offer the old version at all fails with
    NO_PROTOCOLS_AVAILABLE before anything is sent; that proves nothing about
    the server, so the test is skipped then.
    """
    with pytest.raises(ssl.SSLError) as info:
        handshake()
    reason = info.value.reason or ""
    if reason in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE"):
        pytest.skip(f"local OpenSSL refuses to offer the old protocol: {info.value}")
    assert reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"), info.value


def log_count(srv, needle: str) -> int:
    return srv.log().count(needle)


def wait_log_count(srv, needle: str, count: int, timeout: float = 10.0) -> None:
    if not wait_until(lambda: log_count(srv, needle) >= count, timeout):
        raise AssertionError(f"{needle!r} not logged {count} times:\n{srv.log()}")


# --- STARTTLS and protocol versions -------------------------------------------------


@pytest.mark.parametrize("maximum, expected", [
    (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    (ssl.TLSVersion.MAXIMUM_SUPPORTED, "TLSv1.3"),
], ids=["TLSv1.2", "newest"])
def test_starttls_verified_and_version_recorded(server, maximum, expected):
    """docs/dialogue.md "The dialogue" TLS 1.2 and newer; §4 SSMTPD_TLS carries the negotiated version."""
    ctx = client_context(server.ca)  # verifies the chain and 127.0.0.1 against the SAN
    ctx.maximum_version = maximum
    with server.smtp() as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert not s.has_extn("auth")  # RFC 4954 §4: not before TLS with --require-tls
        s.starttls(context=ctx)
        assert s.sock.version() == expected
        s.ehlo()
        assert not s.has_extn("starttls")
        assert s.has_extn("auth")
        s.login("alice", "secret")
        s.sendmail("a@example.org", ["b@example.org"], MESSAGE)
    runs = server.runs()
    assert len(runs) == 1
    assert runs[0]["env"]["SSMTPD_TLS"] == expected


def test_large_records_arrive_whole(server):
    """A ClientHello of some 6 KiB completes the handshake, and a message of many
    full-size TLS records reaches the program octet for octet."""
    ctx = server.tls_context()
    # Protocol names the server ignores, only to make the ClientHello some 6 KiB.
    ctx.set_alpn_protocols([f"x-{i:03d}-" + "p" * 40 for i in range(130)])
    lines = b"".join(b"%06d " % i + b"z" * 70 + b"\r\n" for i in range(13000))  # ~1 MiB
    body = b"Subject: big over TLS\r\n\r\n" + lines
    raw = server.raw()
    try:
        raw.login(ctx)
        code, text = raw.send_message(body)
        assert code == 250, text
    finally:
        raw.close()
    runs = server.runs()
    assert len(runs) == 1
    delivered = runs[0]["stdin"].encode("latin-1")
    assert delivered.endswith(body), (len(delivered), len(body))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1],
                         ids=["TLSv1.1", "TLSv1.0"])
def test_starttls_refuses_tls_below_1_2(server, version):
    """docs/dialogue.md "The dialogue": TLS 1.2 and newer only; a 1.1 or 1.0 client fails the handshake."""
    ctx = old_tls_context(version)
    raw = server.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        assert raw.cmd("STARTTLS")[0] == 220
        assert_refused_old_version(lambda: ctx.wrap_socket(raw.sock, server_hostname=HOSTNAME))
    finally:
        raw.close()
    assert server.runs("auth") == [] and server.runs() == []


def test_second_starttls_refused(server):
    """docs/dialogue.md "The dialogue": STARTTLS is offered before TLS only; once up it is 503."""
    raw = server.raw()
    try:
        raw.login(client_context(server.ca))
        code, lines = raw.cmd("STARTTLS")
        assert lines[-1].startswith(reply_head(replies.TLS_ACTIVE))
    finally:
        raw.close()


# --- STARTTLS command injection (CVE-2011-0411) ---------------------------------------

INJECTIONS = {
    "mail": b"MAIL FROM:<evil@example.net>\r\n",
    "rset-auth": b"RSET\r\nAUTH PLAIN " + plain_token().encode() + b"\r\n",
    "whole-session": (b"EHLO evil.test\r\nAUTH PLAIN " + plain_token().encode() + b"\r\n"
                      b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.net>\r\n"),
}


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_starttls_discards_pipelined_plaintext(server, name):
    """docs/dialogue.md "The dialogue": bytes sent after STARTTLS in the same read are discarded, never executed."""
    payload = INJECTIONS[name]
    raw = server.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.send(b"STARTTLS\r\n" + payload)  # one write: one segment on loopback
        code, lines = raw.reply()
        assert code == 220, lines
        # A plaintext answer to an injected command would sit here (or break the handshake).
        assert raw.buf == b""
        raw.sock = client_context(server.ca).wrap_socket(raw.sock, server_hostname=HOSTNAME)
        # The first reply inside TLS must answer our EHLO, not an injected command.
        code, lines = raw.cmd("EHLO client.test")
        assert code == 250 and lines[0] == f"250-{HOSTNAME} greets client.test", lines
        # An injected AUTH would make this MAIL pass; an injected MAIL would make it 503.
        code, lines = raw.cmd("MAIL FROM:<good@example.org>")
        assert lines[-1].startswith(reply_head(replies.AUTH_REQUIRED)), lines
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
        code, lines = submit(raw, sender="good@example.org")
        assert code == 250, lines
        assert raw.cmd("QUIT")[0] == 221
    finally:
        raw.close()
    runs = server.runs()
    assert len(runs) == 1
    assert runs[0]["env"]["SSMTPD_MAIL_FROM"] == "good@example.org"
    assert runs[0]["env"]["SSMTPD_RCPT_TO"] == "b@example.org"
    assert runs[0]["env"]["SSMTPD_HELO"] == "client.test"
    assert len(server.runs("auth")) == 1  # ours only
    server.wait_log(f"discarded {len(payload)} octets")


def test_starttls_forgets_helo(server):
    """docs/dialogue.md "The dialogue" / RFC 3207 §4.2: after STARTTLS the client must EHLO again."""
    raw = server.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(client_context(server.ca))
        code, lines = raw.cmd("MAIL FROM:<a@example.org>")
        assert lines[-1].startswith(reply_head(replies.NO_HELO)), lines
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert lines[-1].startswith(reply_head(replies.NO_HELO)), lines
        code, lines = raw.cmd("EHLO client.test")
        assert code == 250
        assert "STARTTLS" not in keywords(lines) and "AUTH PLAIN LOGIN" in keywords(lines)
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
    finally:
        raw.close()


def test_starttls_forgets_authentication(make_server):
    """docs/dialogue.md "The dialogue" / RFC 3207 §4.2: an AUTH done in the clear does not survive STARTTLS."""
    srv = make_server("--no-require-tls")
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        code, lines = raw.cmd("EHLO client.test")
        assert "STARTTLS" in keywords(lines) and "AUTH PLAIN LOGIN" in keywords(lines)
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
        raw.starttls(client_context(srv.ca))
        assert raw.cmd("EHLO client.test")[0] == 250
        code, lines = raw.cmd("MAIL FROM:<a@example.org>")
        assert lines[-1].startswith(reply_head(replies.AUTH_REQUIRED)), lines
        # Not "503 already authenticated": the user really was forgotten.
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
        code, lines = submit(raw)
        assert code == 250, lines
    finally:
        raw.close()
    runs = srv.runs()
    assert len(runs) == 1 and runs[0]["env"]["SSMTPD_TLS"].startswith("TLSv1.")


# --- implicit TLS (RFC 8314) -------------------------------------------------------------


@pytest.fixture
def smtps_server(make_server):
    port = free_port()
    srv = make_server("--smtps-port", str(port))
    wait_for_port(port, proc=srv.proc)
    srv.smtps_port = port
    return srv


def test_smtps_port_end_to_end(smtps_server):
    """docs/configuration.md "Configuration" --smtps-port: implicit TLS; no STARTTLS offered; SSMTPD_TLS set."""
    srv = smtps_server
    with smtplib.SMTP_SSL("127.0.0.1", srv.smtps_port, local_hostname="client.test",
                          context=client_context(srv.ca), timeout=10) as s:
        code, _ = s.ehlo()
        assert code == 250
        assert not s.has_extn("starttls")
        assert "PLAIN" in s.esmtp_features["auth"].split()
        code, text = s.docmd("STARTTLS")
        assert code == replies.TLS_ACTIVE.code
        s.login("alice", "secret")
        s.sendmail("a@example.org", ["b@example.org"], MESSAGE)
    runs = srv.runs()
    assert len(runs) == 1
    assert runs[0]["argv"][-1] == "alice"
    assert runs[0]["env"]["SSMTPD_TLS"].startswith("TLSv1.")
    assert runs[0]["env"]["SSMTPD_TLS"] in ("TLSv1.2", "TLSv1.3")
    # The plain port of the same server still offers STARTTLS.
    with srv.smtp() as s:
        s.ehlo()
        assert s.has_extn("starttls")


def test_smtps_port_refuses_tls_1_1(smtps_server):
    """docs/dialogue.md "The dialogue": TLS 1.2 and newer only, on the implicit-TLS port too."""
    srv = smtps_server
    ctx = old_tls_context(ssl.TLSVersion.TLSv1_1)

    def handshake():
        sock = socket.create_connection(("127.0.0.1", srv.smtps_port), timeout=10)
        try:
            ctx.wrap_socket(sock, server_hostname=HOSTNAME)
        finally:
            sock.close()

    assert_refused_old_version(handshake)


# --- certificates --------------------------------------------------------------------


def test_self_signed_certificate_when_none_configured(make_server):
    """docs/configuration.md "Configuration": without --ssl-cert/--ssl-key, STARTTLS uses a self-signed cert for --hostname."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    srv = make_server(with_tls=False)
    text = srv.wait_log("self-signed")
    assert any(" WARNING " in line and "self-signed" in line for line in text.splitlines())
    trust_nobody = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trust_nobody.check_hostname = False
    trust_nobody.verify_mode = ssl.CERT_NONE
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        code, lines = raw.cmd("EHLO client.test")
        assert "STARTTLS" in keywords(lines)
        raw.starttls(trust_nobody)
        der = raw.sock.getpeercert(binary_form=True)
    finally:
        raw.close()
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == HOSTNAME
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert HOSTNAME in san.get_values_for_type(x509.DNSName)

    # Pinned as its own trust anchor, it verifies for the hostname: a usable first run.
    pinned = ssl.create_default_context(
        cadata=cert.public_bytes(serialization.Encoding.PEM).decode())
    raw = srv.raw()
    try:
        raw.login(pinned)
        code, lines = submit(raw)
        assert code == 250, lines
    finally:
        raw.close()
    assert len(srv.runs()) == 1


def test_sighup_reloads_certificate(make_server, tmp_path):
    """docs/operations.md "Signals" SIGHUP: new sessions get the new cert, open ones go on, a bad file is ignored."""
    (ca_a, cert_a, key_a), (ca_b, cert_b, key_b), cert, key = two_certificates(str(tmp_path))
    srv = make_server("--ssl-cert", cert, "--ssl-key", key, with_tls=False)

    def session(ca):
        raw = srv.raw()
        raw.login(client_context(ca))
        return raw

    old = session(ca_a)
    try:
        assert peer_cn(old.sock) == "ssmtpd first"
        shutil.copyfile(cert_b, cert)
        shutil.copyfile(key_b, key)
        srv.signal(signal.SIGHUP)
        wait_log_count(srv, "reload: new sessions use", 1)

        new = session(ca_b)
        try:
            assert peer_cn(new.sock) == "ssmtpd second"
            code, lines = submit(new, sender="new@example.org")
            assert code == 250, lines
        finally:
            new.close()
        # A client that only trusts the first CA no longer verifies new sessions.
        raw = srv.raw()
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                raw.login(client_context(ca_a))
        finally:
            raw.close()

        # The session opened before the reload keeps its connection and its TLS.
        assert peer_cn(old.sock) == "ssmtpd first"
        code, lines = submit(old, sender="old@example.org")
        assert code == 250, lines
    finally:
        old.close()
    senders = sorted(r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs())
    assert senders == ["new@example.org", "old@example.org"]

    # A broken file on disk: log an error, keep serving the certificate already loaded.
    with open(cert, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    errors = sum(1 for line in srv.log().splitlines() if " ERROR " in line)
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: sum(1 for line in srv.log().splitlines()
                                  if " ERROR " in line and "reload refused" in line) > errors), srv.log()
    assert srv.proc.poll() is None
    raw = session(ca_b)
    try:
        assert peer_cn(raw.sock) == "ssmtpd second"
    finally:
        raw.close()

    # Good files again: the next SIGHUP still works after a failed one.
    shutil.copyfile(cert_a, cert)
    shutil.copyfile(key_a, key)
    srv.signal(signal.SIGHUP)
    wait_log_count(srv, "reload: new sessions use", 2)
    raw = session(ca_a)
    try:
        assert peer_cn(raw.sock) == "ssmtpd first"
    finally:
        raw.close()
    assert srv.proc.poll() is None


def test_sighup_keeps_old_certificate_on_mismatched_key(make_server, tmp_path):
    """docs/operations.md "Signals" SIGHUP: a key that does not match the certificate keeps the old pair."""
    ca_a, cert_a, key_a = make_certs(str(tmp_path), serial_cn="ssmtpd first")
    other = tmp_path / "other"
    other.mkdir()
    _, _, key_b = make_certs(str(other), serial_cn="ssmtpd second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "cert.pem"), str(live / "key.pem")
    shutil.copyfile(cert_a, cert)
    shutil.copyfile(key_a, key)
    srv = make_server("--ssl-cert", cert, "--ssl-key", key, with_tls=False)
    shutil.copyfile(key_b, key)
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: any(" ERROR " in line and "reload refused" in line
                                  for line in srv.log().splitlines())), srv.log()
    assert "reload: new sessions use" not in srv.log()
    raw = srv.raw()
    try:
        raw.login(client_context(ca_a))
        assert peer_cn(raw.sock) == "ssmtpd first"
        code, lines = submit(raw)
        assert code == 250, lines
    finally:
        raw.close()
    assert srv.proc.poll() is None


# --- handshake deadline ---------------------------------------------------------------


def watch_close(raw: Raw, started: float, limit: float = 10.0) -> dict:
    """Notes in the returned dict ("after") the seconds from `started` until the
    server closes `raw`, as it happens: read later, the time would include
    whatever the test did meanwhile."""
    result = {}

    def watch():
        if raw.closed(timeout=limit):
            result["after"] = time.monotonic() - started

    result["thread"] = threading.Thread(target=watch, daemon=True)
    result["thread"].start()
    return result


def test_tls_handshake_deadline(make_server):
    """docs/dialogue.md "The dialogue": a TLS handshake gets at most --timeout; other clients are served meanwhile."""
    port = free_port()
    srv = make_server("--timeout", "2", "--smtps-port", str(port))
    wait_for_port(port, proc=srv.proc)

    # STARTTLS answered with 220, then silence instead of a ClientHello.
    starttls = srv.raw()
    assert starttls.reply()[0] == 220
    assert starttls.cmd("EHLO client.test")[0] == 250
    assert starttls.cmd("STARTTLS")[0] == 220
    starttls_since = time.monotonic()
    # The implicit-TLS port: connect and say nothing.
    implicit = Raw(socket.create_connection(("127.0.0.1", port), timeout=10))
    implicit_since = time.monotonic()
    watches = [watch_close(starttls, starttls_since), watch_close(implicit, implicit_since)]
    try:
        # A well-behaved client is not held up by the two stalled ones.
        with srv.login() as s:
            s.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        assert len(srv.runs()) == 1
        for watch in watches:
            watch["thread"].join(15)
            assert "after" in watch, "server kept a silent TLS client open"
            assert 1.0 <= watch["after"] <= 8.0, watch["after"]
    finally:
        starttls.close()
        implicit.close()


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello, made without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_handshake_deadline_covers_slow_drip(make_server):
    """docs/dialogue.md "The dialogue": the handshake deadline is for the whole handshake, not per read."""
    srv = make_server("--timeout", "2")
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        assert raw.cmd("STARTTLS")[0] == 220
        hello = client_hello()
        started = time.monotonic()
        closed = False
        # One byte every 0.5 s keeps every single read well inside --timeout.
        for byte in hello:
            if time.monotonic() - started > 10:
                break
            try:
                raw.sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if raw.closed(timeout=0.5):
                closed = True
                break
        elapsed = time.monotonic() - started
        assert closed, "server waited for a dripping handshake past its deadline"
        assert elapsed <= 8.0, elapsed
    finally:
        raw.close()


# --- renegotiation ----------------------------------------------------------------------


def test_no_renegotiation(server, tmp_path):
    """docs/dialogue.md "The dialogue": no renegotiation: a client's renegotiation request is refused."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl command not installed")
    out_path = tmp_path / "s_client.out"
    with open(out_path, "wb") as out:
        # s_client reads commands from stdin: "R" asks for a renegotiation (TLS 1.2 only).
        proc = subprocess.Popen(
            [openssl, "s_client", "-starttls", "smtp", "-connect",
             f"127.0.0.1:{server.port}", "-CAfile", server.ca, "-tls1_2", "-crlf"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)

        def shown(pattern):
            return re.search(pattern, out_path.read_text(errors="replace")) \
                or proc.poll() is not None

        # Each command once s_client has shown the answer to the one before:
        # it takes "R" as a command only when a read of its input starts with it.
        # A NOOP answered would show within seconds; refused, s_client exits.
        steps = ((b"EHLO client.test\n", r"greets client\.test\r?\n(250-.*\n)*250 "),
                 (b"R\n", "RENEGOTIATING"), (b"NOOP\n", r"250 2\.0\.0 OK"), (b"QUIT\n", None))
        try:
            for line, answer in steps:
                proc.stdin.write(line)
                proc.stdin.flush()
                if answer:
                    wait_until(lambda: shown(answer), timeout=15)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # s_client already gave up: the renegotiation was refused
        try:
            proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out_path.read_text(errors="replace")
    if "RENEGOTIATING" not in text:
        pytest.skip(f"this openssl s_client did not attempt renegotiation:\n{text[-2000:]}")
    assert "no renegotiation" in text, text[-2000:]
    # The NOOP after the refused renegotiation never got an answer.
    assert "250 2.0.0 OK" not in text, text[-2000:]


# --- TLS 1.2 cipher suites ----------------------------------------------------------

def s_client_cipher(srv, cipher: str):
    """openssl s_client over STARTTLS with TLS 1.2 and one cipher suite: the suite the
    server agreed to, or None when the handshake failed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (.ci/run installs it)")
    result = subprocess.run(
        [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{srv.port}",
         "-CAfile", srv.ca, "-tls1_2", "-cipher", cipher, "-crlf"],
        input=b"QUIT\n", capture_output=True, timeout=30)
    out = result.stdout.decode(errors="replace")
    for line in out.splitlines():
        if "Cipher is " in line and "(NONE)" not in line:
            return line.split("Cipher is ", 1)[1].strip()
    return None


@pytest.mark.parametrize("cipher,accepted", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", True),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
    ("ECDHE-ECDSA-AES128-SHA", False),      # CBC
    ("ECDHE-ECDSA-AES256-SHA384", False),   # CBC
    ("ECDHE-ECDSA-AES128-SHA256", False),   # CBC
    ("AES128-GCM-SHA256", False),           # no forward secrecy
])
def test_tls_1_2_offers_only_forward_secret_aead_suites(server, cipher, accepted):
    """docs/limits.md "Limits and abuse": TLS 1.2 suites are ECDHE with AES-GCM or ChaCha20-Poly1305 only."""
    agreed = s_client_cipher(server, cipher)
    assert agreed == (cipher if accepted else None)
