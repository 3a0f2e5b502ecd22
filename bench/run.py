#!/usr/bin/env python3
"""Benchmark runner: ssmtpd against aiosmtpd and go-smtp servers doing the same job.

For every load and every round, each server is started fresh, warmed up and
measured: ssmtpd, ssmtpd --workers 2 (the throughput load only), the go-smtp
server (bench/go_server, built once per run; left out with a note where Go or
go-smtp is not installed) and aiosmtpd, in that order, then reversed in the
next round, so drift of the machine (thermal, page cache, other tenants) hits
all alike.  Each figure is reported as the median over rounds and as the
median of the per-round paired ratios server / aiosmtpd.

    python3 bench/run.py            # full run: 3 rounds, about 4 minutes on 2 cores
    python3 bench/run.py --quick    # one round of smaller loads, about a minute
    python3 bench/run.py --logins   # logins/s with the scrypt auth program, cache on and off

Writes the results table to bench/RESULTS.md (see --out) and prints it; the
--logins mode writes its own section of that file and leaves the rest, and
a full run keeps the --logins section.
"""

import argparse
import datetime
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import loadgen  # noqa: E402

AUTH = os.path.join(HERE, "programs", "auth.sh")
PROCESS = os.path.join(HERE, "programs", "process.sh")
HOSTNAME = "bench.test"
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0

# The servers, in the order of odd rounds.  WORKERS2 runs the throughput load only.
SSMTPD, WORKERS2, GO, AIOSMTPD = "ssmtpd", "ssmtpd --workers 2", "go-smtp", "aiosmtpd"
SERVERS = [SSMTPD, WORKERS2, GO, AIOSMTPD]
BASELINE = AIOSMTPD  # every ratio is server / aiosmtpd, paired within a round

# The --logins mode: the shipped scrypt auth program (conf/auth-users, the
# command ssmtpd-auth-users of an installed ssmtpd), run by this Python
# directly rather than through a PATH lookup of python3 that may be a shim.
SCRYPT_AUTH = os.path.join(ROOT, "conf", "auth-users")
CACHE_TTL = 300
CACHED = f"ssmtpd --auth-cache-ttl {CACHE_TTL}"
CACHED_WORKERS2 = f"ssmtpd --workers 2 --auth-cache-ttl {CACHE_TTL}"
LOGIN_SERVERS = [SSMTPD, CACHED, CACHED_WORKERS2, GO]
LOGINS_HEADING = "## Logins: sessions/s with the scrypt auth program"

# The Go server: built in GOPATH mode from Debian's packaged sources
# (golang-github-emersion-go-smtp-dev, golang-github-emersion-go-sasl-dev).
GOPATH = "/usr/share/gocode"
GO_PACKAGES = {"go-smtp": "golang-github-emersion-go-smtp-dev",
               "go-sasl": "golang-github-emersion-go-sasl-dev"}


# --- /proc readings ------------------------------------------------------------------

def proc_cpu(pid: int):
    """(own, reaped children) CPU seconds of a process: utime+stime, cutime+cstime."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def worker_pids(pid: int) -> List[int]:
    """The workers of an ssmtpd --workers master: its direct children running
    Python (the programs are the workers' children, not the master's)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and comm.startswith("python"):
            out.append(int(entry))
    return sorted(out)


def proc_status(pid: int, key: str) -> int:
    """A Vm* line of /proc/PID/status, in octets."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Polls VmRSS while a load runs: a cross-check on VmHWM, and the fallback
    where clear_refs is not writable."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


# --- certificate -----------------------------------------------------------------------

def make_cert(directory: str):
    """A self-signed P-256 certificate for HOSTNAME; returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


# --- the Go server ---------------------------------------------------------------------

