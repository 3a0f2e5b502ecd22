"""The shipped configuration and example programs: conf/auth-users, conf/deliver-maildir,
conf/ssmtpd.ini — alone, and wired into a real server."""

import configparser
import grp
import os
import pathlib
import pwd
import re
import resource
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import HOSTNAME, ROOT, client_context, plain_token, shared_tmp_dir

CONF = os.path.join(ROOT, "conf")
AUTH_USERS = os.path.join(CONF, "auth-users")
DELIVER = os.path.join(CONF, "deliver-maildir")
INI = os.path.join(CONF, "ssmtpd.ini")
PASSWORD = "correct horse battery"
RUN_TIMEOUT = 60

# A commented example in the ini file: "# key = value" at the start of a line.
EXAMPLE_LINE = re.compile(r"^# ([a-z][a-z0-9_-]*) = (.*)$", re.M)
ENTRY = re.compile(r"^([^:]+):scrypt\$16384\$8\$1\$([A-Za-z0-9+/]+=*)\$([A-Za-z0-9+/]+=*)$")


# --- helpers -------------------------------------------------------------------

def auth_users(users, *args, stdin=b"", cwd=None):
    argv = [AUTH_USERS] + (["--users", users] if users else []) + list(args)
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=RUN_TIMEOUT, cwd=cwd)


def check(users, user, password) -> int:
    """Run auth-users the way the server does (docs/auth-program.md "The auth program"): env, no args, empty stdin."""
    env = dict(os.environ, SSMTPD_USERNAME=user, SSMTPD_PASSWORD=password,
               SSMTPD_MECHANISM="PLAIN", SSMTPD_CLIENT_ADDR="127.0.0.1")
    proc = subprocess.run([AUTH_USERS, "--users", users], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=RUN_TIMEOUT)
    assert password.encode() not in proc.stdout + proc.stderr or not password
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc.returncode


