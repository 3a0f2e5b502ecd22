"""--user/--group: bind as root, then serve as someone else (docs/deploying.md "Deploying").

Run as root, as CI does: the server binds a port below 1024, switches to
nobody, and the programs it starts run as nobody.  Everything the switched
server and its programs touch lives in a directory nobody may use.

What the service user's other processes (the programs among them) must not
reach: the server's memory, descriptors and environment, the worker state
the master hands over, and the capability to bind ports below 1024.  Those
tests run the server as a throwaway dedicated user, as docs/deploying.md "Deploying"
creates one, and look at it as that user.
"""

import errno
import fcntl
import grp
import json
import os
import pickle
import pwd
import re
import select
import shutil
import signal
import subprocess
import socket
import sys
import time

import pytest

from conftest import (HOSTNAME, PASSWORD, RECORD, ROOT, ServerProcess, make_certs,
                      plain_token, privileged_port, shared_tmp_dir, wait_until)
from test_deploy import dedicated_user, in_namespace, views_for  # noqa: F401 (a fixture)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind and switch")

AUTH = """#!/bin/sh
id -u > "$TEST_RECORD/auth-uid"
[ "$SSMTPD_PASSWORD" = secret ]
"""
PROCESS = """#!/bin/sh
echo "$(id -u) $(id -g) $(id -G)" > "$TEST_RECORD/process-ids"
cat > "$TEST_RECORD/message"
"""


@pytest.fixture
def open_dir():
    """A directory nobody can read, write and run programs from."""
    with shared_tmp_dir("ssmtpd-user-", 0o777) as path:
        yield path


def program(directory, name, text) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


@needs_root
def test_binds_below_1024_then_runs_everything_as_the_user(certs, open_dir, tmp_path):
    """docs/deploying.md "Deploying": port below 1024 bound as root; the server and both programs
    then run as --user nobody --group nogroup, with no supplementary group of root's."""
    nobody = pwd.getpwnam("nobody")
    port = privileged_port()
    srv = ServerProcess(str(tmp_path), certs, [
        "--port", str(port), "--user", "nobody", "--group", "nogroup",
        "--auth", program(open_dir, "auth", AUTH),
        "--process", program(open_dir, "process", PROCESS)])
    srv.port = port
    srv.record_dir = open_dir
    srv.env["TEST_RECORD"] = open_dir
    srv.start()
    try:
        status = open(f"/proc/{srv.proc.pid}/status").read()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(nobody.pw_uid)] * 4  # real, effective, saved, filesystem
        raw = srv.raw()
        raw.login(srv.tls_context())
        assert raw.send_message()[0] == 250
        raw.cmd("QUIT")
        raw.close()
        with open(os.path.join(open_dir, "auth-uid")) as f:
            assert f.read().split() == [str(nobody.pw_uid)]
        with open(os.path.join(open_dir, "process-ids")) as f:
            uid, gid, *groups = f.read().split()
        nogroup = str(grp.getgrnam("nogroup").gr_gid)
        assert (uid, gid, groups) == (str(nobody.pw_uid), nogroup, [nogroup])
        assert "running as user nobody" in srv.log()
    finally:
        assert srv.stop() == 0


@needs_root
def test_root_without_user_is_warned_about(make_server):
    """docs/deploying.md "Deploying": running as root without --user logs a warning."""
    srv = make_server()
    assert "running as root without --user" in srv.log()


@needs_root
def test_spool_dir_the_user_cannot_write_is_a_start_up_error(certs, open_dir, tmp_path):
    """docs/deploying.md "Deploying": what only root could use is refused after the switch, with
    the option named: here a --spool-dir only root may write."""
    spool = os.path.join(open_dir, "root-only")
    os.mkdir(spool, mode=0o700)
    srv = ServerProcess(str(tmp_path), certs, [
        "--user", "nobody", "--spool-dir", str(spool),
        "--auth", program(open_dir, "auth", AUTH),
        "--process", program(open_dir, "process", PROCESS)])
    result = subprocess.run(srv.argv, env=srv.env, capture_output=True, timeout=30)
    assert result.returncode == 2
    line, = result.stderr.decode().splitlines()
    assert line.startswith(f"ssmtpd: --spool-dir: cannot create files in {spool}"), line
    assert line.endswith("(as --user nobody)"), line


# --- what the service user's other processes can reach ------------------------------

