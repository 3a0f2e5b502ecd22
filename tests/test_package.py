"""The package as a wheel installs it, without the source tree (docs/install.md "Quick start").

One wheel is built with the command docs/install.md gives and installed into a fresh
virtualenv; every test here runs that installation's commands from a directory
outside the clone, with neither the venv nor this Python on PATH.
"""

import os
import pathlib
import subprocess

import pytest

from conftest import ROOT, free_port, installed_wheel, submit_self_signed, wait_for_port

# `ssmtpd --example NAME` -> the file of the clone it must print, at the path
# docs/deploying.md "Deploying" names.
EXAMPLES = {
    "config": "ssmtpd/examples/ssmtpd.ini",
    "systemd": "conf/ssmtpd.service",
    "supervisord": "supervisord.conf.example",
    "fail2ban-filter": "conf/fail2ban/filter.d/ssmtpd.conf",
    "fail2ban-filter-json": "conf/fail2ban/filter.d/ssmtpd-json.conf",
    "fail2ban-jail": "conf/fail2ban/jail.d/ssmtpd.local",
    "auth-introspect": "conf/auth-introspect",
}
PASSPHRASE = "a long passphrase"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin directory of a venv holding only the wheel, a home outside the clone, its env)."""
    tmp = tmp_path_factory.mktemp("package")
    bindir = pathlib.Path(installed_wheel(str(tmp)))
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SSMTPD_") and k != "PYTHONPATH"}
    env["PATH"] = "/usr/bin:/bin"
    return bindir, home, env


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_printed_from_the_installed_package(installed, name):
    """docs/install.md "Quick start", docs/deploying.md "Deploying": `ssmtpd --example NAME` prints each file the
    documentation points to in the clone, byte for byte, from the installed package alone."""
    bindir, home, env = installed
    printed = subprocess.run([str(bindir / "ssmtpd"), "--example", name], env=env, cwd=home,
                             capture_output=True, timeout=60)
    assert (printed.returncode, printed.stderr) == (0, b"")
    with open(os.path.join(ROOT, EXAMPLES[name]), "rb") as f:
        assert printed.stdout == f.read()


def test_example_config_is_example_config(installed):
    """docs/install.md "Quick start": --example-config still prints the first configuration."""
    bindir, home, env = installed
    old, new = (subprocess.run([str(bindir / "ssmtpd"), *args], env=env, cwd=home,
                               capture_output=True, timeout=60)
                for args in (["--example-config"], ["--example", "config"]))
    assert old.returncode == 0 and old.stdout == new.stdout


def test_unknown_example_is_refused(installed):
    """docs/configuration.md "Configuration": an unknown --example name is one line naming --example, exit 2."""
    bindir, home, env = installed
    result = subprocess.run([str(bindir / "ssmtpd"), "--example", "nginx"], env=env, cwd=home,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("ssmtpd: argument --example: invalid choice: 'nginx'")
    assert len(result.stderr.splitlines()) == 1


DECOY = "#!/bin/sh\n# another installation's command: refuses every login\nexit 1\n"


def test_own_commands_come_before_path(installed, tmp_path):
    """docs/configuration.md "Configuration": a bare name among ssmtpd's own commands is the installed
    package's even when another ssmtpd-auth-users comes first in PATH; other names are
    still looked up in PATH; --check-config prints what each option runs, and that is
    what runs."""
    bindir, home, env = installed
    decoys = tmp_path / "decoys"
    decoys.mkdir()
    for name in ("ssmtpd-auth-users", "ssmtpd-deliver-maildir", "my-deliver"):
        (decoys / name).write_text(DECOY)
        (decoys / name).chmod(0o755)
    env = dict(env, PATH=f"{decoys}:/usr/bin:/bin")
    users = tmp_path / "users"
    port = free_port()
    args = [str(bindir / "ssmtpd"), "--bind", "127.0.0.1", "--port", str(port),
            "--auth", f"ssmtpd-auth-users --users {users}",
            "--process", f"ssmtpd-deliver-maildir {tmp_path / 'mail'}"]
    checked = subprocess.run(args + ["--check-config"], env=env, cwd=home,
                             capture_output=True, text=True, timeout=60)
    assert (checked.returncode, checked.stderr) == (0, "")
    assert checked.stdout == (
        f"ssmtpd: --auth runs {bindir}/ssmtpd-auth-users --users {users}\n"
        f"ssmtpd: --process runs {bindir}/ssmtpd-deliver-maildir {tmp_path / 'mail'}\n"
        "ssmtpd: configuration OK\n")
    other = subprocess.run(args + ["--process", "my-deliver", "--check-config"], env=env,
                           cwd=home, capture_output=True, text=True, timeout=60)
    assert f"ssmtpd: --process runs {decoys}/my-deliver\n" in other.stdout, other

    added = subprocess.run([str(bindir / "ssmtpd-auth-users"), "--users", str(users), "add",
                            "alice"], env=env, input=f"{PASSPHRASE}\n".encode(),
                           capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    proc = subprocess.Popen(args, env=env, cwd=home, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc, timeout=30)
        submit_self_signed(port, "alice", PASSPHRASE)  # the decoy would refuse the login
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert len(os.listdir(tmp_path / "mail" / "alice" / "new")) == 1