def add(users, user, password=PASSWORD, cwd=None):
    proc = auth_users(users, "add", user, stdin=password.encode() + b"\n", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc


def deliver(root, user, data=b"", preexec_fn=None):
    return subprocess.run([DELIVER, root, user], input=data,
                          capture_output=True, timeout=RUN_TIMEOUT, preexec_fn=preexec_fn)


def listing(path):
    return sorted(os.listdir(path))


@pytest.fixture
def users(tmp_path):
    """A users file path in a directory that does not exist yet."""
    return str(tmp_path / "var" / "users")


# --- conf/auth-users ---------------------------------------------------------------

def test_auth_users_add_then_good_password_exits_0(users):
    """docs/auth-program.md "The auth program" exit 0 → 235: a password set with `add` checks out."""
    proc = add(users, "alice")
    assert proc.stdout == b"added alice\n"
    assert PASSWORD.encode() not in proc.stdout + proc.stderr
    assert check(users, "alice", PASSWORD) == 0


def test_auth_users_wrong_password_exits_1(users):
    """docs/auth-program.md "The auth program" other exit → 535: a wrong password, even one letter off."""
    add(users, "alice")
    assert check(users, "alice", PASSWORD + "!") == 1
    assert check(users, "alice", PASSWORD.upper()) == 1
    assert check(users, "alice", "") == 1


def test_auth_users_unknown_user_exits_1(users):
    """docs/auth-program.md "The auth program" other exit → 535: unknown and malformed names are just wrong."""
    add(users, "alice")
    assert check(users, "bob", PASSWORD) == 1
    assert check(users, "Alice", PASSWORD) == 1
    assert check(users, "alice:x", PASSWORD) == 1


def test_auth_users_missing_file_exits_75(users):
    """docs/auth-program.md "The auth program" exit 75 → 454: an unreadable users file is a temporary failure."""
    env = dict(os.environ, SSMTPD_USERNAME="alice", SSMTPD_PASSWORD=PASSWORD)
    proc = subprocess.run([AUTH_USERS, "--users", users], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 75
    assert users.encode() in proc.stderr and b"Traceback" not in proc.stderr


def test_auth_users_file_is_private_salted_scrypt(users):
    """conf/auth-users: mode 0600, parent made, one salted scrypt line per user."""
    add(users, "alice")
    add(users, "bob")  # same password: the salt must make the hashes differ
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    with open(users) as f:
        lines = f.read().splitlines()
    entries = [ENTRY.match(line) for line in lines]
    assert all(entries), lines
    assert [m.group(1) for m in entries] == ["alice", "bob"]
    assert entries[0].group(2) != entries[1].group(2)
    assert entries[0].group(3) != entries[1].group(3)
    assert PASSWORD not in "".join(lines)
    # Written by rename: no temporary file is left beside it.
    assert listing(os.path.dirname(users)) == ["users"]


def test_auth_users_add_replaces_entry(users):
    """conf/auth-users add: a second add changes the password, not a second line."""
    add(users, "alice", "old password")
    proc = add(users, "alice", "new password")
    assert proc.stdout == b"changed password of alice\n"
    assert check(users, "alice", "old password") == 1
    assert check(users, "alice", "new password") == 0
    with open(users) as f:
        assert [line.split(":")[0] for line in f] == ["alice"]


def test_auth_users_password_from_stdin_drops_one_newline(users):
    """conf/auth-users add: stdin up to one trailing newline is the password."""
    proc = auth_users(users, "add", "alice", stdin=b" two words \n")
    assert proc.returncode == 0, proc.stderr
    assert check(users, "alice", " two words ") == 0
    assert check(users, "alice", " two words \n") == 1
    assert check(users, "alice", "two words") == 1


@pytest.mark.parametrize("name", ["a:b", "a\tb", "a\x1bb", "a\x7fb", ""])
def test_auth_users_refuses_bad_user_names(users, name):
    """conf/auth-users add: ':' would break the file format; control characters the logs."""
    proc = auth_users(users, "add", name, stdin=PASSWORD.encode())
    assert proc.returncode == 64
    assert b"refusing user name" in proc.stderr
    assert not os.path.exists(users)


def test_auth_users_refuses_empty_password(users):
    """conf/auth-users add: an empty password is never stored."""
    proc = auth_users(users, "add", "alice", stdin=b"\n")
    assert proc.returncode == 64
    assert not os.path.exists(users)


def test_auth_users_list_and_delete(users):
    """conf/auth-users list/delete: names only, in order; a deleted user is unknown."""
    for name in ("alice", "bob", "carol"):
        add(users, name)
    proc = auth_users(users, "list")
    assert (proc.returncode, proc.stdout) == (0, b"alice\nbob\ncarol\n")
    proc = auth_users(users, "delete", "bob")
    assert (proc.returncode, proc.stdout) == (0, b"deleted bob\n")
    assert auth_users(users, "list").stdout == b"alice\ncarol\n"
    assert check(users, "bob", PASSWORD) == 1
    assert check(users, "carol", PASSWORD) == 0
    proc = auth_users(users, "delete", "bob")
    assert proc.returncode == 1 and b"no user 'bob'" in proc.stderr
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600


def test_auth_users_default_file_is_var_users(tmp_path):
    """conf/auth-users: without --users, var/users under the working directory."""
    add(None, "alice", cwd=str(tmp_path))
    assert check(str(tmp_path / "var" / "users"), "alice", PASSWORD) == 0
    proc = auth_users(None, "list", cwd=str(tmp_path))
    assert proc.stdout == b"alice\n"


# --- auth-users and a dedicated user (docs/deploying.md "Deploying") -------------------------

@pytest.fixture
def dedicated():
    """A throwaway system user (and its group), and a state directory it owns that
    every user can reach, as docs/deploying.md "Deploying" sets up; both removed after."""
    if os.geteuid() != 0:
        pytest.skip("creating a system user and acting as root need root")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("useradd and runuser (Debian's passwd and util-linux) are not installed")
    name = "ssmtpd-t" + os.urandom(3).hex()
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=RUN_TIMEOUT)
    try:
        user = pwd.getpwnam(name)
        with shared_tmp_dir("ssmtpd-examples-", 0o755) as top:
            state = os.path.join(top, "state")
            os.mkdir(state, 0o750)
            os.chown(state, user.pw_uid, user.pw_gid)
            yield user, state
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=RUN_TIMEOUT)