USER_AUTH = f"""#!/bin/sh
[ "$SSMTPD_PASSWORD" = {PASSWORD} ]
"""
# Records who ran it, for which worker, and with which capabilities.
USER_PROCESS = """#!/bin/sh
set -e
out="$TEST_RECORD/run-$$"
{ echo "ppid $PPID"; echo "uid $(id -u)"; grep '^Cap' /proc/self/status; } > "$out.tmp"
cat > /dev/null
mv "$out.tmp" "$out"
"""
MEMFD = "/memfd:ssmtpd-worker-state"
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


def _attempt(action) -> str:
    try:
        action()
        return "read"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _look_into(pid: int, memfd=None) -> dict:
    """What this process can reach of process `pid`: its memory, descriptors, environment."""
    def memory():
        with open(f"/proc/{pid}/mem", "rb") as f:
            with open(f"/proc/{pid}/maps") as maps:
                start = int(maps.readline().split("-")[0], 16)
            f.seek(start)
            f.read(16)

    seen = {"mem": _attempt(memory),
            "fd": _attempt(lambda: os.listdir(f"/proc/{pid}/fd")),
            "environ": _attempt(lambda: open(f"/proc/{pid}/environ", "rb").close())}
    if memfd is not None:
        for name, flags in (("memfd-read", os.O_RDONLY), ("memfd-write", os.O_RDWR)):
            seen[name] = _attempt(lambda: os.close(os.open(f"/proc/{pid}/fd/{memfd}", flags)))
    return seen


