"""SIGUSR2 upgrades in place (docs/operations.md "Upgrading in place (SIGUSR2)").

The server runs from a copy of the package in a directory of the test's own
(first in PYTHONPATH), as version OLD; its greeting names the version that
serves, so every session says which code it met.  "Installing" NEW puts
another copy in its place by renaming, as pip replaces the files of an
installed package: the running processes keep what they imported.  The test
under supervisord installs real wheels into a virtualenv with pip.
"""

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import (AUTH, HOSTNAME, RECORD, ROOT, Raw, ServerProcess, free_port,
                      installed_wheel, plain_token, stop_process, wait_for_port, wait_until)
from test_deploy import SUPERVISOR_MAIN, example_with_paths
from test_metrics import scrape, value
from test_reload import Load, check_sessions, generation_of_a_message, write_ini

OLD, NEW = "7.0.0", "7.0.1"
UPGRADED = f"upgraded from {OLD} to {NEW}"
# The line after which new sessions are the new code's: the hand-over.
HANDED_OVER = re.compile(rf"^(\S+) INFO upgrade: (?:a worker|\d+ workers) of ssmtpd "
                         rf"{re.escape(NEW)} ", re.M)


# A copy whose workers die as they start, though the master's checks pass.
WORKERS_DIE = """
_spec_from_env = worker_spec_from_env


def worker_spec_from_env():
    if os.environ.get(WORKER_ENV):
        os._exit(3)
    return _spec_from_env()
"""


def code_copy(dest: str, version: str, broken: str = "") -> None:
    """The package as `version` in dest/ssmtpd, its greeting naming that version;
    `broken`: "start" (it does not start at all), "workers" (its workers die)."""
    tree = os.path.join(dest, "ssmtpd")
    shutil.copytree(os.path.join(ROOT, "ssmtpd"), tree,
                    ignore=shutil.ignore_patterns("__pycache__"))
    edit(os.path.join(tree, "__init__.py"), r'__version__ = "[^"]*"', f'__version__ = "{version}"')
    edit(os.path.join(tree, "replies.py"), r'ESMTP ssmtpd"', f'ESMTP ssmtpd {version}"')
    if broken == "start":
        with open(os.path.join(tree, "cli.py"), "a") as f:
            f.write("\nthis is not Python\n")
    elif broken == "workers":
        with open(os.path.join(tree, "arbiter.py"), "a") as f:
            f.write(WORKERS_DIE)


def edit(path: str, pattern: str, replacement: str) -> None:
    with open(path) as f:
        text = f.read()
    changed, count = re.subn(pattern, replacement, text)
    assert count == 1, (path, pattern)
    with open(path, "w") as f:
        f.write(changed)


def install(site: str, version: str, broken: str = "") -> None:
    """Replace the package in `site` by `version`, by renames."""
    staging = tempfile.mkdtemp(dir=site)
    code_copy(staging, version, broken)
    current = os.path.join(site, "ssmtpd")
    if os.path.exists(current):
        os.rename(current, os.path.join(staging, "replaced"))
    os.rename(os.path.join(staging, "ssmtpd"), current)


def upgradable(tmp_path, certs, *args, **ini) -> ServerProcess:
    """A server of version OLD from its own copy, with the ini of test_reload."""
    site = str(tmp_path / "site")
    os.mkdir(site)
    install(site, OLD)
    srv = ServerProcess(str(tmp_path / "srv"), certs, defaults=False, env={"PYTHONPATH": site})
    srv.site = site
    srv.ini_path = os.path.join(srv.workdir, "ssmtpd.ini")
    write_ini(srv.ini_path, 0, **ini)
    srv.argv += ["--bind", "127.0.0.1", "--port", str(srv.port), "--hostname", HOSTNAME,
                 "--ssl-cert", srv.cert, "--ssl-key", srv.key, "-c", srv.ini_path, *args]
    srv.start()
    workers = ini.get("workers", 1)
    if workers > 1:
        assert wait_until(lambda: srv.log().count("accepting on") == workers), srv.log()
    return srv


def stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def check_codes(load, handed_over: float) -> None:
    """Sessions greeted before the hand-over met OLD; those begun after it, NEW."""
    slack = 0.005  # the log's milliseconds
    new = old = 0
    for sender, began, greeted, _ in load.sessions:
        greeting = load.greetings[sender]
        if began > handed_over + slack:
            assert greeting.endswith(f"ssmtpd {NEW}"), (sender, greeting)
            new += 1
        elif greeted < handed_over - slack:
            assert greeting.endswith(f"ssmtpd {OLD}"), (sender, greeting)
            old += 1
    assert new and old, (new, old)