def as_user(user, *argv, env=None):
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)


def python_for(user):
    """A Python `user` can run the example from (this one may live under /root)."""
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and as_user(user, python, "-c", "").returncode == 0:
            return python
    pytest.skip(f"no Python that {user.pw_name} may run")


def test_auth_users_as_root_gives_new_files_the_state_directory_owner(dedicated):
    """docs/deploying.md "Deploying": root running `add` on the dedicated user's state directory
    makes a users file (and a directory above it) that user owns and can read, so its
    logins are not answered 454."""
    user, state = dedicated
    users = os.path.join(state, "var", "users")
    add(users, "alice")
    for path in (users, os.path.dirname(users)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), path
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(users)).st_mode) == 0o700
    env = dict(os.environ, SSMTPD_USERNAME="alice", SSMTPD_PASSWORD=PASSWORD)
    proc = as_user(user, python_for(user), AUTH_USERS, "--users", users, env=env)
    assert proc.returncode == 0, proc.stderr


def test_auth_users_keeps_owner_group_and_mode(dedicated):
    """conf/auth-users add/delete: a rewritten file keeps its owner, group and mode,
    whoever rewrites it."""
    user, state = dedicated
    users = os.path.join(state, "users")
    add(users, "alice")
    group = grp.getgrnam("nogroup" if "nogroup" in {g.gr_name for g in grp.getgrall()}
                         else "nobody")
    os.chown(users, user.pw_uid, group.gr_gid)
    os.chmod(users, 0o640)
    add(users, "bob")
    assert auth_users(users, "delete", "alice").returncode == 0
    st = os.stat(users)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
        (user.pw_uid, group.gr_gid, 0o640)
    assert auth_users(users, "list").stdout == b"bob\n"


def test_auth_users_as_root_in_roots_directory_says_who_can_read(users):
    """conf/auth-users add: a new file that stays root's (its directory is root's) is
    pointed out, for a server that runs as another user could not read it."""
    proc = add(users, "alice")
    assert os.stat(users).st_uid == os.geteuid()
    if os.geteuid() == 0:
        assert b"belongs to root, mode 0600" in proc.stderr, proc.stderr
    else:
        assert proc.stderr == b""


def test_auth_users_unreadable_file_says_whose_it_is(dedicated):
    """docs/auth-program.md "The auth program" exit 75 -> 454: a users file the server's user cannot
    read says in the log whose it is and as whom the program ran."""
    user, state = dedicated
    users = os.path.join(state, "users")
    add(users, "alice")
    os.chown(users, 0, 0)
    env = dict(os.environ, SSMTPD_USERNAME="alice", SSMTPD_PASSWORD=PASSWORD)
    proc = as_user(user, python_for(user), AUTH_USERS, "--users", users, env=env)
    assert proc.returncode == 75, proc.stderr
    assert (f"cannot read {users}: Permission denied (it belongs to root, mode 0600; "
            f"this program runs as {user.pw_name})").encode() in proc.stderr, proc.stderr


# --- conf/deliver-maildir ---------------------------------------------------------

# CRLF lines, a stuffed-looking dot, 8-bit bytes and more than one 64 KiB chunk.
MESSAGE = (b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (ssmtpd);\r\n"
           b"Subject: test\r\n\r\n.\r\n..\r\n\xc3\xa9t\xc3\xa9\r\n"
           + b"".join(b"line %06d %s\r\n" % (i, b"x" * 60) for i in range(4000)))


