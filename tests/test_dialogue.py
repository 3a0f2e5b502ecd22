"""Every tests/dialogues/*.txt script, played against a real server (docs/dialogue.md "The dialogue").

A script is one client connection.  Its first line is `# docs/dialogue.md "The dialogue": <what it
pins>`; an optional `# args: ...` line gives extra server options (scripts
with the same options share one server).  Other `#` lines and blank lines are
comments.  Steps:

    C: <text>        send text + CRLF
    C!: <bytes>      send exactly these bytes: a Python bytes literal, or
                     literals joined with `+` and repeated with `* <int>`
    S: <code> <pfx>  read one reply: every line has the code, the last line
                     is `<code> <pfx>...` (the first S: is the greeting)
    S~: <text>       some line of the last reply contains text
    S!~: <text>      no line of the last reply contains text
    TLS:             TLS handshake now (after `C: STARTTLS` / `S: 220`),
                     verifying the server against the test CA as mx.test
    CLOSED           the server closes within 5 s and sends nothing more

A script that does not end with CLOSED must end at a command boundary: the
runner then sends QUIT and insists the very next reply is 221, so a stray
reply nobody asked for fails the script.
"""

import ast
import glob
import os
import shlex
import socket
import ssl

import pytest

from conftest import HOSTNAME, ServerProcess, client_context

DIALOGUES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dialogues")
SCRIPTS = sorted(glob.glob(os.path.join(DIALOGUES, "*.txt")))
HEADER = '# docs/dialogue.md "The dialogue": '
REPLY_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
# Long enough for any line the scripts send, short enough to keep failures readable.
SHOWN = 160


class ScriptError(Exception):
    pass


# --- reading a script ---------------------------------------------------------

def _bytes_expr(node):
    """A bytes literal, `a + b` of such, or `a * n`: enough to write a long line readably."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, int)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _bytes_expr(node.left), _bytes_expr(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, bytes) and isinstance(right, bytes):
            return left + right
        if isinstance(node.op, ast.Mult) and isinstance(left, bytes) and isinstance(right, int):
            return left * right
    raise ScriptError(f"not a bytes expression: {ast.unparse(node)}")


def parse(path):
    """(args, [(lineno, tag, value)]) of one script."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if not lines[0].startswith(HEADER) or not lines[0][len(HEADER):].strip():
        raise ScriptError(f"{path}:1: first line must be '{HEADER}<what it pins>'")
    args, steps = (), []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if line.startswith("# args:"):
            args = tuple(shlex.split(line[len("# args:"):]))
            continue
        if not line.strip() or line.startswith("#"):
            continue
        if line == "CLOSED":
            steps.append((lineno, "CLOSED", None))
            continue
        tag, colon, rest = line.partition(":")
        if not colon or tag not in ("C", "C!", "S", "S~", "S!~", "TLS") \
                or (rest and not rest.startswith(" ")):
            raise ScriptError(f"{path}:{lineno}: cannot read step {line!r}")
        rest = rest[1:]
        try:
            if tag == "C!":
                value = _bytes_expr(ast.parse(rest, mode="eval").body)
                if not isinstance(value, bytes):
                    raise ScriptError("C! needs bytes")
            elif tag == "S":
                code, _, prefix = rest.partition(" ")
                if not (len(code) == 3 and code.isdigit()):
                    raise ScriptError(f"S: needs a 3-digit code, got {code!r}")
                value = (code, prefix)
            elif tag == "TLS":
                if rest:
                    raise ScriptError("TLS: takes nothing")
                value = None
            else:
                value = rest
        except (ScriptError, SyntaxError) as e:
            raise ScriptError(f"{path}:{lineno}: {e}") from None
        steps.append((lineno, tag, value))
    if not any(tag == "S" for _, tag, _ in steps):
        raise ScriptError(f"{path}: no S: step (not even the greeting)")
    return args, steps


# --- playing a script ------------------------------------------------------------

def _show(data: bytes) -> str:
    text = repr(data)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(data)} octets)"


