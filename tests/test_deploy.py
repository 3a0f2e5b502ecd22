"""Deployment paths, with the real thing (docs/deploying.md "Deploying").

supervisord (Debian's `supervisor`) runs supervisord.conf.example with only its
paths and user changed, as a system user the test creates; the test logs in and
delivers through it, renews the certificate with `supervisorctl signal HUP`, and
stops it with `supervisorctl stop` while a message is being processed.  The
systemd unit is checked by `systemd-analyze verify`, and its ExecStart run in
its sandbox, reproduced with a mount namespace and setpriv.  The Dockerfile's
command runs on its environment alone, and its HEALTHCHECK in every
configuration the docs show.  Postfix relays through ssmtpd.
"""

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import (HOSTNAME, PASSWORD, RECORD, ROOT, USER, client_context, free_port,
                      shared_tmp_dir, stop_process, submit_self_signed, two_certificates,
                      wait_for_port, wait_until)

SUPERVISOR_MAIN = """\
[unix_http_server]
file={tmp}/supervisor.sock

[supervisord]
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock

"""


def example_with_paths(tmp, state, ini, command, user) -> str:
    """supervisord.conf.example with its paths pointed into `tmp` and `state`, and its
    user= line naming the test's dedicated user; nothing else changed."""
    with open(os.path.join(ROOT, "supervisord.conf.example")) as f:
        text = f.read()
    text = text.replace("command=ssmtpd --config /etc/ssmtpd/ssmtpd.ini",
                        f"command={command} --config {ini}")
    text = text.replace("directory=/var/lib/ssmtpd", f"directory={state}")
    text = text.replace("stdout_logfile=/var/log/ssmtpd/ssmtpd.log",
                        f"stdout_logfile={tmp}/ssmtpd.log")
    text = text.replace("\nuser=ssmtpd\n", f"\nuser={user}\n")
    for line in (f"command={command}", f"directory={state}", f"user={user}"):
        assert f"\n{line}" in text, line
    return text


@pytest.fixture
def dedicated_user():
    """A throwaway system user and group, as docs/deploying.md "Deploying" creates `ssmtpd`."""
    if os.geteuid() != 0:
        pytest.skip("a dedicated user needs root: to create it, and for supervisord to "
                    "switch to it")
    name = "ssmtpd-t" + os.urandom(3).hex()
    created = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                              "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                              name], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    user = pwd.getpwnam(name)
    try:
        yield user
    finally:
        # Whatever the test started as the user and outlived its server.
        for pid in os.listdir("/proc"):
            if pid.isdigit() and uids_or_none(int(pid)) == {user.pw_uid}:
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


def uids_or_none(pid):
    try:
        return uids(pid)
    except (OSError, StopIteration):
        return None


def searchable(user, directory) -> bool:
    st = os.stat(directory)
    groups = {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem} | {user.pw_gid}
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def views_for(user, scratch):
    """What a mount namespace must show `user` so that it can run this Python and the
    code under test: [(directory, child, stash)], often none.

    docs/deploying.md "Deploying" installs into /opt/ssmtpd, which any user can enter; the
    Python running the tests may live under a directory only root enters (/root,
    for a pyenv).  In the namespace that directory becomes a bare tmpfs holding
    only the ways down to this Python and this checkout (see SANDBOX).
    """
    blocked = set()
    for path in {os.path.realpath(sys.executable), os.path.realpath(sys.prefix),
                 os.path.realpath(sys.base_prefix), ROOT}:
        parts = path.split(os.sep)
        for depth in range(2, len(parts) + 1):
            directory = os.sep.join(parts[:depth - 1]) or os.sep
            if os.path.isdir(directory) and not searchable(user, directory):
                blocked.add((directory, parts[depth - 1]))
    if len({directory for directory, _ in blocked}) > 1 or \
            (blocked and not shutil.which("unshare")):
        pytest.skip(f"{user.pw_name} cannot run {sys.executable}: install ssmtpd where "
                    "any user can enter (docs/deploying.md \"Deploying\")")
    return [(directory, child, tempfile.mkdtemp(prefix="view-", dir=scratch))
            for directory, child in sorted(blocked)]


def in_namespace(**spec):
    """argv that runs spec["argv"] after SANDBOX has done what `spec` asks."""
    spec = dict(dict(views=[], binds=[], writable=None, cwd="/"), **spec)
    if not (spec["views"] or spec["binds"] or spec["writable"] is not None):
        return spec["argv"]
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SANDBOX,
            json.dumps(spec)]


