"""Dialogue fuzzing against a live server (docs/process-program.md "The process program", docs/dialogue.md "The dialogue").

A seeded random client throws command sequences at a real server: valid and
invalid EHLO/HELO, STARTTLS with and without the handshake, AUTH PLAIN/LOGIN
with good, bad and garbled responses, MAIL/RCPT with odd addresses and
parameters, DATA with dots, bare CR/LF and smuggling-like bodies, junk bytes,
overlong lines, QUIT and abrupt closes.  A small model of the session predicts
every reply code from docs/dialogue.md, so any disagreement fails with a transcript.
At the end, each DATA answered 250 must have exactly one run of the record
program, with the expected envelope and message, and no other run may exist.

FUZZ_SEED=<n> replays another sequence; a failure names its seed and session.
"""

import base64
import collections
import glob
import json
import os
import random
import re
import socket
import ssl
import time
import unicodedata

import pytest

from conftest import HOSTNAME, PASSWORD, PROGRAMS, USER, wait_until

AUTH_QUICK = os.path.join(PROGRAMS, "auth-quick")
SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
SESSIONS = 300  # per server
BUDGET = 40.0  # seconds of fuzzing per server, once it has gone deep enough
MAX_BUDGET = 120.0  # a slow machine may take this long to get there; past it, a skip
MIN_SESSIONS = 40  # fewer than this would make the test toothless
IO_TIMEOUT = 10.0
MAX_SIZE = 6000
MAX_RCPTS = 4

# The server's line limits (docs/dialogue.md "The dialogue", RFC 5321 §4.5.3.1.4, RFC 4954 §4), with CRLF.
COMMAND_LIMIT = 512
MAIL_LIMIT = 512 + 26 + 500 + 10
AUTH_LIMIT = 12288 + 2
ERROR_CODES = {500, 501, 502, 503, 504, 555}
MAX_ERRORS = 10
MAX_AUTH_FAILURES = 3
HTTP_VERBS = {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"}
VERBS = {"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP",
         "QUIT", "VRFY", "HELP"}
TERMINATOR = b"\r\n.\r\n"
CLOSE = "close"  # predicted: the server closes without a reply

REPLY_LINE = re.compile(r"^(\d{3})([ -])(.*)$")
ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}(?: |$)")
RECEIVED = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*")


class Mismatch(AssertionError):
    pass


class Closed(Exception):
    """The session is over (by design); the next session starts."""


class Ledger:
    """What every DATA got, across all sessions of one server."""

    def __init__(self):
        self.accepted = {}  # tag -> expected run: sender, rcpts, user, tls, helo, message
        self.refused = set()  # tags answered with anything but 250: no run allowed
        self.abandoned = set()  # tags whose client vanished before the final dot
        self.replies = 0
        self.sessions = 0
        self.events = collections.Counter()  # what the fuzzer reached, for the summary


# --- the model's small parsers: literal readings of docs/dialogue.md "The dialogue" -------------------

def unstuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 on a CRLF-only message: one leading dot off every line."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line
                        for line in message.split(b"\r\n"))


def has_bare(message: bytes) -> bool:
    pairs = message.count(b"\r\n")
    return message.count(b"\r") != pairs or message.count(b"\n") != pairs


def b64(data) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def is_control(text: str) -> bool:
    """C0, DEL and C1: none may reach an argv, an environment or a header."""
    return any(unicodedata.category(c) == "Cc" for c in text)