def test_deliver_maildir_writes_exact_message_into_new(tmp_path):
    """docs/process-program.md "The process program" exit 0 → 250 with the program's words: file in new/, byte for byte."""
    root = str(tmp_path / "mail")
    proc = deliver(root, "alice", MESSAGE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("delivered as "), lines
    name = lines[0][len("delivered as "):]
    maildir = os.path.join(root, "alice")
    assert listing(maildir) == ["cur", "new", "tmp"]
    assert listing(os.path.join(maildir, "new")) == [name]
    assert listing(os.path.join(maildir, "tmp")) == []
    with open(os.path.join(maildir, "new", name), "rb") as f:
        assert f.read() == MESSAGE
    assert stat.S_IMODE(os.stat(os.path.join(maildir, "new", name)).st_mode) == 0o600
    # Maildir names: no '/' or ':' (the info separator), unique per delivery.
    assert re.fullmatch(r"\d+\.M\d+P\d+R[0-9a-f]+\.[^/:]+", name), name
    second = deliver(root, "alice", b"Subject: again\r\n\r\n")
    assert second.returncode == 0
    assert len(listing(os.path.join(maildir, "new"))) == 2


@pytest.mark.parametrize("user", ["", "a/b", "../x", ".", "..", ".hidden", "a\x01b",
                                  "a\nb", "a\x7fb"])
def test_deliver_maildir_refuses_unsafe_user_with_67(tmp_path, user):
    """docs/process-program.md "The process program" other exit → 554: EX_NOUSER for a name that is not a safe directory."""
    root = str(tmp_path / "mail")
    proc = deliver(root, user, MESSAGE)
    assert proc.returncode == 67
    assert proc.stdout == b"no mailbox for this user\n"
    assert not os.path.exists(root)
    assert listing(str(tmp_path)) == []


def test_deliver_maildir_wrong_arguments_exit_64(tmp_path):
    """docs/process-program.md "The process program" other exit → 554: EX_USAGE without exactly ROOT and USERNAME."""
    for argv in ([DELIVER], [DELIVER, str(tmp_path)],
                 [DELIVER, str(tmp_path), "alice", "extra"]):
        proc = subprocess.run(argv, input=b"x", capture_output=True, timeout=RUN_TIMEOUT)
        assert proc.returncode == 64, argv
        assert b"usage" in proc.stderr
    assert listing(str(tmp_path)) == []


def test_deliver_maildir_unwritable_root_exits_75(tmp_path):
    """docs/process-program.md "The process program" exit 75 → 451: an I/O error is temporary, the client keeps the message."""
    # A regular file as ROOT: root ignores permissions, but not ENOTDIR.
    root = tmp_path / "mail"
    root.write_bytes(b"not a directory")
    proc = deliver(str(root), "alice", MESSAGE)
    assert proc.returncode == 75
    assert proc.stdout.decode().splitlines()[-1] == "mailbox temporarily unavailable"
    assert b"Traceback" not in proc.stderr
    assert root.read_bytes() == b"not a directory"


def test_deliver_maildir_failed_write_leaves_nothing(tmp_path):
    """docs/process-program.md "The process program" exit 75 → 451: a write that fails midway (disk full) leaves no file behind."""
    root = str(tmp_path / "mail")

    def small_files():
        # EFBIG after 64 KiB stands in for ENOSPC; Python ignores SIGXFSZ.
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))

    proc = deliver(root, "alice", MESSAGE, preexec_fn=small_files)
    assert len(MESSAGE) > 65536
    assert proc.returncode == 75, proc.stderr
    assert b"Traceback" not in proc.stderr
    for sub in ("tmp", "new", "cur"):
        assert listing(os.path.join(root, "alice", sub)) == []


# --- conf/ssmtpd.ini -------------------------------------------------------------------

def _ini_text():
    with open(INI) as f:
        return f.read()