def build_go_server(workdir: str):
    """Build bench/go_server into workdir: (binary, versions) or (None, why not)."""
    go = shutil.which("go")
    if go is None:
        return None, "`go` not found (Debian: apt-get install golang-go)"
    missing = [pkg for name, pkg in GO_PACKAGES.items()
               if not os.path.isdir(os.path.join(GOPATH, "src", "github.com", "emersion", name))]
    if missing:
        return None, (f"go-smtp sources not under {GOPATH} "
                      f"(Debian: apt-get install {' '.join(missing)})")
    binary = os.path.join(workdir, "go_server")
    # The command of bench/README.md ("The go-smtp server").
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="",
               GOCACHE=os.path.join(workdir, "go-cache"))
    try:
        built = subprocess.run([go, "build", "-o", binary, "./bench/go_server"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"go build failed: {e}"
    if built.returncode != 0:
        tail = " ".join((built.stderr or built.stdout).strip().splitlines()[-3:])
        return None, f"go build failed: {tail}"
    found = {"go": "?"}
    try:
        found["go"] = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                                     env=env, timeout=30).stdout.strip().removeprefix("go") or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found["go-smtp"] = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", GO_PACKAGES["go-smtp"]],
            capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        found["go-smtp"] = "?"
    return binary, found


# --- the servers -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerUnderTest:
    """One server process, started fresh for each measurement.

    kind: "ssmtpd" (workers > 1 adds --workers), "aiosmtpd" or "go" (the
    binary built by build_go_server); name is the label in the results.
    """

    def __init__(self, name: str, workdir: str, cert: str, key: str, extra=(),
                 pythonpath: str = ROOT, kind: Optional[str] = None, workers: int = 1,
                 binary: Optional[str] = None, auth: str = AUTH):
        self.name = name
        self.auth = auth  # split on spaces by the Go server, shell-style by the others
        self.kind = kind or name
        self.pythonpath = pythonpath
        self.workdir = workdir
        self.cert, self.key = cert, key
        self.workers = workers
        self.binary = binary
        self.extra = list(extra) + (["--workers", str(workers)] if workers > 1 else [])
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.worker_pids: List[int] = []
        self._log = None

    def argv(self, port: int) -> List[str]:
        common = ["--bind", "127.0.0.1", "--port", str(port), "--hostname", HOSTNAME,
                  "--ssl-cert", self.cert, "--ssl-key", self.key,
                  "--auth", self.auth, "--process", PROCESS, "--log-level", "warning"]
        if self.kind == "ssmtpd":
            return ([sys.executable, "-m", "ssmtpd"] + common +
                    ["--auth-failure-delay", "0", "--max-connections", "5000",
                     "--max-connections-per-ip", "5000",
                     # The load generator logs in as one user: the per-user
                     # limits (docs/limits.md "Accounts and limits") would cut it short.
                     "--max-messages-per-user", "0", "--max-recipients-per-user", "0",
                     "--max-sessions-per-user", "0"] + self.extra)
        if self.kind == "go":
            return [self.binary] + common + self.extra
        return [sys.executable, os.path.join(HERE, "aiosmtpd_server.py")] + common + self.extra

    def start(self) -> "ServerUnderTest":
        self.port = free_port()
        env = dict(os.environ,
                   PYTHONPATH=self.pythonpath + os.pathsep + os.environ.get("PYTHONPATH", ""))
        label = "".join(c if c.isalnum() else "-" for c in self.name)
        self.log_path = os.path.join(self.workdir, f"{label}-{self.port}.log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(self.port), env=env, cwd=self.workdir,
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} "
                                   f"before listening:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    s.recv(512)  # the greeting: the server is really serving
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} not listening after {START_TIMEOUT}s")
                time.sleep(0.05)
        if self.workers > 1:
            while len(self.worker_pids) < self.workers:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name}: {len(self.worker_pids)} workers "
                                       f"after {START_TIMEOUT}s")
                time.sleep(0.05)
                self.worker_pids = worker_pids(self.pid)
            # The port answers as soon as one worker serves; give the others
            # time to import and start serving too.
            time.sleep(1.0)
        return self

    def cpu(self):
        """(server own, programs) CPU seconds so far: utime+stime of the server
        and of its workers; cutime+cstime of the process that reaps the programs
        (the workers, with --workers; never the master, whose children are the
        workers)."""
        if not self.worker_pids:
            return proc_cpu(self.pid)
        own, _ = proc_cpu(self.pid)
        programs = 0.0
        for pid in self.worker_pids:
            a, b = proc_cpu(pid)
            own += a
            programs += b
        return own, programs

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the loads -------------------------------------------------------------------------

def warm_up(srv: ServerUnderTest, opts) -> None:
    if opts.warmup > 0:
        r = loadgen.run_load("127.0.0.1", srv.port, min(10, opts.warmup), opts.warmup, opts.size,
                             processes=opts.processes, deadline=min(120, opts.deadline),
                             timeout=opts.socket_timeout, nodelay=opts.nodelay)
        if r["failures"]:
            print(f"  warning: warm-up failures on {srv.name}: {r['failures']}", file=sys.stderr)