def greeting(srv) -> str:
    raw = srv.raw(timeout=30)
    try:
        return raw.reply()[1][-1]
    finally:
        raw.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_under_load_loses_nothing(tmp_path, certs, workers):
    """docs/operations.md "Upgrading in place (SIGUSR2)": SIGUSR2 under a steady load of 10 clients,
    after the package was replaced by another version: no session fails or is
    refused, every message runs once, sessions after the hand-over meet the new
    code and those before it the old; the PID stays, the log says `upgraded from X
    to Y`; a SIGUSR2 that reaches a worker is logged and ignored."""
    srv = upgradable(tmp_path, certs, "--max-connections-per-ip", "1000",
                     "--max-sessions-per-user", "0", "--max-messages-per-user", "0",
                     "--max-recipients-per-user", "0", workers=workers)
    try:
        assert greeting(srv).endswith(f"ssmtpd {OLD}")
        with Load(srv) as load:
            time.sleep(1)
            if workers > 1:
                # pkill -USR2 reaches the workers too.
                for pid in re.findall(r"worker \d+ \(pid (\d+)\) started", srv.log()):
                    os.kill(int(pid), signal.SIGUSR2)
                assert wait_until(lambda: srv.log().count("SIGUSR2 to worker") == workers)
            install(srv.site, NEW)
            srv.signal(signal.SIGUSR2)
            srv.wait_log(UPGRADED, timeout=90)
            time.sleep(1)
        log = srv.log()
        assert re.search(rf"INFO ssmtpd {NEW} master {srv.proc.pid}: listening", log), log
        assert srv.proc.poll() is None
        check_sessions(srv, load.sessions, [])
        (handed_over,) = HANDED_OVER.findall(log)
        check_codes(load, stamp(handed_over))
        assert greeting(srv).endswith(f"ssmtpd {NEW}")
        warnings = [line for line in log.splitlines() if " WARNING " in line
                    and "SIGUSR2 to worker" not in line and "running as root" not in line]
        assert "ERROR" not in log and not warnings, warnings or log[-3000:]
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_keeps_the_counts(tmp_path, certs, workers):
    """docs/operations.md "Upgrading in place (SIGUSR2)": the failed-login count of an address and the
    messages of a user are whole after an upgrade: a blocked address stays blocked,
    a user at the limit stays there; with --workers, a session open in an old worker
    still holds its address's slot."""
    mport = free_port()
    srv = upgradable(tmp_path, certs, "--max-auth-failures-per-ip", "2",
                     "--max-messages-per-user", "2/1h", "--max-connections-per-ip", "1",
                     "--metrics-bind", f"127.0.0.1:{mport}", workers=workers)
    ctx = srv.tls_context()

    def from_address(ip):
        return Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                            source_address=(ip, 0)))
    try:
        # One connection each: with one slot per address, a second one could come
        # before the server has let go of the first.
        raw = from_address("127.0.0.2")
        raw.hello(ctx)
        for _ in range(2):
            assert raw.cmd(f"AUTH PLAIN {plain_token(password='wrong')}")[0] == 535
        raw.close()
        for n in range(2):
            raw = from_address(f"127.0.0.{5 + n}")
            raw.login(ctx)
            assert raw.send_message(sender=f"m{n}@example.org")[0] == 250
            raw.close()
        assert value(scrape(mport), "ssmtpd_messages_total", code="250") == 2
        holder = None
        if workers > 1:
            holder = from_address("127.0.0.4")
            holder.login(ctx)
        install(srv.site, NEW)
        srv.signal(signal.SIGUSR2)
        srv.wait_log(UPGRADED, timeout=90)
        raw = from_address("127.0.0.2")
        raw.hello(ctx)
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert (code, lines[-1][4:9]) == (421, "4.7.0"), lines
        raw.close()
        raw = from_address("127.0.0.3")
        code, lines = raw.reply()
        assert lines[-1].endswith(f"ssmtpd {NEW}")
        raw.cmd("EHLO client.test")
        raw.starttls(ctx)
        raw.cmd("EHLO client.test")
        assert raw.cmd(f"AUTH PLAIN {plain_token()}")[0] == 235
        code, lines = raw.cmd("MAIL FROM:<m2@example.org>")
        assert (code, lines[-1][4:9]) == (450, "4.7.1"), lines
        raw.close()
        if holder is not None:
            second = from_address("127.0.0.4")
            code, lines = second.reply()
            assert code == 421 and "address" in lines[-1], lines
            second.close()
            assert holder.cmd("NOOP")[0] == 250  # its old worker still serves it
            holder.close()
        # The same socket serves /metrics; with --workers the counts go on, with one
        # process they start again from the worker's.
        assert value(scrape(mport), "ssmtpd_messages_total", code="250") == (
            2 if workers > 1 else 0)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_refused_upgrade_changes_nothing(tmp_path, certs, workers):
    """docs/operations.md "Upgrading in place (SIGUSR2)": SIGUSR2 when the installed code does not
    start is one ERROR line; the running code goes on serving, no worker starts."""
    srv = upgradable(tmp_path, certs, workers=workers)
    try:
        started = srv.log().count(") started")
        install(srv.site, NEW, broken="start")
        srv.signal(signal.SIGUSR2)
        line = srv.wait_log("upgrade refused")
        assert "the installed code does not start" in line.split("upgrade refused", 1)[1]
        assert greeting(srv).endswith(f"ssmtpd {OLD}")
        assert generation_of_a_message(srv) == 0
        log = srv.log()
        assert log.count("ERROR") == 1, log
        assert log.count(") started") == started and "upgraded" not in log
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_during_an_upgrade_is_queued(tmp_path, certs, workers):
    """docs/operations.md "Upgrading in place (SIGUSR2)": a SIGHUP that comes while an upgrade is under
    way is neither lost nor applied to half the server: once the upgrade is done the
    configuration is read again, and a message runs the program it names."""
    srv = upgradable(tmp_path, certs, workers=workers)
    try:
        install(srv.site, NEW)
        srv.signal(signal.SIGUSR2)
        srv.wait_log("SIGUSR2: checking the installed code")
        write_ini(srv.ini_path, 1, workers=workers)
        srv.signal(signal.SIGHUP)
        srv.wait_log(UPGRADED, timeout=90)
        assert wait_until(lambda: re.search(rf"{UPGRADED}.*INFO reload: \d+ workers accept",
                                            srv.log(), re.S), timeout=90), srv.log()[-3000:]
        assert generation_of_a_message(srv) == 1
        assert "ERROR" not in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def upgrade_with_a_session_open(srv):
    """A logged-in session, then SIGUSR2 once NEW is installed: (the session, the
    log once the one process has handed over and drains)."""
    raw = srv.raw(timeout=30)
    raw.login(srv.tls_context())
    install(srv.site, NEW)
    srv.signal(signal.SIGUSR2)
    return raw, srv.wait_log("sessions here drain")