@pytest.fixture
def supervised(dedicated_user):
    """docs/deploying.md "Deploying" with a dedicated user: its state directory, a users file made
    by root with the example users tool, and supervisord.conf.example's user= line."""
    supervisord, supervisorctl = shutil.which("supervisord"), shutil.which("supervisorctl")
    if not (supervisord and supervisorctl):
        pytest.fail("supervisor is not installed (.ci/run installs Debian's supervisor)")
    user = dedicated_user
    bindir = os.path.dirname(sys.executable)
    users_tool = shutil.which("ssmtpd-auth-users", path=bindir)
    assert users_tool, "pip install did not install the ssmtpd-auth-users command"
    with shared_tmp_dir("ssmtpd-supervised-", 0o755) as tmp:
        # install -d -o ssmtpd -g ssmtpd -m 0750 /var/lib/ssmtpd
        state = os.path.join(tmp, "state")
        os.mkdir(state, 0o750)
        os.chown(state, user.pw_uid, user.pw_gid)
        first, second, cert, key = two_certificates(os.path.join(tmp, "certs"))
        port = free_port()
        users = os.path.join(state, "users")
        # As root, as an administrator would without sudo -u: the file must still be
        # the server's to read.
        added = subprocess.run([users_tool, "--users", users, "add", USER],
                               input=PASSWORD.encode() + b"\n", capture_output=True,
                               timeout=60)
        assert added.returncode == 0, added.stderr
        ini = os.path.join(tmp, "ssmtpd.ini")
        with open(ini, "w") as f:
            f.write(f"[ssmtpd]\nbind = 127.0.0.1\nport = {port}\nhostname = {HOSTNAME}\n"
                    f"auth = {users_tool} --users {users}\nprocess = {RECORD}\n"
                    f"ssl-cert = {cert}\nssl-key = {key}\nauth-failure-delay = 0\n")
        command = shutil.which("ssmtpd", path=bindir) or f"{sys.executable} -m ssmtpd"
        config = os.path.join(tmp, "supervisord.conf")
        with open(config, "w") as f:
            f.write(SUPERVISOR_MAIN.format(tmp=tmp)
                    + example_with_paths(tmp, state, ini, command, user.pw_name))
        records = os.path.join(state, "records")
        os.mkdir(records)
        os.chown(records, user.pw_uid, user.pw_gid)
        env = dict(os.environ, TEST_RECORD=records,
                   PATH=bindir + os.pathsep + os.environ["PATH"],
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = in_namespace(views=views_for(user, tmp), argv=[supervisord, "-c", config])
        proc = subprocess.Popen(argv, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

        def ctl(*args):
            return subprocess.run([supervisorctl, "-c", config, *args], capture_output=True,
                                  text=True, timeout=120)

        try:
            wait_for_port(port, timeout=30, proc=proc)
            yield dict(port=port, tmp=tmp, ctl=ctl, first=first, second=second, cert=cert,
                       key=key, records=records, user=user)
        finally:
            stop_process(proc, timeout=60)


def log(s) -> str:
    with open(os.path.join(s["tmp"], "ssmtpd.log"), errors="replace") as f:
        return f.read()


def submit(s, ca, sender, results=None):
    from conftest import Raw
    import socket
    raw = Raw(socket.create_connection(("127.0.0.1", s["port"]), timeout=60))
    raw.login(client_context(ca))
    peer = raw.sock.getpeercert()["subject"][0][0][1]
    code = raw.send_message(sender=sender)[0]
    raw.cmd("QUIT")
    raw.close()
    if results is not None:
        results.append(code)
    return code, peer


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def uids(pid) -> set:
    """Real, effective, saved and filesystem user ids of a process."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("Uid:"))
    return {int(n) for n in line.split()[1:]}


def test_supervisord_runs_the_example(supervised):
    """docs/deploying.md "Deploying": under supervisord with the shipped example, as a dedicated
    user whose users file root made with the example users tool: logins, delivery, a
    certificate renewed with `supervisorctl signal HUP`, and `supervisorctl stop`
    draining a message in progress, then exit 0."""
    s = supervised
    ca_first, ca_second = s["first"][0], s["second"][0]
    assert submit(s, ca_first, "one@example.org") == (250, "ssmtpd first")
    # startsecs=3 in the example: RUNNING once it has stayed up that long.
    assert wait_until(lambda: "RUNNING" in s["ctl"]("status", "ssmtpd").stdout, timeout=20)
    # user= in the example: the master, its workers and their programs are that user's.
    master = int(s["ctl"]("pid", "ssmtpd").stdout)
    assert uids(master) == {s["user"].pw_uid}
    workers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
               if parent_of(pid) == master]
    assert len(workers) == 2 and all(uids(w) == {s["user"].pw_uid} for w in workers)
    assert all(os.stat(os.path.join(s["records"], n)).st_uid == s["user"].pw_uid
               for n in os.listdir(s["records"]))

    shutil.copyfile(s["second"][1], s["cert"])
    shutil.copyfile(s["second"][2], s["key"])
    result = s["ctl"]("signal", "HUP", "ssmtpd")
    assert result.returncode == 0, result.stdout + result.stderr
    # --workers 2 in the example: two new workers, with the new certificate.
    assert wait_until(lambda: "2 workers accept with the configuration read now" in log(s),
                      timeout=60), log(s)
    for i in range(4):
        assert submit(s, ca_second, f"two{i}@example.org") == (250, "ssmtpd second")

    results = []
    client = threading.Thread(target=submit, args=(s, ca_second, "sleep2@example.org", results))
    client.start()
    runs = lambda: [n for n in os.listdir(s["records"]) if n.startswith("run-")]  # noqa: E731
    assert wait_until(lambda: len(runs()) == 6, timeout=30)  # the program is running
    stopped = s["ctl"]("stop", "ssmtpd")
    client.join(60)
    assert results == [250], "the message in progress was not answered"
    assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    with open(os.path.join(s["tmp"], "supervisord.log")) as f:
        assert "stopped: ssmtpd (exit status 0)" in f.read()
    assert "Traceback" not in log(s)


# --- systemd ------------------------------------------------------------------------

def test_systemd_unit_verifies(tmp_path):
    """docs/deploying.md "Deploying": systemd-analyze verify accepts conf/ssmtpd.service without a
    word of warning (with ExecStart pointed at this machine's ssmtpd)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (.ci/run installs Debian's systemd)")
    command = shutil.which("ssmtpd", path=os.path.dirname(sys.executable))
    assert command, "pip install did not install the ssmtpd command"
    with open(os.path.join(ROOT, "conf", "ssmtpd.service")) as f:
        unit = f.read()
    assert "ExecStart=/opt/ssmtpd/bin/ssmtpd " in unit
    # SIGTERM to the main process only: the programs finish their messages.
    assert re.search(r"(?m)^KillMode=mixed$", unit)
    path = tmp_path / "ssmtpd.service"
    path.write_text(unit.replace("/opt/ssmtpd/bin/ssmtpd", command))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60, cwd=str(tmp_path))
    assert (result.returncode, result.stderr.strip()) == (0, ""), result.stderr


# What systemd does with the unit's [Service] settings, done by hand: systemd does
# not run as PID 1 in the test's machine, so `systemctl start` is not to be had.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
SANDBOX_REPRODUCED = {"ExecStart", "User", "Group", "NoNewPrivileges", "StateDirectory",
                      "WorkingDirectory", "Environment", "ProtectSystem", "ReadWritePaths"}
SANDBOX_LEFT_OUT = {
    # Only for ports below 1024; the test's are above.
    "AmbientCapabilities", "CapabilityBoundingSet",
    # They hide /home, /root and the host's /tmp, and this test's directories (and
    # perhaps its Python) live there; the programs tried here write to neither.
    "ProtectHome", "PrivateTmp",
    # Starting, stopping, reloading: not what the programs may do.
    "Type", "ExecReload", "KillMode", "TimeoutStopSec", "Restart", "RestartPreventExitStatus",
}

# Run as root inside `unshare --mount`: each step is what systemd does before it
# starts ExecStart, in the same order.
SANDBOX = """
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])

def mount(*args):
    subprocess.run(["mount", *args], check=True)

# Not systemd's: the way down to the Python and checkout under test (views_for).
views = spec["views"]
for directory, child, stash in views:
    mount("--bind", directory + "/" + child, stash)
for directory in sorted({view[0] for view in views}):
    mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", directory)
for directory, child, stash in views:
    os.mkdir(directory + "/" + child)
    mount("--bind", stash, directory + "/" + child)
for target, source in spec["binds"]:
    mount("--bind", source, target)
if spec["writable"] is not None:
    # ProtectSystem=strict: every mount read-only but /dev, /proc and /sys; then
    # StateDirectory= and ReadWritePaths= writable again.
    for path in spec["writable"]:
        mount("--bind", path, path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point.split("/")[1] not in ("dev", "proc", "sys"):
            subprocess.run(["mount", "-o", "remount,bind,ro", point], capture_output=True,
                           check=point == "/")
    for path in spec["writable"]:
        mount("-o", "remount,bind,rw", path)
    try:
        open(spec["probe"], "w").close()
        sys.exit("ProtectSystem=strict is not reproduced: " + spec["probe"] + " is writable")
    except OSError:
        pass
os.chdir(spec["cwd"])
os.execvp(spec["argv"][0], spec["argv"])
"""


def unit_settings(text):
    """[(key, value)] of the unit's [Service] section."""
    settings, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.append((key, value))
    return settings


@contextlib.contextmanager
def under_unit(unit, user, paths, top, binds=()):
    """ExecStart of `unit` as systemd would start it, with its sandbox: the unit's
    paths moved by `paths` (/var/lib/ssmtpd to a temporary directory, ...).  Yields
    the server's log (a function)."""
    for old, new in paths.items():
        unit = unit.replace(old, new)
    settings = unit_settings(unit)
    keys = {k for k, _ in settings}
    assert keys <= SANDBOX_REPRODUCED | SANDBOX_LEFT_OUT, \
        f"teach this test what {keys - SANDBOX_REPRODUCED - SANDBOX_LEFT_OUT} do"
    one = dict(settings)
    assert one["ProtectSystem"] == "strict" and one["User"] == "ssmtpd"
    env = {"PATH": SYSTEMD_PATH, "USER": user.pw_name, "LOGNAME": user.pw_name,
           "HOME": user.pw_dir, "SHELL": user.pw_shell, "LANG": "C.UTF-8",
           # The code under test, wherever pip put the package.
           "PYTHONPATH": ROOT}
    writable = []
    for key, value in settings:
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
        elif key == "StateDirectory":
            state = paths["/var/lib/ssmtpd"]
            assert value == "ssmtpd"
            os.makedirs(state, exist_ok=True)  # systemd makes it, owned by User=
            os.chown(state, user.pw_uid, user.pw_gid)
            writable.append(state)
        elif key == "ReadWritePaths":
            for path in value.split():
                if not (path.startswith("-") and not os.path.exists(path[1:])):
                    writable.append(path.lstrip("-"))
    argv = ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid),
            "--init-groups"]
    if one.get("NoNewPrivileges") == "true":
        argv.append("--no-new-privs")
    argv += ["--"] + shlex.split(one["ExecStart"])
    launcher = in_namespace(views=views_for(user, top), binds=list(binds), writable=writable,
                            argv=argv, cwd=one["WorkingDirectory"],
                            probe=os.path.join(top, "probe"))
    log_path = os.path.join(top, "ssmtpd.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(launcher, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)

    def read_log():
        with open(log_path, errors="replace") as f:
            return f.read()

    try:
        assert wait_until(lambda: proc.poll() is not None or "listening on" in read_log(),
                          timeout=30), read_log()
        assert proc.poll() is None, read_log()
        yield read_log
    finally:
        stop_process(proc, timeout=60)
        log.close()


def readme_minimal_process_program() -> str:
    from conftest import docs_block
    return docs_block("docs/process-program.md", "minimal-process-program")


@pytest.fixture
def unit_machine(dedicated_user):
    """A host laid out as docs/deploying.md "Deploying" and the unit's head say, in a temporary
    directory: the unit's paths moved into it, a users file root made with alice."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("unshare and setpriv (util-linux) are not installed")
    with open(os.path.join(ROOT, "conf", "ssmtpd.service")) as f:
        unit = f.read()
    bindir = os.path.dirname(sys.executable)
    command = shutil.which("ssmtpd", path=bindir)
    assert command, "pip install did not install the ssmtpd command"
    with shared_tmp_dir("ssmtpd-unit-", 0o755) as top:
        paths = {"/opt/ssmtpd/bin/ssmtpd": command,
                 "/etc/ssmtpd/ssmtpd.ini": os.path.join(top, "ssmtpd.ini"),
                 "/var/lib/ssmtpd": os.path.join(top, "var-lib-ssmtpd"),
                 "/var/spool/submitted": os.path.join(top, "var-spool-submitted")}
        os.mkdir(paths["/var/lib/ssmtpd"], 0o750)
        os.chown(paths["/var/lib/ssmtpd"], dedicated_user.pw_uid, dedicated_user.pw_gid)
        users = os.path.join(paths["/var/lib/ssmtpd"], "users")
        added = subprocess.run([os.path.join(bindir, "ssmtpd-auth-users"), "--users", users,
                                "add", "alice"], input=b"a long passphrase\n",
                               capture_output=True, timeout=60)
        assert added.returncode == 0, added.stderr
        port = free_port()

        def configure(process, *more):
            text = (f"[ssmtpd]\nbind = 127.0.0.1\nport = {port}\nhostname = {HOSTNAME}\n"
                    f"auth = {bindir}/ssmtpd-auth-users --users /var/lib/ssmtpd/users\n"
                    f"process = {process}\nauth-failure-delay = 0\n" + "".join(more))
            with open(paths["/etc/ssmtpd/ssmtpd.ini"], "w") as f:
                f.write(text.replace("/var/lib/ssmtpd", paths["/var/lib/ssmtpd"]))

        yield dict(unit=unit, user=dedicated_user, top=top, paths=paths, port=port,
                   configure=configure)


def test_systemd_unit_runs_the_readme_minimal_process_program(unit_machine):
    """docs/deploying.md "Under systemd": the unit as shipped, with its sandbox (everything
    read-only but its ReadWritePaths=), runs the minimal process program of the docs
    "The process program" once its directory is made as docs/deploying.md "Under systemd" says."""
    m = unit_machine
    spool = m["paths"]["/var/spool/submitted"]
    # install -d -o ssmtpd -g ssmtpd -m 0750 /var/spool/submitted
    os.mkdir(spool, 0o750)
    os.chown(spool, m["user"].pw_uid, m["user"].pw_gid)
    program = os.path.join(m["top"], "process")
    with open(program, "w") as f:
        f.write(readme_minimal_process_program().replace("/var/spool/submitted", spool))
    os.chmod(program, 0o755)
    m["configure"](program)
    with under_unit(m["unit"], m["user"], m["paths"], m["top"]) as log:
        submit_self_signed(m["port"], "alice", "a long passphrase")
        (name,) = os.listdir(os.path.join(spool, "alice"))
        assert name.startswith("msg."), log()


def test_systemd_unit_runs_the_example_programs(unit_machine):
    """docs/deploying.md "Under systemd": the unit as shipped runs the example programs as
    installed, their state in its state directory."""
    m = unit_machine
    m["configure"](f"{os.path.dirname(sys.executable)}/ssmtpd-deliver-maildir "
                   "/var/lib/ssmtpd/mail")
    with under_unit(m["unit"], m["user"], m["paths"], m["top"]):
        submit_self_signed(m["port"], "alice", "a long passphrase")
        new = os.path.join(m["paths"]["/var/lib/ssmtpd"], "mail", "alice", "new")
        assert len(os.listdir(new)) == 1


def readme_unit_changes(program: str):
    """The lines docs/deploying.md "Under systemd" says to delete from the unit and to add to
    it, for `program`."""
    with open(os.path.join(ROOT, "docs", "deploying.md")) as f:
        text = f.read()
    section = text[text.index("## Under systemd"):text.index("## In a container")]
    item = next(line for line in section.split("\n- ") if program in line)
    deleted = re.findall(r"delete\s+`([A-Za-z]+=[^`]*)`", item)
    added = re.findall(r"add\s+`([A-Za-z]+=[^`]*)`", item)
    return deleted, added


def changed_unit(unit: str, deleted=(), added=()) -> str:
    for line in deleted:
        assert f"\n{line}\n" in unit, line
        unit = unit.replace(f"\n{line}\n", "\n")
    for line in added:
        unit = unit.replace("\nProtectSystem=strict\n", f"\nProtectSystem=strict\n{line}\n")
    return unit


POSTFIX_DROP_MAIN = "compatibility_level = 3.6\n"


def test_systemd_unit_pipes_to_postfix_sendmail_once_changed_as_the_readme_says(
        unit_machine):
    """docs/deploying.md "Under systemd": Postfix's sendmail as the process program fails under the
    unit as shipped (NoNewPrivileges= keeps its setgid postdrop from writing the
    maildrop, which ProtectSystem= has made read-only), and works with the changes the
    docs give for it."""
    if not (os.path.exists("/usr/sbin/sendmail") and shutil.which("postdrop")):
        pytest.fail("postfix is not installed (.ci/run installs Debian's postfix)")
    m = unit_machine
    top = m["top"]
    # Postfix's own paths, private to the sandbox: its default configuration
    # directory and an empty queue (the machine's Postfix, if any, sees neither).
    etc, queue = os.path.join(top, "postfix-etc"), os.path.join(top, "postfix-queue")
    os.mkdir(etc)
    with open(os.path.join(etc, "main.cf"), "w") as f:
        f.write(POSTFIX_DROP_MAIN)
    for name in ("master.cf", "dynamicmaps.cf"):
        if os.path.exists(os.path.join("/etc/postfix", name)):
            shutil.copyfile(os.path.join("/etc/postfix", name), os.path.join(etc, name))
    for sub, mode in (("", 0o755), ("maildrop", 0o1730), ("public", 0o2710)):
        path = os.path.join(queue, sub)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        if sub:
            shutil.chown(path, "postfix", "postdrop")
    binds = [("/etc/postfix", etc), ("/var/spool/postfix", queue)]
    program = os.path.join(top, "to-sendmail")
    with open(program, "w") as f:
        f.write('#!/bin/sh\nexec /usr/sbin/sendmail -i -f "$SSMTPD_MAIL_FROM" -- '
                '$SSMTPD_RCPT_TO\n')
    os.chmod(program, 0o755)
    m["configure"](program, "process-timeout = 3\n")
    maildrop = os.path.join(queue, "maildrop")

    import smtplib
    deleted, added = readme_unit_changes("sendmail")
    assert deleted == ["NoNewPrivileges=true"] and added, (deleted, added)
    # As shipped, and with only one of the two changes: postdrop cannot write the
    # maildrop and retries until the process program is killed.
    for unit, why in ((m["unit"], ("Permission denied", "Read-only file system")),
                      (changed_unit(m["unit"], added=added), ("Permission denied",)),
                      (changed_unit(m["unit"], deleted), ("Read-only file system",))):
        with under_unit(unit, m["user"], m["paths"], top, binds) as log:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                submit_self_signed(m["port"], "alice", "a long passphrase")
            assert refused.value.smtp_code == 451, log()
            assert re.search(rf"create file maildrop/\S+: ({'|'.join(why)})", log()), log()
            assert os.listdir(maildrop) == []
    with under_unit(changed_unit(m["unit"], deleted, added), m["user"], m["paths"], top,
                    binds) as log:
        try:
            submit_self_signed(m["port"], "alice", "a long passphrase")
        except smtplib.SMTPDataError:
            pytest.fail(log())
        assert len(os.listdir(maildrop)) == 1, log()


# --- the Dockerfile, without a container engine -------------------------------------

def dockerfile():
    """ENV, WORKDIR, CMD and HEALTHCHECK CMD of the Dockerfile."""
    import json
    import shlex
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    env, workdir, cmd, health = {}, None, None, None
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif word == "WORKDIR":
            workdir = rest.strip()
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "HEALTHCHECK":
            health = json.loads(rest[rest.index("CMD") + 3:])
    return env, workdir, cmd, health


@contextlib.contextmanager
def image_command(tmp_path, **extra):
    """The image's command with only the Dockerfile's environment (its state directory
    moved into a temporary one) plus `extra`; yields what the tests need of it."""
    env_file, workdir, cmd, health = dockerfile()
    assert cmd == ["ssmtpd"] and workdir == "/var/lib/ssmtpd" and health
    assert all(k.startswith("SSMTPD_") or k == "PYTHONUNBUFFERED" for k in env_file)
    state = str(tmp_path / "state")
    os.makedirs(state)
    port, smtps = free_port(), free_port()
    env = {k: v.replace(workdir, state) for k, v in env_file.items()}
    env.update(SSMTPD_PORT=str(port), SSMTPD_SMTPS_PORT=str(smtps),
               # The image listens on all interfaces; a test stays on loopback.
               SSMTPD_BIND="127.0.0.1", SSMTPD_HOSTNAME=HOSTNAME,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=ROOT)
    env.update(extra)
    if env["SSMTPD_SMTPS_PORT"] == "0":  # off
        smtps = None
    log_path = tmp_path / "ssmtpd.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=state, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    # The engine runs the HEALTHCHECK in the container: its environment, its WORKDIR.
    health_cmd = [sys.executable if health[0] == "python" else health[0]] + health[1:]

    def run_health(timeout=30):
        return subprocess.run(health_cmd, env=env, cwd=state, capture_output=True, text=True,
                              timeout=timeout)

    def listening():
        # Not by connecting: with --proxy-protocol that is a refused stranger.
        assert proc.poll() is None, log_path.read_text(errors="replace")
        text = log_path.read_text(errors="replace")
        return all(f"port {p} (" in text for p in (port, smtps) if p is not None)

    try:
        assert wait_until(listening, timeout=30), log_path.read_text(errors="replace")
        yield dict(proc=proc, env=env, state=state, port=port, smtps=smtps,
                   log=lambda: log_path.read_text(errors="replace"), health=run_health)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        log.close()


def test_dockerfile_command_runs_on_its_environment_alone(tmp_path):
    """docs/deploying.md "Deploying": the image's command, with only the Dockerfile's environment
    (its state directory moved into a temporary one), serves mail with the example
    programs, and its HEALTHCHECK passes by speaking SMTP."""
    with image_command(tmp_path) as image:
        health = image["health"]()
        assert health.returncode == 0, health.stdout + health.stderr
        state = image["state"]
        added = subprocess.run(["ssmtpd-auth-users", "--users", f"{state}/users", "add",
                                "alice"], env=image["env"], input=b"a long passphrase\n",
                               capture_output=True, timeout=60)
        assert added.returncode == 0, added.stderr
        submit_self_signed(image["port"], "alice", "a long passphrase")
        assert len(os.listdir(os.path.join(state, "mail", "alice", "new"))) == 1


def test_readme_docker_exec_add_asks_for_the_password_on_a_terminal(tmp_path):
    """docs/deploying.md "In a container": `docker exec -it ... add alice` gives the users tool a
    terminal, so it prompts twice, echoes nothing and needs no end-of-file (with -i
    alone it would read the password, echoed, until Ctrl-D)."""
    import pty
    import select
    import termios
    with open(os.path.join(ROOT, "docs", "deploying.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        head = f.read()
    for text in (readme, head):
        execs = re.findall(r"docker exec (-\w+) \S+ (ssmtpd-auth-users [^\n]*add alice)", text)
        assert execs, "no `docker exec ... add alice`"
        for flags, command in execs:
            # -i alone only where the password is piped in.
            assert flags == "-it" or re.search(
                rf"\| docker exec {flags} \S+ {re.escape(command)}", text), (flags, command)
    command = re.search(r"docker exec -it ssmtpd (ssmtpd-auth-users [^\n]*)", readme).group(1)
    argv = command.replace("/var/lib/ssmtpd", str(tmp_path)).split()
    argv[0] = shutil.which(argv[0], path=os.path.dirname(sys.executable))
    master, slave = pty.openpty()

    def controlling_terminal():
        import fcntl
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    seen = b""

    def until(text, timeout=60):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            try:
                chunk = os.read(master, 4096) if ready else b""
            except OSError:  # the child has closed its side
                chunk = b""
            if ready and not chunk:
                break
            seen += chunk
        assert text in seen, seen

    try:
        until(b"Password: ")
        os.write(master, b"a long passphrase\n")
        until(b"Again: ")
        os.write(master, b"a long passphrase\n")
        until(b"added alice")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"a long passphrase" not in seen, seen
    env = dict(os.environ, SSMTPD_USERNAME="alice", SSMTPD_PASSWORD="a long passphrase")
    assert subprocess.run(argv[:3], env=env, timeout=60).returncode == 0


def readme_proxy_trusted():
    """Every --proxy-trusted value the docs show, on a command line or as
    SSMTPD_PROXY_TRUSTED."""
    text = "".join(open(os.path.join(ROOT, "docs", page)).read()
                   for page in ("deploying.md", "scaling.md"))
    values = re.findall(r"(?:--proxy-trusted[ =]|SSMTPD_PROXY_TRUSTED=)([0-9A-Fa-f.:/,]+)",
                        text)
    assert values, "the docs show no --proxy-trusted value"
    return sorted(set(values))


def health_configurations():
    """The configurations the docs show: the image's own (STARTTLS and implicit
    TLS), STARTTLS alone, and behind a load balancer with each --proxy-trusted value."""
    yield pytest.param({}, id="image")
    yield pytest.param({"SSMTPD_SMTPS_PORT": "0"}, id="starttls-only")
    for trusted in readme_proxy_trusted():
        yield pytest.param({"SSMTPD_PROXY_PROTOCOL": "true", "SSMTPD_PROXY_TRUSTED": trusted},
                           id=f"proxy-trusted={trusted}")


@pytest.mark.parametrize("extra", list(health_configurations()))
def test_dockerfile_healthcheck_passes_without_a_warning(tmp_path, certs, extra):
    """docs/deploying.md "In a container", "Logging": the HEALTHCHECK, exactly as the Dockerfile gives
    it, passes in every configuration the docs show, --proxy-protocol included, and the
    server logs nothing above DEBUG about it however often it runs."""
    # At DEBUG, to see that it spoke: its lines are there only.
    with image_command(tmp_path, SSMTPD_SSL_CERT=certs[1], SSMTPD_SSL_KEY=certs[2],
                       SSMTPD_LOG_LEVEL="debug", **extra) as image:
        started = len(image["log"]())
        for _ in range(3):  # the engine runs it every 30 s, for as long as it runs
            health = image["health"]()
            assert health.returncode == 0, health.stdout + health.stderr
            assert health.stdout.startswith("ssmtpd healthy: "), health.stdout
        caused = image["log"]()[started:]
        assert "WARNING" not in caused and "ERROR" not in caused, caused
        trusted = extra.get("SSMTPD_PROXY_TRUSTED")
        if trusted is None or any(ipaddress.ip_address("127.0.0.1") in
                                  ipaddress.ip_network(n, strict=False)
                                  for n in trusted.split(",")):
            # It spoke SMTP on every port (a LOCAL header keeps its own address).
            sessions = 3 * (1 if image["smtps"] is None else 2)
            spoken = lambda: image["log"]()[started:].count(  # noqa: E731
                "127.0.0.1 -: disconnected: closed after 221")
            assert wait_until(lambda: spoken() == sessions, timeout=30), image["log"]()
            caused = image["log"]()[started:]
            assert all(" DEBUG " in line for line in caused.splitlines()), caused
        else:
            # No address here is trusted: it must not connect (the server would close
            # it, with a warning); it looked at the listening ports instead.
            assert caused == "", caused
            assert "not spoken to" in health.stdout, health.stdout


@pytest.mark.parametrize("extra", [
    pytest.param({}, id="spoken-to"),
    pytest.param({"SSMTPD_PROXY_PROTOCOL": "true", "SSMTPD_PROXY_TRUSTED": "10.0.0.0/8"},
                 id="listening-only")])
def test_dockerfile_healthcheck_fails_when_the_server_does_not_accept(tmp_path, certs, extra):
    """docs/deploying.md "In a container": a server that has stopped answering is unhealthy, within
    the HEALTHCHECK's --timeout; so is one that is gone."""
    import resource
    with image_command(tmp_path, SSMTPD_SSL_CERT=certs[1], SSMTPD_SSL_KEY=certs[2],
                       **extra) as image:
        os.kill(image["proc"].pid, signal.SIGSTOP)
        waiting = []
        try:
            if extra:
                # Unspoken to, the check sees a stopped server by the connections
                # piling up unaccepted: fill the queue as clients would.
                from ssmtpd.healthcheck import accept_queue_limit
                limit = accept_queue_limit()
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                if hard != resource.RLIM_INFINITY and hard < limit + 100:
                    pytest.skip(f"{limit} connections need more descriptors than {hard}")
                resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit + 100), hard))
                for _ in range(limit):
                    waiting.append(socket.create_connection(("127.0.0.1", image["port"]),
                                                            timeout=10))
            health = image["health"](timeout=30)
            assert health.returncode == 1, health.stdout + health.stderr
            assert health.stdout.startswith("ssmtpd unhealthy: port "), health.stdout
        finally:
            for sock in waiting:
                sock.close()
            os.kill(image["proc"].pid, signal.SIGCONT)
    gone = image["health"]()
    assert gone.returncode == 1, gone.stdout + gone.stderr