def as_user(user, targets) -> dict:
    """{pid: what a process of `user` can reach of it} for each (pid, memfd) of `targets`,
    and, as "control", the same of a process of `user`'s own (a shell it starts), which
    it must be able to read: the proof that the looking works."""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # only os-level calls, then _exit: nothing of pytest's runs here
        try:
            os.close(reading)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            # The control says "ready" itself: Popen returns when exec has closed the
            # descriptors, but the new image is made dumpable a moment later, and a look
            # in between is refused although nothing is wrong.
            control = subprocess.Popen(["sh", "-c", "echo ready; read line"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                if select.select([control.stdout], [], [], 30)[0]:
                    control.stdout.readline()
                seen = {str(pid): _look_into(pid, memfd) for pid, memfd in targets}
                seen["control"] = _look_into(control.pid)
            finally:
                control.kill()
                control.wait()
            os.write(writing, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(writing)
    data = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([reading], [], [], 1)[0]:
                chunk = os.read(reading, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(reading)
        os.waitpid(child, 0)
    assert data, "the child that looks as the user reported nothing"
    seen = json.loads(data)
    assert seen.pop("control") == {"mem": "read", "fd": "read", "environ": "read"}
    return {int(pid): value for pid, value in seen.items()}


def assert_unreachable(user, targets) -> None:
    for pid, seen in as_user(user, targets).items():
        assert set(seen.values()) == {"EACCES"}, f"pid {pid}: {seen}"


def memfds(pid) -> list:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith(MEMFD):
                found.append(int(name))
        except FileNotFoundError:
            pass
    return found


def worker_pids(srv) -> list:
    return [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) started", srv.log())]


def capabilities(pid) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":") for line in f)
                if k in CAPABILITY_SETS}


def user_runs(records) -> list:
    runs = []
    for name in sorted(os.listdir(records)):
        if re.fullmatch(r"run-\d+", name):
            with open(os.path.join(records, name)) as f:
                runs.append({key.rstrip(":"): value for key, value in
                             (line.split(None, 1) for line in f.read().splitlines())})
    return runs


def submit_as_client(srv, size: int) -> None:
    """A whole submission, checking what the worker that served it was configured with."""
    raw = srv.raw(timeout=30)
    code, lines = raw.reply()
    assert code == 220 and HOSTNAME in lines[0], lines
    code, lines = raw.cmd("EHLO client.test")
    assert code == 250 and f"250-SIZE {size}" in lines, lines
    raw.starttls(srv.tls_context())  # verified against the test CA: the certificate
    assert raw.cmd("EHLO client.test")[0] == 250
    code, lines = raw.cmd("AUTH PLAIN " + plain_token())
    assert code == 235, lines
    assert raw.send_message()[0] == 250
    raw.cmd("QUIT")
    raw.close()


@pytest.fixture
def user_dir(dedicated_user):
    """A directory tree the dedicated user can enter, with a records directory it owns
    and the two programs."""
    user = dedicated_user
    with shared_tmp_dir("ssmtpd-dedicated-", 0o755) as top:
        records = os.path.join(top, "records")
        os.mkdir(records, 0o755)
        os.chown(records, user.pw_uid, user.pw_gid)
        yield dict(top=top, records=records, user=user,
                   auth=program(top, "auth", USER_AUTH),
                   process=program(top, "process", USER_PROCESS))


@needs_root
def test_workers_of_a_user_show_it_nothing_and_take_sealed_data(user_dir, certs):
    """docs/deploying.md "Deploying": with --workers 2 --user, another process of the user can read
    no worker's or master's memory, descriptors or environment, nor open the worker
    state; the state is sealed JSON (root cannot change it either), and workers that
    replace killed ones start with the master's settings and certificate."""
    d, user = user_dir, user_dir["user"]
    srv = ServerProcess(d["top"], certs, defaults=False)
    srv.argv = in_namespace(views=views_for(user, d["top"]), cwd=d["top"], argv=srv.argv + [
        "--bind", "127.0.0.1", "--port", str(srv.port), "--hostname", HOSTNAME,
        "--ssl-cert", srv.cert, "--ssl-key", srv.key, "--auth", d["auth"],
        "--process", d["process"], "--auth-failure-delay", "0",
        "--max-message-size", "123456", "--workers", "2", "--user", user.pw_name])
    srv.env["TEST_RECORD"] = d["records"]
    srv.start(wait_port=srv.port)
    try:
        assert wait_until(lambda: srv.log().count("accepting on") == 2, timeout=30), srv.log()
        master, workers = srv.proc.pid, worker_pids(srv)
        (state,) = memfds(master)

        # No way in for the user's other processes.
        assert_unreachable(user, [(master, state)] + [(w, None) for w in workers])

        # The state: read-only here, sealed, plain JSON; the workers kept none of it.
        with open(f"/proc/{master}/fdinfo/{state}") as f:
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        fd = os.open(f"/proc/{master}/fd/{state}", os.O_RDWR)  # root may open it so
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals == (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                             | fcntl.F_SEAL_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"\x80\x04", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            document = json.loads(os.pread(fd, 1 << 20, 0))
        finally:
            os.close(fd)
        assert document["settings"]["hostname"] == HOSTNAME
        assert all(memfds(w) == [] for w in workers)

        # Replacements, one slot after the other, start from that state.
        for n, victim in enumerate(workers, start=3):
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: len(worker_pids(srv)) == n, timeout=60), srv.log()
        assert wait_until(lambda: srv.log().count("accepting on") == 4, timeout=30), srv.log()
        replacements = worker_pids(srv)[2:]
        assert_unreachable(user, [(w, None) for w in replacements])
        submit_as_client(srv, 123456)
        (run,) = user_runs(d["records"])
        assert int(run["ppid"]) in replacements and run["uid"] == str(user.pw_uid)
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_nothing_inherits_the_units_capability(user_dir, workers):
    """docs/deploying.md "Under systemd": started as the unit starts it (its user, CAP_NET_BIND_SERVICE
    ambient, reproduced with setpriv), the server binds a port below 1024, then neither it
    nor the programs it runs hold any capability, and the user's other processes cannot
    look into it."""
    if not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("setpriv and unshare (util-linux) are not installed")
    d, user = user_dir, user_dir["user"]
    certs_dir = os.path.join(d["top"], "certs")
    os.mkdir(certs_dir, 0o755)
    certs = make_certs(certs_dir)
    os.chown(certs[2], user.pw_uid, user.pw_gid)  # the key: the user's alone, as it must be
    os.chmod(certs[2], 0o600)
    port = privileged_port()
    srv = ServerProcess(d["top"], certs, defaults=False)
    srv.port = port
    # The unit's User=, Group=, AmbientCapabilities=, CapabilityBoundingSet= and
    # NoNewPrivileges=, as systemd sets them up before it starts ExecStart.
    unit = ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid),
            "--init-groups", "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
            "--bounding-set=-all,+net_bind_service", "--no-new-privs", "--"]
    srv.argv = in_namespace(views=views_for(user, d["top"]), cwd=d["top"], argv=unit + srv.argv + [
        "--bind", "127.0.0.1", "--port", str(port), "--hostname", HOSTNAME,
        "--ssl-cert", srv.cert, "--ssl-key", srv.key, "--auth", d["auth"],
        "--process", d["process"], "--auth-failure-delay", "0",
        "--max-message-size", "654321", "--workers", str(workers)])
    srv.env["TEST_RECORD"] = d["records"]
    srv.start(wait_port=port)
    try:
        assert wait_until(lambda: srv.log().count("accepting on" if workers > 1
                                                  else "listening on") == workers,
                          timeout=30), srv.log()
        servers = [srv.proc.pid] + worker_pids(srv)
        assert len(servers) == (workers + 1 if workers > 1 else 1)
        submit_as_client(srv, 654321)
        (run,) = user_runs(d["records"])
        assert run["uid"] == str(user.pw_uid)
        assert {k: int(run[k], 16) for k in CAPABILITY_SETS} == dict.fromkeys(CAPABILITY_SETS, 0)
        for pid in servers:
            assert capabilities(pid) == dict.fromkeys(CAPABILITY_SETS, 0), pid
        assert_unreachable(user, [(pid, None) for pid in servers])
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


