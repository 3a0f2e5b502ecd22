"""Test harness: a real ssmtpd process on a free loopback port, real TLS, real programs.

`server` is a default server shared by a test module; `make_server(...)` starts
one with other options.  Every server is stopped with SIGTERM at the end and must
exit 0 without a traceback in its log.
"""

import base64
import contextlib
import datetime
import glob
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = os.path.join(ROOT, "tests", "programs")
AUTH = os.path.join(PROGRAMS, "auth")
RECORD = os.path.join(PROGRAMS, "record")
HOSTNAME = "mx.test"
USER, PASSWORD = "alice", "secret"
# Bounds on waits for something that does happen, only slowly on a busy
# machine: generous, as a wait ends as soon as its condition holds.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
WAIT_TIMEOUT = 30.0



# A command block of the documentation that a test runs is marked, on the line
# before it (one blank line between), `<!-- tested: LABEL -->` (docs/development.md
# "These pages"); tests/test_docs.py checks that every such label is read here.
DOC_BLOCK = re.compile(r"^<!-- tested: (?P<label>[\w-]+) -->\n\n```\w*\n(?P<body>.*?)^```$",
                       re.M | re.S)


def docs_block(path: str, label: str) -> str:
    """The text of the block marked `<!-- tested: LABEL -->` in PATH (relative to the
    repository: README.md, docs/install.md, ...), as a reader would paste it."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    found = [m.group("body") for m in DOC_BLOCK.finditer(text) if m.group("label") == label]
    assert len(found) == 1, f"{path}: {len(found)} blocks marked tested: {label}"
    return found[0]


def installed_wheel(tmp) -> str:
    """The bin directory of a new virtualenv holding only ssmtpd's wheel, built
    from a copy of this checkout (other builds in it share its build/).  Its
    dependencies come from this Python's own packages (a path entry, not the
    network), without their .pth hooks, so the editable install of this
    checkout is not what it imports."""
    import sysconfig
    import venv
    source = os.path.join(tmp, "source")
    shutil.copytree(os.path.join(ROOT, "ssmtpd"), os.path.join(source, "ssmtpd"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source)
    wheels = os.path.join(tmp, "wheels")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            wheels, source], capture_output=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = glob.glob(os.path.join(wheels, "ssmtpd-*.whl"))
    env_dir = os.path.join(tmp, "venv")
    venv.create(env_dir, with_pip=True)
    bindir = os.path.join(env_dir, "bin")
    inner = subprocess.run([os.path.join(bindir, "python"), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(inner, "dependencies-of-the-tests.pth"), "w") as f:
        f.write("".join(path + "\n" for path in ours))
    done = subprocess.run([os.path.join(bindir, "python"), "-m", "pip", "install", "-q",
                           "--no-deps", "--no-index", wheel], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return bindir



def privileged_port() -> int:
    """A free loopback port below 1024 (only root may bind one), or skip."""
    for port in range(990, 700, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = START_TIMEOUT, proc=None,
                  host: str = "127.0.0.1", source: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5,
                                          source_address=(source, 0) if source else None):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


# --- certificates ------------------------------------------------------------

def make_certs(directory: str, names=("localhost", HOSTNAME), serial_cn="ssmtpd test"):
    """A CA and a leaf for `names` and 127.0.0.1; returns (ca, cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{serial_cn} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial_cn)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names]
                + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def two_certificates(directory: str):
    """For certificate reload tests: two CAs with a leaf each ("ssmtpd first",
    "ssmtpd second"), and live cert.pem/key.pem paths holding the first.

    Returns (first, second, cert, key); first and second are (ca, cert, key).
    """
    import shutil
    paths = []
    for name in ("first", "second", "live"):
        os.makedirs(os.path.join(directory, name), exist_ok=True)
        paths.append(os.path.join(directory, name))
    first = make_certs(paths[0], serial_cn="ssmtpd first")
    second = make_certs(paths[1], serial_cn="ssmtpd second")
    cert, key = os.path.join(paths[2], "cert.pem"), os.path.join(paths[2], "key.pem")
    shutil.copyfile(first[1], cert)
    shutil.copyfile(first[2], key)
    return first, second, cert, key


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def client_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = True
    return ctx


# --- the server process --------------------------------------------------------