def with_cpu(srv, load):
    """(load()'s result, (server CPU, programs' CPU) seconds it cost), or None for
    the CPU when a worker died or was replaced meanwhile: its CPU is lost, and
    the figures would lie (counted as a failure)."""
    own0, kids0 = srv.cpu()
    r = load()
    # Let the last program exits be reaped so their CPU shows as children's.
    time.sleep(0.3)
    if srv.worker_pids and worker_pids(srv.pid) != srv.worker_pids:
        r["failures"]["workers changed during the load"] = 1
        return r, None
    own1, kids1 = srv.cpu()
    return r, (own1 - own0, kids1 - kids0)


def load_throughput(srv, opts) -> Dict:
    r, cpu = with_cpu(srv, lambda: loadgen.run_load(
        "127.0.0.1", srv.port, opts.concurrency, opts.sessions, opts.size,
        messages=opts.messages, processes=opts.processes, deadline=opts.deadline,
        timeout=opts.socket_timeout, nodelay=opts.nodelay))
    n = max(r["accepted"], 1)
    r["client_ms_per_msg"] = r["client_cpu"] * 1000 / n
    if cpu is not None:
        r["server_ms_per_msg"] = cpu[0] * 1000 / n
        r["children_ms_per_msg"] = cpu[1] * 1000 / n
    return r


def load_latency(srv, opts) -> Dict:
    return loadgen.run_load("127.0.0.1", srv.port, 1, opts.latency_sessions, opts.size,
                            processes=1, deadline=opts.deadline, timeout=opts.socket_timeout,
                            nodelay=opts.nodelay)


def load_idle(srv, opts) -> Dict:
    baseline = proc_status(srv.pid, "VmRSS")
    hold = loadgen.IdleHold("127.0.0.1", srv.port, opts.idle, processes=opts.processes,
                            deadline=opts.deadline, timeout=opts.socket_timeout)
    try:
        time.sleep(1.0)  # let the server settle after the last handshake
        rss = proc_status(srv.pid, "VmRSS")
    finally:
        hold.release()
    return {"held": hold.held, "failures": hold.failures, "rss": rss, "baseline": baseline,
            "rss_delta": rss - baseline,
            "rss_per_conn": (rss - baseline) / hold.held if hold.held else None}


def load_big(srv, opts) -> Dict:
    baseline = proc_status(srv.pid, "VmRSS")
    have_hwm = reset_peak(srv.pid)
    sampler = RssSampler(srv.pid)
    try:
        r = loadgen.run_load("127.0.0.1", srv.port, opts.big_count, opts.big_count,
                             opts.big_size, processes=opts.processes,
                             deadline=opts.deadline, timeout=opts.socket_timeout * 2,
                             nodelay=opts.nodelay)
    finally:
        sampled = sampler.stop()
    peak = max(sampled, proc_status(srv.pid, "VmHWM")) if have_hwm else sampled
    r.update(baseline=baseline, peak=peak, peak_delta=peak - baseline,
             peak_source="VmHWM after clear_refs" if have_hwm else "VmRSS sampled every 10 ms")
    return r


LOADS = [("throughput", load_throughput), ("latency", load_latency),
         ("idle", load_idle), ("big", load_big)]


# --- the --logins mode -----------------------------------------------------------------

def make_users(workdir: str) -> str:
    """A users file holding the load generator's login, hashed by the shipped program."""
    path = os.path.join(workdir, "users")
    subprocess.run([sys.executable, SCRYPT_AUTH, "--users", path, "add", loadgen.USER],
                   input=(loadgen.PASSWORD + "\n").encode(), check=True, timeout=60,
                   stdout=subprocess.DEVNULL)
    return path


def load_logins(srv, opts) -> Dict:
    """Sessions of connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT: no message."""
    r, cpu = with_cpu(srv, lambda: loadgen.run_load(
        "127.0.0.1", srv.port, opts.concurrency, opts.sessions, 0, messages=0,
        processes=opts.processes, deadline=opts.deadline, timeout=opts.socket_timeout,
        nodelay=opts.nodelay))
    n = max(r["ok_sessions"], 1)
    r["sessions_per_s"] = r["ok_sessions"] / r["seconds"] if r["seconds"] > 0 else 0.0
    if cpu is not None:
        r["server_ms_per_session"] = cpu[0] * 1000 / n
        r["programs_ms_per_session"] = cpu[1] * 1000 / n
    return r