# --- the hand-over, as a worker receives it -------------------------------------------

def _memfd(blob: bytes, sealed: bool, read_only: bool) -> int:
    from ssmtpd import handover
    fd = os.memfd_create("ssmtpd-worker-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, blob)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, handover.SEALS)
    if not read_only:
        return fd
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", ["good", "unsealed", "writable", "pickled", "garbled"])
def test_a_worker_takes_only_sealed_read_only_data(case, certs, tmp_path):
    """A worker started by hand, as a master starts one, with a hand-over that is not
    sealed, is writable, or is a pickle (which could run code) or not JSON: it refuses
    it with one line and exit 2; the real thing: it serves."""
    from ssmtpd import config, handover
    settings = config.parse(["--bind", "127.0.0.1", "--process", RECORD, "--no-require-auth",
                             "--hostname", HOSTNAME])
    pem = tuple(open(path, "rb").read() for path in certs[1:])
    blob = {"pickled": pickle.dumps((settings, pem)),
            "garbled": handover.encode(settings, pem)[:-1]}.get(
        case, handover.encode(settings, pem))
    memfd = _memfd(blob, sealed=case != "unsealed", read_only=case != "writable")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    ledger_ours, ledger_theirs = socket.socketpair()
    handing, handed = handover.channel()
    handover.send(handing, memfd)
    handing.close()
    os.close(memfd)
    spec = (f"index=1;ledger={ledger_theirs.fileno()};handover={handed.fileno()};"
            f"listen={listener.fileno()}:0")
    env = dict(os.environ, SSMTPD_WORKER=spec,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ssmtpd"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(ledger_theirs.fileno(), handed.fileno(),
                                          listener.fileno()))
    for s in (ledger_theirs, handed, listener):
        s.close()
    try:
        if case == "good":
            # As its master would: the worker says it is ready, and is told to accept.
            ledger_ours.settimeout(30)
            assert ledger_ours.recv(64) == b"Y", log_path.read_text()
            ledger_ours.send(b"G")
            assert wait_until(lambda: "accepting on" in log_path.read_text(), timeout=30), \
                log_path.read_text()
            proc.terminate()
            assert proc.wait(30) == 0, log_path.read_text()
        else:
            assert proc.wait(30) == 2, log_path.read_text()
            line, = log_path.read_text().splitlines()
            expected = {"unsealed": "not sealed", "writable": "not opened read-only"}
            assert line.startswith("ssmtpd: worker state: " + expected.get(case, "")), line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ledger_ours.close()


def test_the_hand_over_is_data_and_only_data():
    """The hand-over parser gives back exactly the settings it was given, and anything
    else, pickles and NaN included, is an error, never an object."""
    from ssmtpd import config, handover
    settings = config.parse(["--process", RECORD, "--no-require-auth", "--proxy-protocol",
                             "--proxy-trusted", "10.0.0.0/8,::1", "--metrics-bind",
                             "[::1]:9100", "--smtps-port", "465", "--hostname", HOSTNAME])
    pem = (b"-----BEGIN CERTIFICATE-----\n", b"\x00\xff key")
    assert handover.decode(handover.encode(settings, pem)) == (settings, pem)
    good = json.loads(handover.encode(settings, pem))
    bad = [pickle.dumps((settings, pem)), b"", b"[]", b"\xff",
           json.dumps(dict(good, format=2)).encode(),
           json.dumps(dict(good, extra=1)).encode(),
           json.dumps(dict(good, settings=dict(good["settings"], timeout="1"))).encode(),
           json.dumps(dict(good, settings=dict(good["settings"], port=True))).encode(),
           json.dumps(dict(good, settings=dict(good["settings"], workers=None))).encode(),
           json.dumps(dict(good, settings=dict(good["settings"], unknown=1))).encode(),
           json.dumps(dict(good, key="not base64!")).encode(),
           json.dumps(dict(good, settings=dict(good["settings"], process="/bin/sh"))).encode(),
           json.dumps(dict(good, settings=dict(good["settings"],
                                               identity={"user": "root"}))).encode(),
           handover.encode(settings, pem).replace(b'"timeout": 300.0', b'"timeout": NaN')]
    for blob in bad:
        with pytest.raises(handover.HandoverError):
            handover.decode(blob)