class Session:
    """One fuzzed connection and the model that predicts its replies."""

    def __init__(self, srv, require_tls: bool, sid: int, ledger: Ledger):
        self.srv = srv
        self.require_tls = require_tls
        self.sid = sid
        self.rng = random.Random(f"{SEED}-{require_tls}-{sid}")
        self.ledger = ledger
        self.transcript = []
        self.sock = None
        self.buf = b""
        # Model state.
        self.tls = False
        self.helo = None
        self.user = None
        self.mail_from = None
        self.rcpts = []
        self.errors = 0
        self.auth_failures = 0
        self.ndata = 0

    # --- wire -----------------------------------------------------------------

    def note(self, direction: str, data) -> None:
        text = data if isinstance(data, str) else repr(data)[2:-1]
        if len(text) > 200:
            text = f"{text[:150]}...({len(text)} chars)...{text[-30:]}"
        self.transcript.append(f"{direction} {text}")

    def fail(self, message: str):
        tail = "\n".join(self.transcript[-40:])
        raise Mismatch(f"seed {SEED}, require_tls={self.require_tls}, session {self.sid}: "
                       f"{message}\n--- transcript ---\n{tail}")

    def send(self, data: bytes, whole=False) -> None:
        self.note("C:", data)
        try:
            if not whole and len(data) > 1 and self.rng.random() < 0.15:
                # Dribble it out: a CRLF, a dot line or the terminator may
                # then straddle two of the server's reads.
                cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, 6)))
                for start, end in zip([0] + cuts, cuts + [len(data)]):
                    self.sock.sendall(data[start:end])
                    time.sleep(0.003)
            else:
                self.sock.sendall(data)
        except socket.timeout:
            self.fail("server stopped reading")
        except (OSError, ssl.SSLError) as e:
            self.fail(f"connection broke while sending: {e}")

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except socket.timeout:
            self.fail("no reply within the timeout")
        except (ConnectionResetError, ssl.SSLError):
            return b""

    def reply(self):
        """(code, lines) of one reply, checked for form; (None, []) at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self._recv()
                if not chunk:
                    if self.buf or lines:
                        self.fail(f"EOF inside a reply: {lines} {self.buf!r}")
                    return None, []
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\r\n", 1)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"reply is not UTF-8: {raw!r}")
            self.note("S:", text)
            m = REPLY_LINE.match(text) or (re.fullmatch(r"\d{3}", text) and
                                           REPLY_LINE.match(text + " "))
            if not m or is_control(m.group(3)):
                self.fail(f"malformed reply line {text!r}")
            if lines and m.group(1) != lines[0][:3]:
                self.fail(f"codes differ within one reply: {lines + [text]}")
            lines.append(text)
            if m.group(2) == " ":
                break
        code = int(lines[0][:3])
        self.ledger.replies += 1
        return code, lines

    def check_enhanced(self, code: int, lines, bare_ok=False) -> None:
        """RFC 2034: every line starts with an enhanced code of the same class."""
        if bare_ok:
            return
        for line in lines:
            m = ENHANCED.match(line[4:])
            if not m or int(m.group(1)) != code // 100:
                self.fail(f"no matching enhanced status code in {line!r}")

    def expect_eof(self, strict=True) -> None:
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            chunk = self._recv()
            if not chunk:
                self.note("S:", "<EOF>")
                raise Closed()
            if strict:
                self.buf += chunk
                self.fail(f"data after the last reply: {self.buf!r}")
        self.fail("connection not closed")

    # --- generic gate, then the verb's own rule -------------------------------

    def gate(self, raw: bytes):
        """The reply the session loop gives before the verb runs, or None."""
        if len(raw) > AUTH_LIMIT:
            return 500
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        first = line.split(b" ", 1)[0].upper()
        if first in HTTP_VERBS:
            return CLOSE
        if len(raw) > {b"MAIL": MAIL_LIMIT, b"AUTH": AUTH_LIMIT}.get(first, COMMAND_LIMIT):
            return 500
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return 500
        verb, _, _ = text.partition(" ")
        verb = verb.upper()
        if not verb.isalpha() or verb not in VERBS:
            return 502
        helo, in_mail = self.helo is not None, self.mail_from is not None
        tls_ok = self.tls or not self.require_tls
        needs = {
            "STARTTLS": [(helo, 503), (not self.tls, 503), (not in_mail, 503)],
            "AUTH": [(helo, 503), (not in_mail, 503), (self.user is None, 503), (tls_ok, 530)],
            "MAIL": [(helo, 503), (tls_ok, 530), (self.user is not None, 530),
                     (not in_mail, 503)],
            "RCPT": [(in_mail, 503)],
            "DATA": [(in_mail, 503), (bool(self.rcpts), 503)],
        }.get(verb, [])
        for ok, code in needs:
            if not ok:
                return code
        return None

    def counted(self, code: int) -> None:
        """The loop's error counting: the tenth error reply is followed by 421."""
        if code in ERROR_CODES:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                self.expect_421()

    def expect_421(self) -> None:
        self.ledger.events["421 close"] += 1
        code, lines = self.reply()
        if code != 421:
            self.fail(f"expected 421 and close, got {lines}")
        self.check_enhanced(code, lines)
        self.expect_eof()

    def predict(self, raw: bytes, rule=None):
        """(code, on_success): the gate's answer, else `rule()`'s once the verb runs."""
        predicted = self.gate(raw)
        if predicted is not None:
            return predicted, None
        return rule() if rule else (None, None)

    def command(self, raw: bytes, rule=None, bare_codes=(), check=None):
        """Send one command line; compare the reply to the model; return its code."""
        predicted, on_success = self.predict(raw, rule)
        self.send(raw)
        return self.settle(predicted, on_success, bare_codes, check)

    def step(self, made):
        return self.command(*made)

    def settle(self, predicted, on_success=None, bare_codes=(), check=None):
        """Read the reply to a command already sent and hold it against the model."""
        if predicted == CLOSE:
            self.ledger.events["HTTP close"] += 1
            self.expect_eof()
        code, lines = self.reply()
        if code is None:
            self.fail(f"connection closed; expected {predicted}")
        if predicted is not None and code != predicted:
            self.fail(f"expected {predicted}, got {lines}")
        self.check_enhanced(code, lines, bare_ok=code in (334, 354, *bare_codes))
        if code == 421:
            self.fail(f"unexpected 421: {lines}")
        if on_success is not None:
            on_success()
        if check is not None:
            check(code, lines)
        if code == 221:
            self.expect_eof()
        self.counted(code)
        return code, lines

    # --- random material --------------------------------------------------------

    def pick(self, *weighted):
        """pick((weight, value), ...)"""
        total = sum(w for w, _ in weighted)
        x = self.rng.uniform(0, total)
        for w, v in weighted:
            x -= w
            if x <= 0:
                return v
        return weighted[-1][1]

    def junk(self, n: int, alphabet=None) -> str:
        alphabet = alphabet or "abcdefghijklmnopqrstuvwxyz0123456789-._~!#$%&'*+/=?^`{|}"
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def random_bytes(self, n: int) -> bytes:
        return bytes(self.rng.randrange(256) for _ in range(n))

    # --- actions ------------------------------------------------------------------

    def act_hello(self) -> None:
        self.step(self.make_hello())

    def make_hello(self):
        verb = self.rng.choice(["EHLO", "HELO", "ehlo", "Helo"])
        name = self.pick(
            (6, "client.test"), (1, "[127.0.0.1]"), (1, "[IPv6:::1]"), (1, ""), (1, "   "),
            (1, "  spaced.test  "), (1, "clïent.tést"), (1, "a\x01b"), (1, "tab\there"),
            (1, "x" * 256), (1, "x" * 255), (1, "del\x7f"), (1, "(comment);x"), (1, "c1\x85"),
            (1, "csi\x9b31m"), (1, "nul\x00name"), (1, "<in@jected>"),
            (1, "y" * 600))
        raw = f"{verb} {name}".encode() + b"\r\n" if name or self.rng.random() < 0.5 \
            else verb.encode() + b"\r\n"

        def rule():
            arg = raw[:-2].decode().partition(" ")[2]
            clean = arg.strip(" ")
            if not clean or is_control(clean) or len(clean) > 255:
                return 501, None

            def ok():
                self.helo = clean
                self.mail_from, self.rcpts = None, []
            return 250, ok

        def check(code, lines):
            if code != 250 or verb.upper() != "EHLO":
                return
            keywords = [line[4:] for line in lines[1:]]
            if ("STARTTLS" in keywords) == self.tls:
                self.fail(f"STARTTLS advertised wrongly: {keywords}")
            if ("AUTH PLAIN LOGIN" in keywords) != (self.tls or not self.require_tls):
                self.fail(f"AUTH advertised wrongly: {keywords}")
            if f"SIZE {MAX_SIZE}" not in keywords:
                self.fail(f"SIZE missing: {keywords}")
        return raw, rule, (250,), check

    def act_starttls(self) -> None:
        arg = self.pick((9, ""), (1, " now"))
        raw = f"STARTTLS{arg}\r\n".encode()
        predicted = self.gate(raw)
        if predicted is None and arg:
            predicted = 501
        if predicted is not None:
            self.command(raw, lambda: (501, None))
            return
        how = self.pick((8, "wrap"), (1, "inject"), (1, "plain"))
        self.ledger.events[f"STARTTLS {how}"] += 1
        # A command pipelined behind STARTTLS travels in the clear: it must be
        # dropped, never run (docs/dialogue.md "The dialogue", RFC 3207 §4.2).
        self.send(raw + (b"RSET\r\nNOOP\r\n" if how == "inject" else b""), whole=True)
        code, lines = self.reply()
        if code != 220:
            self.fail(f"expected 220 to STARTTLS, got {lines}")
        self.check_enhanced(code, lines)
        if how == "plain":
            # Not a TLS ClientHello: the server gives up on the handshake and closes,
            # perhaps before all of this has left.
            self.note("C:", b"EHLO still-plain.test\r\n")
            try:
                self.sock.sendall(b"EHLO still-plain.test\r\n")
            except OSError:
                pass
            self.expect_eof(strict=False)
        ctx = self.srv.tls_context()
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=HOSTNAME)
        except (OSError, ssl.SSLError) as e:
            self.fail(f"TLS handshake failed: {e}")
        self.note("--", f"TLS {self.sock.version()}")
        self.buf = b""
        self.tls = True
        self.helo, self.user, self.mail_from, self.rcpts = None, None, None, []
        if how == "inject":
            # Had RSET and NOOP run, their 250s would come before this 214.
            self.command(b"HELP\r\n", lambda: (214, None))

    def act_auth(self) -> None:
        mech = self.pick((4, "PLAIN"), (3, "LOGIN"), (1, "plain"), (1, "CRAM-MD5"),
                         (1, ""), (1, "XOAUTH2"))
        user = self.pick((5, USER), (1, "jürgen"), (1, "tempfail"))
        password = self.pick((5, PASSWORD), (2, "wrong"), (1, "sécret"))
        creds = self.pick(
            (8, ("good", f"\0{user}\0{password}")),
            (1, ("same-authzid", f"{user}\0{user}\0{password}")),
            (1, ("other-authzid", f"bob\0{user}\0{password}")),
            (1, ("two-parts", f"{user}\0{password}")),
            (1, ("four-parts", f"\0{user}\0{password}\0x")),
            (1, ("control-user", f"\0a\x01b\0{password}")),
            (1, ("empty-user", f"\0\0{password}")))
        mangle = self.pick((8, None), (1, "*"), (1, "!!!"), (1, "="), (1, "é"),
                           (1, "long"), (1, "empty"), (1, "padded"))
        initial = self.rng.random() < 0.6

        def mangled(good: str):
            if mangle is None:
                return good
            return {"*": "*", "!!!": "!!!", "=": "=", "é": "é",
                    "long": "QUFB" * 3100, "empty": "", "padded": good + "="}[mangle]

        def decode(resp: str):
            """(bytes, None) or (None, reply code) as sasl.decode_response does."""
            resp = resp.strip()
            if resp == "*":
                return None, 501
            if resp == "=":
                return b"", None
            try:
                data = base64.b64decode(resp.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                return None, 501
            # Only the canonical encoding (RFC 4648 §3.3): no surplus padding.
            return (data, None) if b64(data) == resp else (None, 501)

        def username_ok(raw_name: bytes):
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                return False
            return bool(name) and not is_control(name)

        def verdict(name: str, secret: str):
            if name == "tempfail":
                return 454
            return 235 if secret == PASSWORD else 535

        upper = mech.upper()
        if upper == "PLAIN":
            first = mangled(b64(creds[1]))
        elif upper == "LOGIN":
            first = mangled(b64(user))
        else:
            first = b64(creds[1])
        if initial and first == "":
            initial = False
        line = f"AUTH {mech}" + (f" {first}" if initial else "")
        raw = line.encode() + b"\r\n"
        predicted = self.gate(raw)
        if predicted is None and upper not in ("PLAIN", "LOGIN"):
            predicted = 504
        if predicted is not None:
            self.command(raw, lambda: (predicted, None))
            return

        # The dialogue: (response line to send after a 334, or None) and the end.
        self.send(raw)
        steps = []  # responses owed to 334 prompts
        if not initial:
            steps.append(first)
        if upper == "PLAIN":
            data, final = decode(first)
            if final is None:
                parts = data.split(b"\0")
                if len(parts) != 3 or not username_ok(parts[1]):
                    final = 501
                elif parts[0] and parts[0] != parts[1]:
                    final = 535
                else:
                    final = verdict(parts[1].decode(), parts[2].decode("utf-8", "replace"))
        else:
            name, final = decode(first)
            if final is None:
                second = b64(password) if self.rng.random() < 0.9 else "!!!"
                steps.append(second)
                secret, final = decode(second)
                if final is None:
                    final = (501 if not username_ok(name) or b"\0" in secret
                             else verdict(name.decode(), secret.decode("utf-8", "replace")))
        for resp in steps:
            code, lines = self.reply()
            if code != 334:
                self.fail(f"expected a 334 challenge, got {lines}")
            resp_raw = resp.encode() + b"\r\n"
            self.send(resp_raw)
            if len(resp_raw) > AUTH_LIMIT:
                final = 500
                break
        code, lines = self.reply()
        if code != final:
            self.fail(f"AUTH expected {final}, got {lines}")
        self.check_enhanced(code, lines)
        if code == 235:
            self.user = user
        if code == 535:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.expect_421()
        self.counted(code)

    def tag(self) -> str:
        return f"{self.sid}-{self.ndata}"

    def act_mail(self) -> None:
        self.step(self.make_mail())

    def make_mail(self):
        local = f"fuzz-{self.tag()}"
        form = self.pick(
            (8, "plain"), (1, "suffix"), (1, "utf8"), (1, "quoted"), (1, "quoted-gt"),
            (1, "route"), (1, "null"), (1, "control"), (1, "unclosed"), (1, "bare"),
            (1, "toolong"))
        address, bad = {
            "plain": (f"{local}@x.test", False),
            "suffix": (f"{local}+{self.junk(6)}@x.test", False),
            "utf8": (f"{local}ü@exämple.test", False),
            "quoted": (f'"{local} q"@x.test', False),
            "quoted-gt": (f'"{local}>q"@x.test', False),
            "route": (f"@r1.test,@r2.test:{local}@x.test", False),
            "null": ("", False),
            "control": (local + self.rng.choice(["\x01", "\x7f", "\t", "\x1b", "\x00", "\x85",
                                                 "\x9b"]) + "@x.test", True),
            "unclosed": (f"{local}@x.test", True),
            "bare": (f"{local}@x.test", True),
            "toolong": (f"{local}{'a' * 260}@x.test", True),
        }[form]
        path = (address if form == "bare" else f"<{address}" if form == "unclosed"
                else f"<{address}>")
        keyword = self.pick((8, "FROM:"), (1, "from:"), (1, "FROM: "), (1, "FROM :"),
                            (1, "FRM:"), (1, "FROM"))
        params = []
        for _ in range(self.pick((6, 0), (3, 1), (1, 2))):
            params.append(self.pick(
                (2, f"SIZE={self.rng.choice([100, MAX_SIZE, MAX_SIZE + 1, 10 ** 9])}"),
                (1, "SIZE=abc"), (1, "BODY=8BITMIME"), (1, "BODY=7BIT"),
                (1, "BODY=BINARYMIME"), (1, "SMTPUTF8"), (1, "AUTH=<>"),
                (1, "X-UNKNOWN=1"), (1, "=bad"), (1, "SIZE=")))
        if form == "unclosed":
            # The first unquoted '>' ends the path, so AUTH=<> would close it.
            params = [p for p in params if ">" not in p]
        names = [p.partition("=")[0].upper() for p in params]
        if len(set(names)) != len(names):
            params = params[:1]
        verb = self.rng.choice(["MAIL", "MAIL", "mail"])
        line = f"{verb} {keyword}{path}" + "".join(" " + p for p in params)
        raw = line.encode() + b"\r\n"
        expected_addr = (f"{local}@x.test" if form == "route" else address)

        def rule():
            if keyword.rstrip(" :").upper() != "FROM" or ":" not in keyword:
                return 501, None
            if bad:
                return 501, None
            for p in params:
                if not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?$", p):
                    return 501, None
            for p in params:
                name, _, value = p.partition("=")
                name = name.upper()
                if name == "SIZE":
                    if not value.isdigit():
                        return 501, None
                    if int(value) > MAX_SIZE:
                        return 552, None
                elif name == "BODY":
                    if value.upper() not in ("7BIT", "8BITMIME"):
                        return 501, None
                elif name not in ("SMTPUTF8", "AUTH"):
                    return 555, None

            def ok():
                self.mail_from, self.rcpts = expected_addr, []
            return 250, ok
        return raw, rule

    def act_rcpt(self) -> None:
        self.step(self.make_rcpt())

    def make_rcpt(self):
        form = self.pick((8, "plain"), (1, "null"), (1, "postmaster"), (1, "control"),
                         (1, "param"), (1, "badparam"), (1, "utf8"), (1, "quoted-space"))
        n = len(self.rcpts)
        address = {"plain": f"r{n}@y.test", "null": "", "postmaster": "postmaster",
                   "control": f"r{n}\x01@y.test", "param": f"r{n}@y.test",
                   "badparam": f"r{n}@y.test", "utf8": f"rü{n}@ÿ.test",
                   "quoted-space": f'"r {n}"@y.test'}[form]
        suffix = {"param": " NOTIFY=NEVER", "badparam": " =x"}.get(form, "")
        raw = f"RCPT TO:<{address}>{suffix}\r\n".encode()

        def rule():
            if form in ("null", "control", "badparam"):
                return 501, None
            if form == "param":
                return 555, None
            if len(self.rcpts) >= MAX_RCPTS:
                return 452, None
            return 250, lambda: self.rcpts.append(address)
        return raw, rule

    def body(self):
        """Random DATA content: (wire bytes after the 354, the message the program should get)."""
        tag = self.tag()
        pieces = [f"X-Fuzz-Id: {tag}\r\n".encode(), b"Subject: fuzz\r\n", b"\r\n"]
        # Half the bodies keep to CRLF lines, so that many reach the program.
        clean = self.rng.random() < 0.5
        for _ in range(self.rng.randrange(0, 12)):
            piece = self.pick(
                (6, b"plain text line\r\n"), (2, b".\r\n"), (2, b"..\r\n"), (2, b".dot\r\n"),
                (1, b"\n.\n"), (1, b"\r.\r"), (1, b"\n.\r\n"), (1, b"\r\n.\n"), (1, b"\r\n.\r"),
                (1, b"\r"), (1, b"\n"), (1, "non-ascii: h\u00e9llo \u2603\r\n".encode()),
                (1, b"nul\0byte\r\n"),
                (1, b"\r\n.\nMAIL FROM:<evil-" + tag.encode() + b"@x.test>\r\nRCPT TO:<v@x>"
                    b"\r\nDATA\r\nsmuggled\r\n"),
                (1, b"\n.\r\nRSET\r\n"),
                (1, self.random_bytes(self.rng.randrange(1, 40))),
                (1, b"x" * self.rng.choice([998, 2000, MAX_SIZE // 2]) + b"\r\n"))
            if not clean or not has_bare(piece):
                pieces.append(piece)
        if self.rng.random() < 0.1:
            # Right at the size limit, or one octet over it (docs/dialogue.md "The dialogue", 552).
            size = len(unstuff(b"".join(pieces)))
            pad = MAX_SIZE - size - 2 + self.rng.choice([0, 1])
            if pad > 0:
                pieces.append(b"p" * pad + b"\r\n")
        body = b"".join(pieces)
        # Never end the data early by accident: stuff when a terminator would
        # appear before the end (a real client always stuffs; we do sometimes).
        stuff = self.rng.random() < 0.3
        ending = b"" if body.endswith(b"\r\n") else b"\r\n"
        if stuff or (b"\r\n" + body + ending + b".\r\n").find(TERMINATOR) \
                != len(b"\r\n" + body + ending) - 2:
            body = body.replace(b"\r\n.", b"\r\n..")
            ending = b"" if body.endswith(b"\r\n") else b"\r\n"
        wire = body + ending + b".\r\n"
        assert (b"\r\n" + wire).find(TERMINATOR) == len(b"\r\n" + wire) - 5
        return wire, body + ending

    def make_data(self):
        arg = self.pick((9, ""), (1, " now"))
        raw = f"DATA{arg}\r\n".encode()

        def rule():
            def over():
                self.mail_from, self.rcpts = None, []
            return (501, None) if arg else (354, over)
        return raw, rule

    def envelope(self):
        return (self.mail_from, list(self.rcpts), self.user, self.tls, self.helo)

    def new_message(self):
        tag = self.tag()
        wire, message = self.body()
        self.ndata += 1
        return tag, wire, message

    def act_data(self) -> None:
        envelope = self.envelope()
        code, _ = self.step(self.make_data())
        if code != 354:
            return
        tag, wire, message = self.new_message()
        how = self.pick((18, "whole"), (1, "vanish"), (1, "half-close"))
        if how == "vanish":
            # Vanish mid-DATA: the message stays ours and must never run (docs/dialogue.md "The dialogue").
            cut = self.rng.randrange(0, len(wire) - 3)
            self.send(wire[:cut])
            self.ledger.abandoned.add(tag)
            raise Closed()
        self.send(wire)
        if how == "half-close" and not self.tls:
            # Done sending, still listening: the message is complete, so it
            # must be processed and answered like any other.
            self.sock.shutdown(socket.SHUT_WR)
            self.ledger.events["half-close after DATA"] += 1
            self.data_outcome(tag, message, envelope)
            self.expect_eof()
        self.data_outcome(tag, message, envelope)

    def data_outcome(self, tag, message, envelope) -> None:
        if has_bare(message):
            predicted = 554
        elif len(unstuff(message)) > MAX_SIZE:
            predicted = 552
        else:
            predicted = 250
        code, lines = self.reply()
        self.ledger.events[f"DATA {code}"] += 1
        if code != predicted:
            self.fail(f"DATA {tag} expected {predicted}, got {lines}")
        self.check_enhanced(code, lines)
        if code == 250:
            sender, rcpts, user, tls, helo = envelope
            self.ledger.accepted[tag] = dict(sender=sender, rcpts=rcpts, user=user or "",
                                             tls=tls, helo=helo, message=unstuff(message))
        else:
            self.ledger.refused.add(tag)

    def act_simple(self) -> None:
        self.step(self.make_simple())

    def make_simple(self):
        line = self.pick(
            (3, "NOOP"), (1, "NOOP with some args"), (2, "RSET"), (1, "RSET now"),
            (1, "VRFY alice"), (1, "VRFY"), (1, "VRFY    "), (1, "HELP"), (1, "HELP MAIL"),
            (1, "noop"), (1, "EXPN list"), (1, "TURN"), (1, "BDAT 10 LAST"), (1, "*"),
            (1, "ETRN x"), (1, ""), (1, " NOOP"), (1, "NO0P"), (1, "QUIT now"),
            (1, "NOOP " + "x" * (COMMAND_LIMIT - 7)), (1, "NOOP " + "x" * (COMMAND_LIMIT - 6)),
            (1, "\u0131\u0131\u0131"), (1, "NOOP\tx"))
        raw = line.encode() + (b"\n" if self.rng.random() < 0.1 else b"\r\n")

        def rule():
            verb, _, arg = raw.rstrip(b"\r\n").decode().partition(" ")
            verb = verb.upper()
            if verb == "RSET":
                if arg.strip():
                    return 501, None

                def reset():
                    self.mail_from, self.rcpts = None, []
                return 250, reset
            if verb == "VRFY":
                return (252 if arg.strip() else 501), None
            if verb == "HELP":
                return 214, None
            if verb == "QUIT":
                return 221, None
            return 250, None
        return raw, rule

    def act_junk(self) -> None:
        self.step(self.make_junk())

    def make_junk(self):
        kind = self.pick((3, "bytes"), (1, "long"), (1, "huge"), (1, "long-mail"),
                         (1, "long-auth"), (1, "long-unknown"))
        if kind == "bytes":
            # A leading digit keeps the verb from ever being a real one.
            raw = b"7" + self.random_bytes(self.rng.randrange(0, 80)).replace(b"\n", b"") \
                + b"\r\n"
        elif kind == "long":
            raw = b"NOOP " + b"y" * self.rng.randrange(600, 5000) + b"\r\n"
        elif kind == "long-unknown":
            raw = b"XYZZY " + b"w" * self.rng.randrange(507, 900) + b"\r\n"
        elif kind == "huge":
            raw = b"HELP " + b"z" * self.rng.randrange(13000, 70000) + b"\r\n"
        elif kind == "long-mail":
            raw = (b"MAIL FROM:<a@x.test> X-" + b"p" * self.rng.randrange(1000, 1100) + b"=1\r\n")
        else:
            raw = b"AUTH PLAIN " + b"Q" * self.rng.randrange(12270, 12300) + b"\r\n"
        # Only a MAIL or AUTH line within its limit can get past the gate: a MAIL
        # with an unknown parameter, or an AUTH PLAIN response that decodes to
        # no NUL-separated triple.
        return raw, lambda: (555 if kind == "long-mail" else 501, None)

    def act_pipeline(self, sane=False) -> None:
        """RFC 2920: a group of commands in one write, DATA and its body included."""
        makers = ((3, self.make_mail), (3, self.make_rcpt), (3, self.make_simple),
                  (1, self.make_junk), (1, self.make_hello))
        plan = []  # (predicted, bare_codes, check) or ("data", tag, message, envelope)
        wire = b""
        errors = self.errors

        def add(made) -> bool:
            nonlocal wire, errors
            raw, rule, *more = made
            predicted, on_success = self.predict(raw, rule)
            if predicted in (None, CLOSE, 221):
                return True  # not for a pipeline; skip it
            # Later commands are predicted from the state the earlier ones leave.
            if on_success is not None:
                on_success()
            plan.append((predicted, None, *more))
            wire += raw
            if predicted in ERROR_CODES:
                errors += 1
            return errors < MAX_ERRORS  # past that the server closes

        going = True
        if sane:  # what a pipelining client sends once logged in
            going = add(self.make_mail())
            for _ in range(self.rng.randrange(1, 3)):
                going = going and add(self.make_rcpt())
        else:
            for _ in range(self.rng.randrange(1, 7)):
                going = add(self.pick(*makers)())
                if not going:
                    break
        if going and (sane or self.rng.random() < 0.6):
            envelope = self.envelope()
            raw, rule = self.make_data()
            predicted, on_success = self.predict(raw, rule)
            if predicted == 354:
                on_success()
                tag, body, message = self.new_message()
                plan.append((354,))
                plan.append(("data", tag, message, envelope))
                wire += raw + body
                # Commands right behind the final dot (the reader must hand them back).
                for _ in range(self.rng.randrange(0, 3)):
                    if not add(self.pick((3, self.make_simple), (1, self.make_mail))()):
                        break
        if not plan:
            return
        with_data = any(item[0] == "data" for item in plan)
        self.ledger.events["pipeline with DATA" if with_data else "pipeline"] += 1
        self.send(wire)
        for item in plan:
            if item[0] == "data":
                self.data_outcome(*item[1:])
            else:
                self.settle(*item)

    def act_http(self) -> None:
        self.command(b"GET / HTTP/1.1\r\n")

    def act_quit(self) -> None:
        self.command(b"QUIT\r\n", lambda: (221, None))

    # --- the session ------------------------------------------------------------

    def sane(self):
        """The next step of an ordinary submission from the model's state."""
        if self.helo is None:
            return self.act_hello
        if self.require_tls and not self.tls:
            return self.act_starttls
        if self.user is None:
            return self.act_auth
        if self.mail_from is None:
            return self.act_mail if self.rng.random() < 0.7 else \
                (lambda: self.act_pipeline(sane=True))
        if not self.rcpts or self.rng.random() < 0.2:
            return self.act_rcpt
        return self.act_data

    def chaos(self):
        return self.pick((3, self.act_hello), (2, self.act_starttls), (3, self.act_auth),
                         (3, self.act_mail), (3, self.act_rcpt), (3, self.act_data),
                         (4, self.act_simple), (3, self.act_junk), (0.3, self.act_http),
                         (0.5, self.act_quit), (3, self.act_pipeline))

    def run(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.srv.port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            code, lines = self.reply()
            if code != 220 or lines != [f"220 {HOSTNAME} ESMTP ssmtpd"]:
                self.fail(f"bad greeting {lines}")
            # Some sessions are nearly well-behaved, so that many get deep enough to DATA.
            calm = self.rng.choice([0.3, 0.6, 0.85, 0.95])
            for _ in range(self.rng.randrange(2, 40)):
                step = self.sane() if self.rng.random() < calm else self.chaos()
                step()
            if self.rng.random() < 0.5:
                self.act_quit()
        except Closed:
            pass
        finally:
            self.sock.close()


# --- the test ------------------------------------------------------------------

def records(srv):
    out = []
    for path in glob.glob(os.path.join(srv.record_dir, "run-*.json")):
        with open(path) as f:
            out.append(json.load(f))
    return out


def run_tag(record) -> str:
    stdin = record["stdin"].encode("latin-1")
    m = re.search(rb"X-Fuzz-Id: (\d+-\d+)\r\n", stdin)
    return m.group(1).decode() if m else f"<no tag; from {record['env'].get('SSMTPD_MAIL_FROM')}>"


def check_runs(srv, ledger: Ledger) -> None:
    by_tag = {}
    for rec in records(srv):
        by_tag.setdefault(run_tag(rec), []).append(rec)
    strays = {t: len(r) for t, r in by_tag.items() if t not in ledger.accepted}
    assert not strays, (f"runs for DATA that got no 250 (refused {len(ledger.refused)}, "
                        f"abandoned {len(ledger.abandoned)}): {strays}")
    missing = sorted(set(ledger.accepted) - set(by_tag))
    assert not missing, f"250 without a run: {missing}"
    for tag, expected in ledger.accepted.items():
        runs = by_tag[tag]
        assert len(runs) == 1, f"DATA {tag} ran {len(runs)} times"
        rec = runs[0]
        env = rec["env"]
        assert rec.get("done") and rec.get("exit") == 0, rec
        assert env["SSMTPD_MAIL_FROM"] == expected["sender"], (tag, env)
        assert env["SSMTPD_RCPT_TO"] == "\n".join(expected["rcpts"]), (tag, env)
        assert env["SSMTPD_USERNAME"] == expected["user"] == rec["argv"][-1], (tag, rec)
        assert env["SSMTPD_HELO"] == expected["helo"], (tag, env)
        assert bool(env["SSMTPD_TLS"]) == expected["tls"], (tag, env)
        stdin = rec["stdin"].encode("latin-1")
        header = RECEIVED.match(stdin)
        assert header, (tag, stdin[:300])
        assert stdin[header.end():] == expected["message"], tag


@pytest.mark.parametrize("require_tls", [True, False], ids=["require-tls", "no-require-tls"])
def test_fuzzed_dialogues(make_server, require_tls):
    """docs/dialogue.md "The dialogue" dialogue and §4 delivery: random sessions; one run per 250, none otherwise."""
    args = ["--auth", AUTH_QUICK, "--max-message-size", str(MAX_SIZE),
            "--max-recipients", str(MAX_RCPTS)]
    if not require_tls:
        args.append("--no-require-tls")
    srv = make_server(*args)
    ledger = Ledger()

    def deep_enough():
        # The fuzzer reached the deep end often enough to mean something.
        return (ledger.sessions >= MIN_SESSIONS and len(ledger.accepted) >= 10
                and len(ledger.refused) >= 3)

    started = time.monotonic()
    for sid in range(SESSIONS):
        spent = time.monotonic() - started
        if spent > MAX_BUDGET or (spent > BUDGET and deep_enough()):
            break
        Session(srv, require_tls, sid, ledger).run()
        ledger.sessions += 1
    if ledger.sessions < SESSIONS and not deep_enough():
        pytest.skip(f"only {ledger.sessions} sessions ({len(ledger.accepted)} delivered, "
                    f"{len(ledger.refused)} refused) in {MAX_BUDGET} s on this machine")
    assert ledger.sessions >= MIN_SESSIONS, ledger.sessions
    assert len(ledger.accepted) >= 10 and len(ledger.refused) >= 3, \
        (len(ledger.accepted), len(ledger.refused))

    # Every DATA reply was read before the next step, so runs are complete now.
    # A session the fuzzer abandoned is over once the server has logged its
    # end: a wrong run for it would have finished by then.
    assert wait_until(lambda: srv.log().count(": connected") ==
                      srv.log().count(": disconnected:")), "sessions still open"
    check_runs(srv, ledger)

    # Still serving, and nothing inside it broke.
    probe = Session(srv, require_tls, SESSIONS, ledger)
    probe.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
    try:
        assert probe.reply()[0] == 220
        assert probe.command(b"EHLO client.test\r\n", lambda: (250, None),
                             bare_codes=(250,))[0] == 250
        assert probe.command(b"NOOP\r\n", lambda: (250, None))[0] == 250
    finally:
        probe.sock.close()
    log = srv.log()
    assert "Traceback" not in log
    assert "internal error" not in log, [l for l in log.splitlines() if "internal error" in l]
    print(f"{ledger.sessions} sessions, {ledger.replies} replies, {len(ledger.accepted)} "
          f"delivered, {len(ledger.refused)} refused, {len(ledger.abandoned)} abandoned; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(ledger.events.items())))