def test_ini_sets_first_run_defaults():
    """docs/configuration.md "Configuration" ini file: [ssmtpd] wires the example programs on 127.0.0.1:8025."""
    ini = configparser.ConfigParser()
    ini.read_string(_ini_text())
    assert ini.sections() == ["ssmtpd"]
    assert dict(ini["ssmtpd"]) == {
        "bind": "127.0.0.1", "port": "8025",
        "auth": "conf/auth-users --users var/users",
        "process": "conf/deliver-maildir var/mail",
        "log-level": "info",
    }


def test_ini_shows_every_option_once(monkeypatch, certs):
    """docs/configuration.md "Configuration" options table: every option is set or shown commented, with valid values."""
    monkeypatch.syspath_prepend(ROOT)
    from ssmtpd import config

    text = _ini_text()
    examples = dict(EXAMPLE_LINE.findall(text))
    ini = configparser.ConfigParser()
    ini.read_string(text)
    active = set(ini["ssmtpd"])
    assert not active & set(examples)
    assert active | set(examples) == {o.name for o in config.OPTIONS}

    # Uncommented, the examples must parse; those not marked as examples of
    # other values must show the real default.
    enabled = EXAMPLE_LINE.sub(r"\1 = \2", text)
    enabled = re.sub(r"^ssl-cert = .*$", f"ssl-cert = {certs[1]}", enabled, flags=re.M)
    enabled = re.sub(r"^ssl-key = .*$", f"ssl-key = {certs[2]}", enabled, flags=re.M)
    # Whoever runs the test: a user that exists, and one it may "switch" to.
    me = pwd.getpwuid(os.geteuid())
    enabled = re.sub(r"^user = .*$", f"user = {me.pw_name}", enabled, flags=re.M)
    enabled = re.sub(r"^group = .*$", f"group = {grp.getgrgid(me.pw_gid).gr_name}", enabled,
                     flags=re.M)
    path = os.path.join(os.path.dirname(certs[1]), "all-options.ini")
    with open(path, "w") as f:
        f.write(enabled)
    for key in list(os.environ):
        if key.startswith("SSMTPD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)  # the program paths are relative to the repository
    settings = config.parse(["-c", path])
    assert settings.hostname == examples["hostname"]
    assert settings.smtps_port == int(examples["smtps-port"])
    assert settings.spool_dir == examples["spool-dir"]
    assert [str(n) for n in settings.proxy_trusted] == [examples["proxy-trusted"]]
    assert settings.metrics_bind == ("127.0.0.1", 9100)
    assert settings.auth == ("conf/auth-users", "--users", "var/users")
    assert settings.state == examples["state"]
    for opt in config.OPTIONS:
        if opt.name in examples and opt.name not in ("hostname", "ssl-cert", "ssl-key",
                                                     "smtps-port", "spool-dir",
                                                     "proxy-trusted", "metrics-bind",
                                                     "user", "group", "state"):
            default = opt.check(opt.default) if opt.kind == "str" and opt.check else opt.default
            assert getattr(settings, opt.attr) == default, opt.name


# --- wired into a real server --------------------------------------------------------

def swaks(port, user, password, *extra):
    argv = ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", "PLAIN",
            "--auth-user", user, "--auth-password", password, "--ehlo", "client.test",
            "--from", "alice@example.org", "--to", "bob@example.org",
            "--header", "Subject: from swaks", "--body", "Hello from the example programs.",
            "--timeout", "20", *extra]
    return subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT)


def delivered_name(swaks_output: bytes) -> str:
    """The 250 text after the final dot: the Maildir file name the program printed."""
    m = re.search(rb"<~  250 2\.0\.0 delivered as (\S+)\r?\n", swaks_output)
    assert m, swaks_output.decode("utf-8", "replace")
    return m.group(1).decode()


def read_delivered(maildir, name) -> bytes:
    assert listing(os.path.join(maildir, "new")) == [name]
    assert listing(os.path.join(maildir, "tmp")) == []
    with open(os.path.join(maildir, "new", name), "rb") as f:
        return f.read()