class Player:
    def __init__(self, path, server):
        self.name = os.path.basename(path)
        self.server = server
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=REPLY_TIMEOUT)
        self.buf = b""
        self.transcript = []
        self.last = []
        self.lineno = 0

    def fail(self, message):
        shown = "\n".join(self.transcript) or "(nothing yet)"
        pytest.fail(f"{self.name}:{self.lineno}: {message}\n--- transcript ---\n{shown}",
                    pytrace=False)

    def _recv(self, what):
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            self.fail(f"no {what} within {self.sock.gettimeout()} s")
        except (ConnectionResetError, ssl.SSLError) as e:
            self.fail(f"connection broke while waiting for {what}: {e!r}")
        return data

    def send(self, data: bytes, shown: str):
        self.transcript.append(shown)
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.fail(f"send failed: {e!r}")

    def read_reply(self):
        lines = []
        while True:
            while b"\n" not in self.buf:
                data = self._recv("reply")
                if not data:
                    self.transcript.append("(server closed the connection)")
                    self.fail("connection closed while a reply was expected"
                              + (f"; partial reply {lines}" if lines else ""))
                self.buf += data
            raw, self.buf = self.buf.split(b"\n", 1)
            text = raw.decode("utf-8", "replace")
            self.transcript.append(f"S: {text.rstrip(chr(13))}")
            if not raw.endswith(b"\r"):
                self.fail("reply line not ended by CRLF")
            text = text[:-1]
            if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                self.fail(f"not an SMTP reply line: {text!r}")
            lines.append(text)
            if text[3:4] != "-":
                return lines

    def expect(self, code, prefix):
        lines = self.read_reply()
        self.last = lines
        for line in lines[:-1]:
            if not line.startswith(code + "-"):
                self.fail(f"expected every line to carry {code}, got {line!r}")
        last = lines[-1]
        if not (last == code or last.startswith(code + " ")):
            self.fail(f"expected {code} {prefix}".rstrip() + f", got {last!r}")
        if prefix and not last[4:].startswith(prefix):
            self.fail(f"expected {code} {prefix!r}..., got {last!r}")

    def starttls(self):
        if self.buf:
            self.fail(f"plaintext after the 220, before TLS: {_show(self.buf)}")
        try:
            self.sock = client_context(self.server.ca).wrap_socket(
                self.sock, server_hostname=HOSTNAME)
        except (ssl.SSLError, OSError) as e:
            self.fail(f"TLS handshake failed: {e!r}")
        self.transcript.append(f"TLS: {self.sock.version()} {self.sock.cipher()[0]}")

    def expect_closed(self):
        self.sock.settimeout(CLOSE_TIMEOUT)
        extra = self.buf
        while True:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                self.fail(f"connection still open after {CLOSE_TIMEOUT} s"
                          + (f"; got {_show(extra)}" if extra else ""))
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                break
            extra += data
        self.buf = b""
        if extra:
            self.fail(f"bytes before the close: {_show(extra)}")
        self.transcript.append("CLOSED")

    def play(self, steps):
        closed = False
        for self.lineno, tag, value in steps:
            if closed:
                self.fail(f"{tag} after CLOSED")
            if tag == "C":
                self.send(value.encode("utf-8") + b"\r\n", f"C: {value}")
            elif tag == "C!":
                self.send(value, f"C!: {_show(value)}")
            elif tag == "S":
                self.expect(*value)
            elif tag == "S~":
                if not any(value in line for line in self.last):
                    self.fail(f"no line of the last reply contains {value!r}")
            elif tag == "S!~":
                if any(value in line for line in self.last):
                    self.fail(f"a line of the last reply contains {value!r}")
            elif tag == "TLS":
                self.starttls()
            elif tag == "CLOSED":
                self.expect_closed()
                closed = True
        if not closed:
            self.lineno = "end"
            if self.buf:
                self.fail(f"unread bytes after the last step: {_show(self.buf)}")
            self.send(b"QUIT\r\n", "C: QUIT  (after the script)")
            self.expect("221", "")
            self.expect_closed()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- servers, one per distinct option set -------------------------------------------

@pytest.fixture(scope="module")
def servers(tmp_path_factory, certs):
    cache = {}

    def get(args):
        if args not in cache:
            srv = ServerProcess(str(tmp_path_factory.mktemp("dialogue")), certs, args)
            cache[args] = srv
            srv.start()
        return cache[args]

    yield get
    problems = []
    for args, srv in cache.items():
        if srv.proc is None:
            continue
        rc = srv.stop()
        log = srv.log()
        if rc != 0 or "Traceback" in log:
            problems.append(f"server {list(args)} exited {rc}:\n{log}")
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.basename(p) for p in SCRIPTS])
def test_dialogue(path, servers):
    """docs/dialogue.md "The dialogue": one dialogue script, as its header line says."""
    args, steps = parse(path)
    server = servers(args)
    # The log is shared with other scripts: blame only what this one added.
    seen = len(server.log())
    player = Player(path, server)
    try:
        player.play(steps)
    finally:
        player.close()
    added = server.log()[seen:]
    assert "Traceback" not in added, added


def test_scripts_exist():
    """docs/dialogue.md "The dialogue": the dialogue scripts are there to be played (an empty glob tests nothing)."""
    assert len(SCRIPTS) >= 40, SCRIPTS