def test_one_process_drains_its_sessions_before_it_goes_on(tmp_path, certs):
    """docs/operations.md "Upgrading in place (SIGUSR2)": with one process, a session open at SIGUSR2
    goes on with the old code (a whole message) and gets 421 4.3.2 at
    --graceful-timeout; only then does the process go on as the new master."""
    srv = upgradable(tmp_path, certs, "--graceful-timeout", "2", "--timeout", "60")
    try:
        raw, log = upgrade_with_a_session_open(srv)
        handed_over = stamp(HANDED_OVER.findall(log)[0])
        assert UPGRADED not in log
        assert raw.send_message(sender="old@example.org")[0] == 250
        code, lines = raw.reply()
        assert (code, lines[-1][4:9]) == (421, "4.3.2"), lines
        assert 1.0 <= time.time() - handed_over <= 10.0
        srv.wait_log(UPGRADED, timeout=30)
        (run,) = srv.runs()
        assert run["ppid"] == srv.proc.pid  # the old code's own process ran it
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


# --- under supervisord, with pip -----------------------------------------------------

def wheel_of(tmp: str, version: str) -> str:
    """A wheel of the package as `version` (its greeting naming it)."""
    source = os.path.join(tmp, f"source-{version}")
    code_copy(source, version)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source)
    wheels = os.path.join(tmp, f"wheels-{version}")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            wheels, source], capture_output=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = os.listdir(wheels)
    return os.path.join(wheels, wheel)


