"""--user/--group: bind as root, then serve as someone else (README "Deploying").

Run as root, as CI does: the server binds a port below 1024, switches to
nobody, and the programs it starts run as nobody.  Everything the switched
server and its programs touch lives in a directory nobody may use.
"""

import grp
import os
import pwd
import subprocess
import socket

import pytest

from conftest import ServerProcess, shared_tmp_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind and switch")

AUTH = """#!/bin/sh
id -u > "$SSMTPD_TEST_RECORD/auth-uid"
[ "$SSMTPD_PASSWORD" = secret ]
"""
PROCESS = """#!/bin/sh
echo "$(id -u) $(id -g) $(id -G)" > "$SSMTPD_TEST_RECORD/process-ids"
cat > "$SSMTPD_TEST_RECORD/message"
"""


def privileged_port() -> int:
    for port in range(990, 700, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


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


def test_binds_below_1024_then_runs_everything_as_the_user(certs, open_dir, tmp_path):
    """README "Deploying": port below 1024 bound as root; the server and both programs
    then run as --user nobody --group nogroup, with no supplementary group of root's."""
    nobody = pwd.getpwnam("nobody")
    port = privileged_port()
    srv = ServerProcess(str(tmp_path), certs, [
        "--port", str(port), "--user", "nobody", "--group", "nogroup",
        "--auth", program(open_dir, "auth", AUTH),
        "--process", program(open_dir, "process", PROCESS)])
    srv.port = port
    srv.record_dir = open_dir
    srv.env["SSMTPD_TEST_RECORD"] = open_dir
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


def test_root_without_user_is_warned_about(make_server):
    """README "Deploying": running as root without --user logs a warning."""
    srv = make_server()
    assert "running as root without --user" in srv.log()


def test_spool_dir_the_user_cannot_write_is_a_start_up_error(certs, open_dir, tmp_path):
    """README "Deploying": what only root could use is refused after the switch, with
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