def test_example_programs_behind_server(make_server, certs, tmp_path):
    """docs/auth-program.md "The auth program", docs/process-program.md "The process program" end to end: auth-users decides AUTH, deliver-maildir files the message."""
    data = tmp_path / "data"
    text = _ini_text().replace("conf/", CONF + "/").replace("var/", f"{data}/")
    ini = tmp_path / "ssmtpd.ini"
    ini.write_text(text)
    users, mail = str(data / "users"), str(data / "mail")
    assert f"auth = {AUTH_USERS} --users {users}\n" in text

    srv = make_server("--config", str(ini), "--hostname", HOSTNAME,
                      "--ssl-cert", certs[1], "--ssl-key", certs[2],
                      "--auth-failure-delay", "0", defaults=False, start=False)
    # The port is picked when the server object is made; the CLI beats the ini.
    srv.argv += ["--bind", "127.0.0.1", "--port", str(srv.port)]
    srv.start()

    # No users file yet: auth-users exits 75, a temporary failure.
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(client_context(certs[0]))
        assert raw.cmd("EHLO client.test")[0] == 250
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token('alice', PASSWORD)}")
        assert code == 454 and lines[0].startswith("454 4.7.0"), lines
        add(users, "alice")
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token('alice', 'wrong')}")
        assert code == 535 and lines[0].startswith("535 5.7.8"), lines
    finally:
        raw.close()

    proc = swaks(srv.port, "alice", PASSWORD)
    assert proc.returncode == 0, proc.stdout.decode("utf-8", "replace")
    body = read_delivered(os.path.join(mail, "alice"), delivered_name(proc.stdout))
    first = body.split(b"\r\n", 2)
    assert first[0] == b"Received: from client.test ([127.0.0.1])"
    assert first[1].startswith(b"\tby mx.test (ssmtpd) with ESMTPSA id ")
    assert b"\r\nSubject: from swaks\r\n" in body
    assert b"\r\n\r\nHello from the example programs.\r\n" in body
    assert PASSWORD not in srv.log()


def test_shipped_config_first_run(make_server, tmp_path):
    """docs/configuration.md "Configuration" first run: conf/ssmtpd.ini as shipped, self-signed TLS, mail in var/mail."""
    srv = make_server("-c", "conf/ssmtpd.ini", defaults=False, start=False)
    # The shipped paths are relative to the repository root; give the server
    # a working directory that looks like one, so var/ lands in tmp.
    os.symlink(CONF, os.path.join(srv.workdir, "conf"))
    srv.argv += ["--port", str(srv.port)]
    srv.start()
    srv.wait_log("self-signed certificate")

    add(None, "alice", cwd=srv.workdir)
    proc = swaks(srv.port, "alice", PASSWORD)
    assert proc.returncode == 0, proc.stdout.decode("utf-8", "replace")
    maildir = os.path.join(srv.workdir, "var", "mail", "alice")
    body = read_delivered(maildir, delivered_name(proc.stdout))
    assert body.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert b"\r\n\r\nHello from the example programs.\r\n" in body