def run_logins(opts, workdir: str, cert: str, key: str, go_binary: Optional[str]) -> List[Dict]:
    users = make_users(workdir)
    auth = " ".join([sys.executable, SCRYPT_AUTH, "--users", users])
    if any(" " in part for part in (sys.executable, SCRYPT_AUTH, users)):
        raise SystemExit("--logins: a path with a space cannot be given to the Go server")
    servers = {
        SSMTPD: lambda: ServerUnderTest(SSMTPD, workdir, cert, key, kind="ssmtpd",
                                        pythonpath=opts.ssmtpd_path, auth=auth),
        CACHED: lambda: ServerUnderTest(CACHED, workdir, cert, key,
                                        ["--auth-cache-ttl", str(CACHE_TTL)], kind="ssmtpd",
                                        pythonpath=opts.ssmtpd_path, auth=auth),
        CACHED_WORKERS2: lambda: ServerUnderTest(
            CACHED_WORKERS2, workdir, cert, key, ["--auth-cache-ttl", str(CACHE_TTL)],
            kind="ssmtpd", pythonpath=opts.ssmtpd_path, workers=2, auth=auth),
        GO: lambda: ServerUnderTest(GO, workdir, cert, key, kind="go", binary=go_binary,
                                    auth=auth),
    }
    names = [name for name in LOGIN_SERVERS if name != GO or go_binary]
    results = []
    for i in range(opts.rounds):
        order = names if i % 2 == 0 else names[::-1]
        rnd: Dict = {"order": order}
        for name in order:
            srv = servers[name]().start()
            try:
                # Also fills the caches: the measured logins are all answered from them.
                warm_up(srv, opts)
                print(f"round {i + 1}/{opts.rounds}: logins on {name} ...", file=sys.stderr,
                      flush=True)
                r = load_logins(srv, opts)
            finally:
                srv.stop()
            rnd[(name, "logins")] = r
            shown = ("sessions_per_s", "p50", "server_ms_per_session", "programs_ms_per_session",
                     "failures")
            print(f"  {({k: r[k] for k in shown if k in r})}", file=sys.stderr, flush=True)
        results.append(rnd)
    return results


def logins_report(results: List[Dict], opts, started: datetime.datetime,
                  seconds: float) -> str:
    def med(name, key):
        return median([rnd.get((name, "logins"), {}).get(key) for rnd in results])

    measured = [name for name in LOGIN_SERVERS if any(name in rnd["order"] for rnd in results)]
    v = versions()
    v.update(opts.go_versions)
    out = [LOGINS_HEADING, "",
           f"- date: {started:%Y-%m-%d %H:%M} UTC, {len(results)} round(s), "
           f"{seconds / 60:.1f} min",
           f"- machine: {machine()}",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
           "- command: `" + " ".join(["python3 bench/run.py"] + opts.argv) + "`",
           f"- load: C={opts.concurrency}, {opts.sessions} sessions per server and round, "
           "each connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT (no message); one login "
           f"for all; {opts.processes} load generator processes",
           "- auth program: conf/auth-users (ssmtpd-auth-users: scrypt N=16384, r=8, p=1) "
           "for every server; the cached servers' caches filled by the warm-up "
           f"({opts.warmup} sessions), so every measured login is answered from them"]
    if opts.go_note:
        out.append(f"- {GO}: not measured: {opts.go_note}")
    out += ["", "Medians over the rounds (the servers' order reversed in every other round). "
            "Server own CPU = utime+stime of the server (and its workers); programs = "
            "cutime+cstime of the process that reaps the auth program.", "",
            "| server | sessions/s | session p50 | session p90 | server own CPU ms/session "
            "| auth program CPU ms/session |",
            "|---|---|---|---|---|---|"]
    for name in measured:
        out.append(f"| {name} | {fmt(med(name, 'sessions_per_s'))} "
                   f"| {fmt(None if med(name, 'p50') is None else med(name, 'p50') * 1000, ' ms')} "
                   f"| {fmt(None if med(name, 'p90') is None else med(name, 'p90') * 1000, ' ms')} "
                   f"| {fmt(med(name, 'server_ms_per_session'), '', 2)} "
                   f"| {fmt(med(name, 'programs_ms_per_session'), '', 2)} |")
    out += ["", "| round | server | sessions/s | failures |", "|---|---|---|---|"]
    for i, rnd in enumerate(results, 1):
        for name in rnd["order"]:
            r = rnd.get((name, "logins"), {})
            fails = ", ".join(f"{k} ×{n}" for k, n in sorted(r.get("failures", {}).items()))
            out.append(f"| {i} | {name} | {fmt(r.get('sessions_per_s'))} | {fails or 'none'} |")
    return "\n".join(out) + "\n"