def pip_install(bindir: str, wheel: str) -> None:
    done = subprocess.run([os.path.join(bindir, "python"), "-m", "pip", "install", "-q",
                           "--no-deps", "--no-index", "--force-reinstall", wheel],
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_under_supervisord(tmp_path, certs, workers):
    """docs/operations.md "Upgrading in place (SIGUSR2)": under supervisord with the shipped example,
    `pip install` of another version into the server's virtualenv, then
    `supervisorctl signal USR2`: supervisord shows the same PID RUNNING, the log says
    `upgraded from X to Y`, the load sees no failed session, new sessions meet the
    new code."""
    supervisord, supervisorctl = shutil.which("supervisord"), shutil.which("supervisorctl")
    if not (supervisord and supervisorctl):
        pytest.fail("supervisor is not installed (.ci/run installs Debian's supervisor)")
    tmp = str(tmp_path)
    bindir = installed_wheel(os.path.join(tmp, "venv-build"))
    pip_install(bindir, wheel_of(tmp, OLD))
    new_wheel = wheel_of(tmp, NEW)
    port = free_port()
    ini = os.path.join(tmp, "ssmtpd.ini")
    records = os.path.join(tmp, "records")
    os.mkdir(records)
    with open(ini, "w") as f:
        f.write(f"[ssmtpd]\nbind = 127.0.0.1\nport = {port}\nhostname = {HOSTNAME}\n"
                f"auth = {AUTH}\nprocess = {RECORD} gen-0\nssl-cert = {certs[1]}\n"
                f"ssl-key = {certs[2]}\nauth-failure-delay = 0\nworkers = {workers}\n"
                "max-connections-per-ip = 1000\nmax-sessions-per-user = 0\n"
                "max-messages-per-user = 0\nmax-recipients-per-user = 0\n")
    config = os.path.join(tmp, "supervisord.conf")
    with open(config, "w") as f:
        f.write(SUPERVISOR_MAIN.format(tmp=tmp)
                + example_with_paths(tmp, tmp, ini, os.path.join(bindir, "ssmtpd"), "root"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TEST_RECORD"] = records
    proc = subprocess.Popen([supervisord, "-c", config], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(*args):
        return subprocess.run([supervisorctl, "-c", config, *args], capture_output=True,
                              text=True, timeout=120)

    def log():
        with open(os.path.join(tmp, "ssmtpd.log"), errors="replace") as f:
            return f.read()

    class Served:  # what Load and check_sessions ask of a server
        def __init__(self):
            self.port = port

        def tls_context(self):
            from conftest import client_context
            return client_context(certs[0])

        def runs(self):
            import glob
            import json
            out = []
            for path in sorted(glob.glob(os.path.join(records, "run-*.json"))):
                with open(path) as f:
                    out.append(json.load(f))
            return out

    try:
        wait_for_port(port, timeout=30, proc=proc)
        if workers > 1:
            assert wait_until(lambda: log().count("accepting on") == workers), log()
        pid = ctl("pid", "ssmtpd").stdout.strip()
        assert pid.isdigit(), pid
        served = Served()
        with Load(served) as load:
            time.sleep(1)
            pip_install(bindir, new_wheel)
            assert ctl("signal", "USR2", "ssmtpd").returncode == 0
            assert wait_until(lambda: UPGRADED in log(), timeout=90), log()[-3000:]
            time.sleep(1)
        status = ctl("status", "ssmtpd").stdout
        assert re.search(rf"ssmtpd\s+RUNNING\s+pid {pid},", status), status
        assert ctl("pid", "ssmtpd").stdout.strip() == pid
        check_sessions(served, load.sessions, [])
        (handed_over,) = HANDED_OVER.findall(log())
        check_codes(load, stamp(handed_over))
        assert "ERROR" not in log() and "Traceback" not in log(), log()[-3000:]
        assert ctl("stop", "ssmtpd").returncode == 0
        assert "all workers stopped" in log()
    finally:
        stop_process(proc, timeout=60)


def server_processes(port: int):
    """Pids of every process serving `port` (a master, its workers, the one process)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"ssmtpd" in argv and str(port).encode() in argv:
                found.append(int(pid))
    return found


@pytest.mark.parametrize("stage", ["checking", "handed over"])
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_an_upgrade_stops_the_whole_server(tmp_path, certs, workers, stage):
    """docs/operations.md "Upgrading in place (SIGUSR2)": a SIGTERM that comes while the installed code
    is checked, or just as the new code takes over, is not lost: the server stops,
    exit 0, and no process of it is left behind."""
    srv = upgradable(tmp_path, certs, workers=workers)
    try:
        install(srv.site, NEW)
        srv.signal(signal.SIGUSR2)
        if stage == "checking":
            srv.wait_log("SIGUSR2: checking the installed code")
        else:
            assert wait_until(lambda: HANDED_OVER.search(srv.log()), timeout=90), srv.log()
        srv.signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.log()[-3000:]
        assert wait_until(lambda: not server_processes(srv.port), timeout=30), \
            server_processes(srv.port)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_whose_workers_die_is_given_up(tmp_path, certs, workers):
    """docs/operations.md "Upgrading in place (SIGUSR2)": installed code that passes
    the checks but whose workers die as they start: one ERROR line, the old code goes
    on serving (and reloading), nothing is left half-upgraded."""
    srv = upgradable(tmp_path, certs, workers=workers)
    try:
        install(srv.site, NEW, broken="workers")
        srv.signal(signal.SIGUSR2)
        srv.wait_log("upgrade refused", timeout=90)
        assert "did not become ready" in srv.log() or "before it was ready" in srv.log()
        assert greeting(srv).endswith(f"ssmtpd {OLD}")
        assert generation_of_a_message(srv) == 0
        assert UPGRADED not in srv.log()
        write_ini(srv.ini_path, 1, workers=workers)
        srv.clear_runs()
        if workers > 1:
            # The old code's workers, back in place, reload as before.
            install(srv.site, OLD)
        srv.signal(signal.SIGHUP)
        assert wait_until(lambda: re.search(r"INFO reload: .*changed: --process", srv.log()),
                          timeout=90), srv.log()[-3000:]
        assert generation_of_a_message(srv) == 1
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log()


def test_one_process_replaces_a_worker_that_dies_while_it_drains(tmp_path, certs):
    """docs/operations.md "Upgrading in place (SIGUSR2)": with one process, the new
    worker is what accepts while the old sessions drain; if it dies, another takes
    its place, and new clients are served."""
    srv = upgradable(tmp_path, certs, "--graceful-timeout", "60", "--timeout", "60")
    try:
        raw, log = upgrade_with_a_session_open(srv)
        (first,) = re.findall(r"worker 1 \(pid (\d+)\) started", log)
        os.kill(int(first), signal.SIGKILL)
        srv.wait_log("starting another")
        assert wait_until(lambda: len(re.findall(r"worker 1 \(pid \d+\) started",
                                                 srv.log())) == 2, timeout=60)
        assert greeting(srv).endswith(f"ssmtpd {NEW}")
        srv.clear_runs()
        assert generation_of_a_message(srv) == 0
        assert raw.cmd("QUIT")[0] == 221  # the old session, still in the old process
        srv.wait_log(UPGRADED, timeout=60)
        assert srv.log().count(") started") == 2
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_one_process_reloads_after_a_refused_upgrade(tmp_path, certs):
    """docs/operations.md "Upgrading in place (SIGUSR2)": a SIGHUP that waited for an
    upgrade is applied when the upgrade is refused."""
    srv = upgradable(tmp_path, certs)
    try:
        install(srv.site, NEW, broken="workers")
        srv.signal(signal.SIGUSR2)
        srv.wait_log("worker 1 (pid")
        write_ini(srv.ini_path, 1)
        srv.signal(signal.SIGHUP)
        srv.wait_log("upgrade refused", timeout=90)
        assert wait_until(lambda: re.search(r"INFO reload: .*changed: --process", srv.log()),
                          timeout=30), srv.log()[-3000:]
        assert generation_of_a_message(srv) == 1
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.mark.parametrize("given", ["garbage", "unsealed"])
def test_a_forged_hand_over_is_refused(tmp_path, given):
    """docs/security.md: a master started with an SSMTPD_UPGRADE that an upgrading
    master did not write (not its JSON, or counts in a file anyone could have
    written) refuses to start: one line, exit 2, nothing bound."""
    import json
    env = dict(os.environ, PYTHONPATH=ROOT)
    pass_fds = ()
    if given == "garbage":
        env["SSMTPD_UPGRADE"] = "{not json"
    else:
        path = tmp_path / "counts.json"
        path.write_text(json.dumps({"counts": {}, "settings": "{}", "holdings": []}))
        fd = os.open(path, os.O_RDONLY)
        pass_fds = (fd,)
        env["SSMTPD_UPGRADE"] = json.dumps({
            "version": OLD, "listeners": [], "metrics_socket": None, "metrics_dir": None,
            "workers": [], "reload_wanted": False, "upgrade_wanted": False, "sealed": fd})
    result = subprocess.run([sys.executable, "-m", "ssmtpd", "--port", str(free_port())],
                            env=env, capture_output=True, text=True, timeout=60,
                            pass_fds=pass_fds)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ssmtpd: ") and len(result.stderr.splitlines()) == 1, \
        result.stderr
    assert ("not what an upgrading master" in result.stderr if given == "garbage"
            else "not a sealed memfd" in result.stderr or "not sealed" in result.stderr)