def test_example_programs_are_installed_as_commands(tmp_path):
    """docs/install.md "Quick start": an installed ssmtpd brings the example programs as the
    commands ssmtpd-auth-users and ssmtpd-deliver-maildir."""
    bindir = os.path.dirname(sys.executable)
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    auth = shutil.which("ssmtpd-auth-users", path=path)
    deliver = shutil.which("ssmtpd-deliver-maildir", path=path)
    assert auth and deliver, "pip install did not install the example commands"
    users = tmp_path / "users"
    added = subprocess.run([auth, "--users", str(users), "add", "carol"],
                           input=b"a long passphrase\n", capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    env = dict(os.environ, SSMTPD_USERNAME="carol", SSMTPD_PASSWORD="a long passphrase")
    assert subprocess.run([auth, "--users", str(users)], env=env, timeout=60).returncode == 0
    delivered = subprocess.run([deliver, str(tmp_path / "mail"), "carol"], input=MESSAGE,
                               capture_output=True, timeout=60)
    assert delivered.returncode == 0, delivered.stderr
    assert len(os.listdir(tmp_path / "mail" / "carol" / "new")) == 1


def test_installed_package_alone_runs_its_example(tmp_path):
    """docs/install.md "Quick start": a wheel installed into a fresh virtualenv, no source tree and
    no venv on PATH: `ssmtpd --example-config > ssmtpd.ini` and `ssmtpd --config
    ssmtpd.ini` serve mail with the installed example commands."""
    from conftest import free_port, installed_wheel, submit_self_signed, wait_for_port
    bindir = pathlib.Path(installed_wheel(str(tmp_path)))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SSMTPD_") and k != "PYTHONPATH"}
    env["PATH"] = "/usr/bin:/bin"  # neither the venv nor this Python's bin
    ini = subprocess.run([str(bindir / "ssmtpd"), "--example-config"], env=env, cwd=home,
                         capture_output=True, timeout=60)
    assert ini.returncode == 0, ini.stderr
    port = free_port()
    (home / "ssmtpd.ini").write_bytes(ini.stdout.replace(b"port = 8025", f"port = {port}".encode()))
    proc = subprocess.Popen([str(bindir / "ssmtpd"), "--config", "ssmtpd.ini"], env=env, cwd=home,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc, timeout=30)
        added = subprocess.run([str(bindir / "ssmtpd-auth-users"), "--users", "var/users", "add",
                                "alice"], env=env, cwd=home, input=b"a long passphrase\n",
                               capture_output=True, timeout=60)
        assert added.returncode == 0, added.stderr
        submit_self_signed(port, "alice", "a long passphrase")
        assert len(os.listdir(home / "var" / "mail" / "alice" / "new")) == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    # The code that ran was the wheel's, not this checkout's.
    assert str(bindir.parent) in subprocess.run(
        [str(bindir / "python"), "-c", "import ssmtpd; print(ssmtpd.__file__)"], env=env,
        cwd=home, capture_output=True, text=True).stdout


# --- conf/auth-introspect (docs/auth-program.md "OAuth 2 tokens") -----------------------------------------

INTROSPECT = os.path.join(CONF, "auth-introspect")
CLIENT_ID, CLIENT_SECRET = "ssmtpd", 'se"cr\\et'
# token -> the introspection answer (RFC 7662 §2.2)
INTROSPECTED = {
    "ya29.alice-token": {"active": True, "username": "alice", "scope": "openid smtp"},
    "ya29.expired": {"active": False},
    "ya29.odd-answer": {"active": "yes", "username": "alice"},
}


@pytest.fixture
def introspection(tmp_path):
    """A fake RFC 7662 endpoint on loopback: (url, client file, requests seen, state)."""
    import base64
    import http.server
    import json
    import threading
    import urllib.parse

    seen = []
    state = {"status": 200}

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            seen.append({"authorization": self.headers.get("Authorization"), "form": form})
            expected = "Basic " + base64.b64encode(
                f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                status, answer = 401, {"error": "invalid_client"}
            else:
                status = state["status"]
                answer = INTROSPECTED.get(form.get("token", [""])[0], {"active": False})
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    client = tmp_path / "introspection-client"
    client.write_text(f"{CLIENT_ID}:{CLIENT_SECRET}\n")
    yield f"http://127.0.0.1:{httpd.server_address[1]}/introspect", str(client), seen, state
    httpd.shutdown()
    httpd.server_close()


def introspect(url, client, user="alice", token="ya29.alice-token", **extra):
    """Run conf/auth-introspect as the server does for an XOAUTH2 login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSMTPD_")}
    env.update(SSMTPD_USERNAME=user, SSMTPD_MECHANISM="XOAUTH2", SSMTPD_CLIENT_ADDR="127.0.0.1",
               INTROSPECTION_URL=url, INTROSPECTION_CLIENT=client, **extra)
    if token is not None:
        env["SSMTPD_TOKEN"] = token
    proc = subprocess.run([INTROSPECT], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=RUN_TIMEOUT)
    assert b"Traceback" not in proc.stderr, proc.stderr
    if token:
        assert token.encode() not in proc.stdout + proc.stderr
    return proc.returncode


@pytest.mark.parametrize("user, token, extra, expected", [
    ("alice", "ya29.alice-token", {}, 0),
    ("alice", "ya29.alice-token", {"INTROSPECTION_SCOPE": "smtp"}, 0),
    ("alice", "ya29.alice-token", {"INTROSPECTION_SCOPE": "imap"}, 1),
    ("bob", "ya29.alice-token", {}, 1),  # someone else's token
    ("alice", "ya29.alice-token", {"INTROSPECTION_USER_FIELD": "email"}, 1),
    ("alice", "ya29.expired", {}, 1),
    ("alice", "ya29.unknown", {}, 1),
    ("alice", "ya29.odd-answer", {}, 1),  # only a JSON true is active
    ("alice", None, {"SSMTPD_PASSWORD": "secret"}, 1),  # a password login
], ids=["active", "scope", "other-scope", "other-user", "no-such-field", "inactive", "unknown",
        "active-not-true", "password"])
def test_auth_introspect_decides_by_the_endpoint(introspection, user, token, extra, expected):
    """docs/auth-program.md "OAuth 2 tokens": the introspection example exits 0 only for an active token
    (RFC 7662 §2.2) issued to the login name, with the scope if one is asked for; it
    authenticates to the endpoint with the client credentials and sends the token."""
    url, client, seen, _ = introspection
    assert introspect(url, client, user, token, **extra) == expected
    if token is not None:
        (request,) = seen
        assert request["form"]["token"] == [token]
        assert request["form"]["token_type_hint"] == ["access_token"]


def test_auth_introspect_endpoint_trouble_is_temporary(introspection, tmp_path):
    """docs/auth-program.md "OAuth 2 tokens": an endpoint that fails, refuses our client credentials or
    cannot be reached gives exit 75, a 454 for the client, not a failed login."""
    url, client, seen, state = introspection
    state["status"] = 503
    assert introspect(url, client) == 75
    state["status"] = 200
    wrong = tmp_path / "wrong-client"
    wrong.write_text("ssmtpd:wrong\n")
    assert introspect(url, str(wrong)) == 75
    assert introspect("http://127.0.0.1:9/introspect", client) == 75
    assert introspect(url, str(tmp_path / "missing")) == 75


def test_auth_introspect_behind_server(make_server, introspection):
    """docs/auth-program.md "OAuth 2 tokens" end to end: the server with --auth conf/auth-introspect and
    --auth-mechanisms XOAUTH2 logs in a valid token and refuses an expired one."""
    import base64
    url, client, seen, _ = introspection
    srv = make_server("--auth", INTROSPECT, "--auth-mechanisms", "XOAUTH2",
                      env={"INTROSPECTION_URL": url, "INTROSPECTION_CLIENT": client})
    raw = srv.raw()
    try:
        raw.hello(srv.tls_context())
        message = base64.b64encode(b"user=alice\x01auth=Bearer ya29.expired\x01\x01").decode()
        assert raw.cmd(f"AUTH XOAUTH2 {message}")[0] == 334
        assert raw.cmd("")[1] == ["535 5.7.8 Authentication credentials invalid"]
        message = base64.b64encode(b"user=alice\x01auth=Bearer ya29.alice-token\x01\x01").decode()
        assert raw.cmd(f"AUTH XOAUTH2 {message}")[1] == ["235 2.7.0 Authentication successful"]
    finally:
        raw.close()
    assert [r["form"]["token"] for r in seen] == [["ya29.expired"], ["ya29.alice-token"]]
    assert "ya29." not in srv.log()