# --- statistics and the table ----------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def paired_ratio(results, load, key, name=SSMTPD):
    """Median over rounds of name / aiosmtpd within each round, and the ratios."""
    ratios = []
    for rnd in results:
        a = rnd.get((name, load), {}).get(key)
        b = rnd.get((BASELINE, load), {}).get(key)
        if a is not None and b:
            ratios.append(a / b)
    return median(ratios), ratios


def fmt(x, unit="", digits=1):
    if x is None:
        return "—"
    return f"{x:.{digits}f}{unit}"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION}
    for mod in ("gevent", "greenlet", "aiosmtpd"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod)
        except Exception:  # not installed: say so in the table rather than fail
            out[mod] = "?"
    try:
        sys.path.insert(0, ROOT)
        import ssmtpd
        out["ssmtpd"] = ssmtpd.__version__
    except Exception:
        out["ssmtpd"] = "?"
    try:
        out["ssmtpd commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "ssmtpd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            out["ssmtpd commit"] += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        out["ssmtpd commit"] = "?"
    return out


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{model}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, "
            f"Linux {platform.release()}")


def report(results: List[Dict], opts, started: datetime.datetime, seconds: float) -> str:
    def med(name, load, key):
        return median([rnd.get((name, load), {}).get(key) for rnd in results])

    def scaled(x, scale, unit, digits):
        return fmt(None if x is None else x * scale, unit, digits)

    kib = opts.size / 1024
    rows = []

    def row(load_label, figure, load, key, scale, unit, digits, target, check, name=SSMTPD,
            with_go=True):
        """One line of the summary: `name` (ssmtpd or its --workers 2 variant),
        go-smtp and aiosmtpd, the paired ratios, and whether name meets the target."""
        a = med(name, load, key)
        ratio, _ = paired_ratio(results, load, key, name)
        go = med(GO, load, key) if with_go else None
        go_ratio = paired_ratio(results, load, key, GO)[0] if with_go else None
        base = med(BASELINE, load, key)
        met = "—" if ratio is None and a is None else ("yes" if check(a, ratio) else "**no**")
        rows.append(f"| {load_label} | {figure} | {scaled(a, scale, unit, digits)} "
                    f"| {scaled(go, scale, unit, digits)} | {scaled(base, scale, unit, digits)} "
                    f"| {fmt(ratio, '×', 2)} | {fmt(go_ratio, '×', 2)} | {target} | {met} |")

    def at_least(target):
        return lambda a, r: r is not None and r >= target

    def at_most(target):
        return lambda a, r: r is not None and r <= target

    per = f" × {opts.messages} messages" if opts.messages > 1 else ""
    throughput = f"C={opts.concurrency}, {opts.sessions} sessions{per}, {kib:g} KiB"
    row(throughput, "messages/s", "throughput", "messages_per_s", 1, "", 1, "≥ 1.65×",
        at_least(1.65))
    row(f"{throughput}, {WORKERS2}", "messages/s", "throughput", "messages_per_s", 1, "", 1,
        "≥ 1.9×", at_least(1.9), name=WORKERS2, with_go=False)
    row(f"C={opts.concurrency}", "server CPU ms/message (all processes, excluding the programs)",
        "throughput", "server_ms_per_msg", 1, " ms", 2, "≤ 0.47×", at_most(0.47))
    row(f"C=1, {opts.latency_sessions} sessions, {kib:g} KiB", "session p50 latency",
        "latency", "p50", 1000, " ms", 2, "≤ 0.70×", at_most(0.70))
    row(f"{opts.idle} idle connections after STARTTLS", "RSS added per connection", "idle",
        "rss_per_conn", 1 / 1024, " KiB", 1, "≤ 0.10×", at_most(0.10))
    row(f"{opts.big_count} messages of {opts.big_size / MIB:g} MiB (C={opts.big_count})",
        "peak RSS above idle baseline", "big", "peak_delta", 1 / MIB, " MiB", 1,
        "≤ 4 MiB (absolute)", lambda a, r: a is not None and a <= 4 * MIB)

    v = versions()
    v.update(opts.go_versions)
    measured = [name for name in SERVERS if any(name in rnd["order"] for rnd in results)]
    out = [
        "# Benchmark results",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {len(results)} round(s), {seconds / 60:.1f} min",
        f"- machine: {machine()}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- command: `" + " ".join(["python3 bench/run.py"] + opts.argv) + "`",
        f"- client: {opts.processes} worker processes of gevent greenlets, "
        f"{'pipelined MAIL/RCPT/DATA' if opts.pipelining else 'one command per round trip'}, "
        f"{opts.messages} message(s) per session"
        f"{', TCP_NODELAY' if opts.nodelay else ', Nagle on'}",
        f"- servers: {', '.join(measured)} ({WORKERS2}: the C={opts.concurrency} load only)",
    ]
    if opts.go_note:
        out.append(f"- {GO}: not measured: {opts.go_note}")
    out += [
        "",
        "Medians over the rounds; a *ratio* is the median of the per-round paired ratios "
        "server / aiosmtpd (same round, same machine state). *met* judges ssmtpd "
        f"(on the second line, {WORKERS2}) against the target; the aiosmtpd column of "
        "the second line repeats the first.",
        "",
        "| load | figure | ssmtpd | go-smtp | aiosmtpd | ssmtpd ratio | go-smtp ratio "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + rows
    failed = sorted({name for rnd in results for (name, load), r in
                     ((k, v) for k, v in rnd.items() if k != "order") if r.get("failures")})
    if failed:
        out += ["", f"**Some sessions failed on {', '.join(failed)}: the figures above are "
                    "not comparable; see the failures column below.**"]

    out += ["", "## CPU per message (C=%d load)" % opts.concurrency, "",
            "Server own = utime+stime of the server process (with --workers: of the master "
            "and every worker); programs = cutime+cstime of the process that reaps the auth "
            "and process programs (with --workers: the workers), including any work a "
            "forked child does before exec; client = the load generator's processes.", "",
            "| server | server own ms/msg | programs ms/msg | server + programs | client ms/msg |",
            "|---|---|---|---|---|"]
    for name in measured:
        own = med(name, "throughput", "server_ms_per_msg")
        kids = med(name, "throughput", "children_ms_per_msg")
        client = med(name, "throughput", "client_ms_per_msg")
        total = None if own is None or kids is None else own + kids
        out.append(f"| {name} | {fmt(own, '', 2)} | {fmt(kids, '', 2)} | {fmt(total, '', 2)} "
                   f"| {fmt(client, '', 2)} |")

    out += ["", "## Latency and memory details (medians)", "",
            "| figure | " + " | ".join(measured) + " |",
            "|---|" + "---|" * len(measured)]
    for label, load, key, scale, unit, digits in [
            (f"C={opts.concurrency} messages/s", "throughput", "messages_per_s", 1, "", 1),
            (f"C={opts.concurrency} session p50", "throughput", "p50", 1000, " ms", 1),
            (f"C={opts.concurrency} session p90", "throughput", "p90", 1000, " ms", 1),
            (f"C={opts.concurrency} session p99", "throughput", "p99", 1000, " ms", 1),
            ("C=1 session p50", "latency", "p50", 1000, " ms", 2),
            ("C=1 session p90", "latency", "p90", 1000, " ms", 2),
            ("C=1 session p99", "latency", "p99", 1000, " ms", 2),
            ("C=1 messages/s", "latency", "messages_per_s", 1, "", 1),
            ("RSS before the idle connections", "idle", "baseline", 1 / MIB, " MiB", 1),
            (f"RSS added by {opts.idle} idle connections", "idle", "rss_delta", 1 / MIB,
             " MiB", 1),
            ("RSS added per idle connection", "idle", "rss_per_conn", 1 / 1024, " KiB", 1),
            ("RSS before the big messages", "big", "baseline", 1 / MIB, " MiB", 1),
            ("peak RSS during the big messages", "big", "peak", 1 / MIB, " MiB", 1),
            ("big messages: seconds for all", "big", "seconds", 1, " s", 2)]:
        out.append(f"| {label} | " + " | ".join(
            scaled(med(name, load, key), scale, unit, digits) for name in measured) + " |")

    out += ["", "## Every round", "",
            "| round | server | msg/s | CPU own ms/msg | programs ms/msg | C=1 p50 ms "
            "| idle RSS MiB | big peak Δ MiB | failures |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, rnd in enumerate(results, 1):
        for name in rnd["order"]:
            t = rnd.get((name, "throughput"), {})
            lat = rnd.get((name, "latency"), {})
            idle = rnd.get((name, "idle"), {})
            big = rnd.get((name, "big"), {})
            fails = {}
            for load in ("throughput", "latency", "idle", "big"):
                for k, n in rnd.get((name, load), {}).get("failures", {}).items():
                    fails[f"{load}: {k}"] = fails.get(f"{load}: {k}", 0) + n
            out.append(
                f"| {i} | {name} | {fmt(t.get('messages_per_s'))} "
                f"| {fmt(t.get('server_ms_per_msg'), '', 2)} "
                f"| {fmt(t.get('children_ms_per_msg'), '', 2)} "
                f"| {scaled(lat.get('p50'), 1000, '', 2)} "
                f"| {scaled(idle.get('rss'), 1 / MIB, '', 1)} "
                f"| {scaled(big.get('peak_delta'), 1 / MIB, '', 1)} "
                f"| {', '.join(f'{k} ×{n}' for k, n in sorted(fails.items())) or 'none'} |")
    peak_sources = {rnd[(n, "big")]["peak_source"] for rnd in results for n in rnd["order"]
                    if (n, "big") in rnd}
    if peak_sources:
        out += ["", "Peak RSS measured as: " + "; ".join(sorted(peak_sources)) + "."]
    return "\n".join(out) + "\n"


# --- main ------------------------------------------------------------------------------

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one round of smaller loads (about a minute)")
    p.add_argument("--logins", action="store_true",
                   help="instead of the four loads: sessions/s of logins without a message, "
                        "with the scrypt auth program, ssmtpd with and without "
                        "--auth-cache-ttl beside go-smtp (--sessions: 600, quick 150)")
    p.add_argument("--rounds", type=int,
                   help="rounds, the servers' order reversed in every other one "
                        "(default 3, quick 1)")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--sessions", type=int, help="sessions of the throughput load (2000)")
    p.add_argument("--size", type=int, default=4096, help="message size in octets")
    p.add_argument("--messages", type=int, default=1, help="messages per session")
    p.add_argument("--latency-sessions", type=int, help="sessions of the C=1 load (200)")
    p.add_argument("--idle", type=int, help="idle connections held (1000)")
    p.add_argument("--big-size", type=int, default=20 * MIB, help="big message size")
    p.add_argument("--big-count", type=int, default=5, help="big messages, sent at once")
    p.add_argument("--warmup", type=int, default=50, help="warm-up sessions per server start")
    p.add_argument("--processes", type=int, default=2, help="load generator processes")
    p.add_argument("--pipelining", action="store_true",
                   help="pipeline MAIL/RCPT/DATA in the sessions (RFC 2920)")
    p.add_argument("--nagle", action="store_true",
                   help="leave Nagle's algorithm on in the client (default: TCP_NODELAY; "
                        "see bench/README.md, the go-smtp server)")
    p.add_argument("--loads", default="throughput,latency,idle,big",
                   help="comma-separated subset of: throughput,latency,idle,big")
    p.add_argument("--deadline", type=float, default=240.0,
                   help="seconds one load may take before it is cut off")
    p.add_argument("--aiosmtpd-child-watcher", choices=("pidfd", "threaded"), default="pidfd")
    p.add_argument("--ssmtpd-path", default=ROOT,
                   help="directory holding the ssmtpd package to measure (to compare a "
                        "modified copy against this checkout)")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"),
                   help="where to write the results table ('-' for nowhere)")
    opts = p.parse_args(argv)
    opts.argv = list(argv if argv is not None else sys.argv[1:])
    opts.nodelay = not opts.nagle
    opts.go_note, opts.go_versions = "", {}  # set by main once the Go server is built
    # A stalled server must cost a fraction of a load's deadline, not all of it.
    opts.socket_timeout = max(5.0, min(60.0, opts.deadline / 4))
    quick = opts.quick
    if opts.rounds is None:
        opts.rounds = 1 if quick else 3
    if opts.sessions is None and opts.logins:
        opts.sessions = 150 if quick else 600
    if opts.sessions is None:
        opts.sessions = 500 if quick else 2000
    if opts.latency_sessions is None:
        opts.latency_sessions = 50 if quick else 200
    if opts.idle is None:
        opts.idle = 1000
    opts.loads = [x.strip() for x in opts.loads.split(",") if x.strip()]
    unknown = set(opts.loads) - {name for name, _ in LOADS}
    if unknown:
        p.error(f"unknown load(s): {', '.join(sorted(unknown))}")
    return opts


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv=None) -> int:
    opts = parse(argv)
    raise_fd_limit(opts.idle * 2 + 1024)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="ssmtpd-bench-")
    results: List[Dict] = []
    try:
        cert, key = make_cert(workdir)
        go_binary, found = build_go_server(workdir)
        if go_binary is None:
            opts.go_note = found
            print(f"note: the {GO} server is left out of this run: {found}", file=sys.stderr,
                  flush=True)
        else:
            opts.go_versions = found
        if opts.logins:
            results = run_logins(opts, workdir, cert, key, go_binary)
            text = logins_report(results, opts, started, time.monotonic() - t0)
            publish(text, opts.out, section=True)
            return 0
        servers = {
            SSMTPD: lambda: ServerUnderTest(SSMTPD, workdir, cert, key, kind="ssmtpd",
                                            pythonpath=opts.ssmtpd_path),
            WORKERS2: lambda: ServerUnderTest(WORKERS2, workdir, cert, key, kind="ssmtpd",
                                              pythonpath=opts.ssmtpd_path, workers=2),
            GO: lambda: ServerUnderTest(GO, workdir, cert, key, kind="go", binary=go_binary),
            AIOSMTPD: lambda: ServerUnderTest(
                AIOSMTPD, workdir, cert, key, ["--child-watcher", opts.aiosmtpd_child_watcher],
                kind="aiosmtpd"),
        }
        names = [name for name in SERVERS if (name != GO or go_binary)
                 and (name != WORKERS2 or "throughput" in opts.loads)]
        for i in range(opts.rounds):
            order = names if i % 2 == 0 else names[::-1]
            rnd: Dict = {"order": order}
            for load_name, load in LOADS:
                if load_name not in opts.loads:
                    continue
                for name in order:
                    if name == WORKERS2 and load_name != "throughput":
                        continue
                    srv = servers[name]().start()
                    try:
                        warm_up(srv, opts)
                        print(f"round {i + 1}/{opts.rounds}: {load_name} on {name} ...",
                              file=sys.stderr, flush=True)
                        r = load(srv, opts)
                    finally:
                        srv.stop()
                    logged = srv.log_tail(200)
                    if "Traceback" in logged or "panic:" in logged:
                        print(f"  warning: a crash in {name}'s log:\n{srv.log_tail()}",
                              file=sys.stderr)
                    rnd[(name, load_name)] = r
                    summary = {k: r[k] for k in ("messages_per_s", "p50", "rss", "peak_delta",
                                                 "server_ms_per_msg", "children_ms_per_msg",
                                                 "failures") if k in r}
                    print(f"  {summary}", file=sys.stderr, flush=True)
            results.append(rnd)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    publish(report(results, opts, started, time.monotonic() - t0), opts.out)
    return 0


def publish(text: str, out: str, section: bool = False) -> None:
    """Print the report and write it to `out` ("-": print only).

    The --logins report (`section`) replaces its own section of the file and
    keeps the rest; a full run's report keeps the file's --logins section.
    """
    sys.stdout.write(text)
    if out == "-":
        return
    try:
        with open(out) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    at = old.find("\n" + LOGINS_HEADING)
    main_part, logins_part = (old, "") if at < 0 else (old[:at + 1], old[at + 1:])
    if section:
        new = (main_part.rstrip("\n") + "\n\n" if main_part.strip() else "") + text
    else:
        new = text + ("\n" + logins_part if logins_part else "")
    with open(out, "w") as f:
        f.write(new)


if __name__ == "__main__":
    sys.exit(main())