# --- Postfix relaying through ssmtpd as its smarthost --------------------------------

POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
# Loopback only, and no listener of its own: it only sends.
inet_interfaces = loopback-only
inet_protocols = ipv4
master_service_disable = inet
myhostname = client.test
mydestination =
relayhost = [127.0.0.1]:{port}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:{user}:{password}
smtp_sasl_security_options = noanonymous
smtp_tls_security_level = encrypt
"""


@pytest.fixture
def postfix_root():
    """A directory Postfix's unprivileged daemons can reach; Postfix is stopped after."""
    with shared_tmp_dir("ssmtpd-postfix-", 0o755) as root:
        try:
            yield root
        finally:
            subprocess.run(["postfix", "-c", os.path.join(root, "etc"), "stop"],
                           capture_output=True, timeout=60)


def test_postfix_relays_through_ssmtpd(make_server, postfix_root):
    """docs/deploying.md "Deploying": Postfix with ssmtpd as its smarthost (SASL AUTH, TLS required)
    hands over a message that sendmail(1) queued; it reaches the process program."""
    from conftest import PASSWORD, USER
    if not shutil.which("postfix"):
        pytest.fail("postfix is not installed (.ci/run installs Debian's postfix)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")
    srv = make_server()
    root = postfix_root
    etc = os.path.join(root, "etc")
    for sub in ("etc", "queue", "data"):
        os.makedirs(os.path.join(root, sub))
    shutil.chown(os.path.join(root, "data"), "postfix")
    shutil.copyfile("/etc/postfix/master.cf", os.path.join(etc, "master.cf"))
    with open(os.path.join(etc, "main.cf"), "w") as f:
        f.write(POSTFIX_MAIN.format(root=root, port=srv.port, user=USER, password=PASSWORD))
    for step in (["check"], ["start"]):
        result = subprocess.run(["postfix", "-c", etc] + step, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    message = b"Subject: via postfix\n\nhello from postfix\n"
    sent = subprocess.run(["sendmail", "-C", etc, "-f", "alice@example.org", "bob@example.org"],
                          input=message, capture_output=True, timeout=60)
    assert sent.returncode == 0, sent.stderr

    def maillog():
        try:
            with open(os.path.join(root, "maillog"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    assert wait_until(lambda: srv.runs(), timeout=60), maillog()
    (run,) = srv.runs()
    assert run["env"]["SSMTPD_USERNAME"] == USER
    assert run["env"]["SSMTPD_MAIL_FROM"] == "alice@example.org"
    assert run["env"]["SSMTPD_RCPT_TO"] == "bob@example.org"
    assert run["env"]["SSMTPD_TLS"].startswith("TLSv1")
    assert "\r\nSubject: via postfix\r\n" in run["stdin"]
    assert run["stdin"].endswith("\r\nhello from postfix\r\n")
    assert wait_until(lambda: "status=sent (250 2.0.0" in maillog(), timeout=30), maillog()