class ServerProcess:
    """One ssmtpd subprocess and the directory its programs record into."""

    def __init__(self, workdir: str, certs, args=(), env=None, with_tls=True, defaults=True):
        self.workdir = workdir
        self.ca, self.cert, self.key = certs
        self.port = free_port()
        self.record_dir = os.path.join(workdir, "records")
        os.makedirs(self.record_dir, exist_ok=True)
        self.log_path = os.path.join(workdir, f"ssmtpd-{self.port}.log")
        argv = [sys.executable, "-m", "ssmtpd"]
        if defaults:
            argv += ["--bind", "127.0.0.1", "--port", str(self.port), "--hostname", HOSTNAME,
                     "--auth", AUTH, "--process", RECORD, "--auth-failure-delay", "0",
                     # Shared servers see many wrong passwords from 127.0.0.1;
                     # tests of the per-address count give their own limit.
                     "--max-auth-failures-per-ip", "1000000"]
            if with_tls:
                argv += ["--ssl-cert", self.cert, "--ssl-key", self.key]
        argv += list(args)
        self.argv = argv
        self.env = dict(os.environ, TEST_RECORD=self.record_dir,
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.env.update(env or {})
        self.proc = None

    def start(self, wait_port=None, wait_host="127.0.0.1"):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.workdir,
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        wait_for_port(wait_port or self.port, proc=self.proc, host=wait_host)
        return self

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout}s after SIGTERM")
        finally:
            self._log.close()
        return rc

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, needle: str, timeout: float = WAIT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in server log after {timeout}s:\n{self.log()}")

    # --- what the programs saw ---

    def runs(self, kind="run"):
        """Records of finished program runs, oldest first."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.record_dir, f"{kind}-*.json"))):
            with open(path) as f:
                out.append(json.load(f))
        return out

    def clear_runs(self) -> None:
        for path in glob.glob(os.path.join(self.record_dir, "*.json")):
            os.unlink(path)

    # --- clients ---

    def smtp(self, timeout=10) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                            timeout=timeout)

    def tls_context(self) -> ssl.SSLContext:
        ctx = client_context(self.ca)
        ctx.check_hostname = False  # we connect to 127.0.0.1 but the name is mx.test
        return ctx

    def login(self, user=USER, password=PASSWORD, timeout=10) -> smtplib.SMTP:
        """smtplib through EHLO, STARTTLS, EHLO and AUTH."""
        s = self.smtp(timeout)
        s.ehlo()
        s.starttls(context=self.tls_context())
        s.ehlo()
        s.login(user, password)
        return s

    def raw(self, timeout=10) -> "Raw":
        return Raw(socket.create_connection(("127.0.0.1", self.port), timeout=timeout))


class Raw:
    """A raw-socket SMTP client for exact byte sequences."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, data) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, line: str):
        self.send(line + "\r\n")
        return self.reply()

    def reply(self):
        """(code, [lines]) of one possibly multi-line reply; (None, []) at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return (None, lines)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return (int(text[:3]), lines)

    def starttls(self, ctx: ssl.SSLContext) -> None:
        code, _ = self.cmd("STARTTLS")
        assert code == 220
        self.sock = ctx.wrap_socket(self.sock, server_hostname=HOSTNAME)
        self.buf = b""

    def hello(self, ctx) -> None:
        """Greeting, EHLO, STARTTLS, EHLO: ready for AUTH."""
        assert self.reply()[0] == 220
        assert self.cmd("EHLO client.test")[0] == 250
        self.starttls(ctx)
        assert self.cmd("EHLO client.test")[0] == 250

    def login(self, ctx, user=USER, password=PASSWORD) -> None:
        """EHLO, STARTTLS, EHLO, AUTH PLAIN: the usual start of a submission."""
        self.hello(ctx)
        token = plain_token(user, password)
        code, lines = self.cmd(f"AUTH PLAIN {token}")
        assert code == 235, lines

    def start_data(self, sender="sender@example.org", rcpts=("rcpt@example.org",)) -> None:
        """MAIL, each RCPT and DATA, each answered as a transaction expects."""
        code, lines = self.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, lines
        for rcpt in rcpts:
            code, lines = self.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, lines
        code, lines = self.cmd("DATA")
        assert code == 354, lines

    def send_message(self, body=b"Subject: t\r\n\r\nhello\r\n", sender="sender@example.org",
                     rcpts=("rcpt@example.org",), read_reply=True):
        """A whole transaction; `body` is sent as is (already stuffed), then the final dot."""
        self.start_data(sender, rcpts)
        self.send(body.encode() if isinstance(body, str) else body)
        self.send(b".\r\n")
        return self.reply() if read_reply else None

    def closed(self, timeout=5.0) -> bool:
        """True when the server closed the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def submit_self_signed(port: int, user: str, password: str) -> None:
    """smtplib: STARTTLS without verifying (the server's self-signed certificate),
    AUTH, one message from alice@example.org to bob@example.org."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=ctx)
        s.login(user, password)
        s.sendmail("alice@example.org", ["bob@example.org"], b"Subject: hi\r\n\r\nhi\r\n")


def plain_token(user=USER, password=PASSWORD, authzid="") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@pytest.fixture
def make_server(tmp_path, certs):
    """Factory: make_server(*args, env=..., with_tls=True) -> started ServerProcess."""
    started = []

    def factory(*args, env=None, with_tls=True, defaults=True, start=True):
        srv = ServerProcess(str(tmp_path / f"srv{len(started)}"), certs, args, env,
                            with_tls, defaults)
        os.makedirs(srv.workdir, exist_ok=True)
        started.append(srv)
        return srv.start() if start else srv

    yield factory
    for srv in started:
        if srv.proc is not None:
            running = srv.proc.poll() is None
            rc = srv.stop()
            if running:
                assert rc == 0, f"server exit status {rc}:\n{srv.log()}"
            assert "Traceback" not in srv.log(), srv.log()


def shared_by_the_module(srv: "ServerProcess"):
    """A module fixture's body: `srv` (started) for the module's tests, then
    stopped, cleanly (exit 0) and without a traceback."""
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


def lent_to_one_test(srv: "ServerProcess"):
    """A test fixture's body: the module's server with its run records emptied,
    and no traceback in its log after the test."""
    srv.clear_runs()
    yield srv
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory, certs):
    yield from shared_by_the_module(
        ServerProcess(str(tmp_path_factory.mktemp("server")), certs).start())


@pytest.fixture
def server(module_server):
    """The shared default server, with its run records emptied for this test."""
    yield from lent_to_one_test(module_server)


def stop_process(proc, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def shared_tmp_dir(prefix: str, mode: int):
    """A directory under /tmp that other users (nobody, postfix) can reach:
    pytest's own temporary directories are root's alone."""
    import tempfile
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate, timeout=WAIT_TIMEOUT, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
