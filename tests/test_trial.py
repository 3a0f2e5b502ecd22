"""--try-auth and --try-process: one run of a configured program by hand
(docs/auth-program.md "The auth program", docs/process-program.md "The process program").

Each test runs `python -m ssmtpd --try-...` to completion with real programs and
reads what it printed, its exit status, and what the program recorded of its run.
"""

import glob
import json
import os
import pwd
import subprocess
import sys

import pytest

from conftest import AUTH, HOSTNAME, PROGRAMS, RECORD, ROOT, shared_tmp_dir

RUN_TIMEOUT = 60
AUTH_SLOW = os.path.join(PROGRAMS, "auth")  # user "slow" sleeps 60 s
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def try_run(args, stdin: bytes, record_dir, extra_env=None, program_args=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSMTPD_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["TEST_RECORD"] = str(record_dir)
    env.update(extra_env or {})
    programs = ["--auth", AUTH, "--process", RECORD] if program_args is None else program_args
    result = subprocess.run([sys.executable, "-m", "ssmtpd", "--hostname", HOSTNAME,
                             *programs, *args], input=stdin, capture_output=True,
                            env=env, cwd=str(record_dir), timeout=RUN_TIMEOUT)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def printed(out: str, key: str):
    """The values of the `key: value` lines printed."""
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(key + ": ")]


def records(record_dir, kind):
    found = []
    for path in sorted(glob.glob(os.path.join(str(record_dir), f"{kind}-*.json"))):
        with open(path) as f:
            found.append(json.load(f))
    return found


def script(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


# --- --try-auth ------------------------------------------------------------------------

def test_try_auth_runs_the_program_as_a_login_would(tmp_path):
    """A good password from stdin's first line (without its line end): 235, exit 0; the
    program got the session's variables, the placeholder address, no argument, and no
    SSMTPD_TOKEN."""
    rc, out, err = try_run(["--try-auth", "alice"], b"secret\r\nignored\n", tmp_path)
    assert (rc, printed(out, "reply"), err) == \
        (0, ["235 2.7.0 Authentication successful"], ""), out
    assert printed(out, "result") == ["exit 0"]
    assert printed(out, "placeholders") == ["client_addr=192.0.2.1"]
    assert printed(out, "program") == [AUTH]
    assert len(printed(out, "time")) == 1 and printed(out, "time")[0].endswith("s")
    (run,) = records(tmp_path, "auth")
    assert run["argv"] == [AUTH] and run["stdin"] == ""
    assert run["env"] == {"SSMTPD_USERNAME": "alice", "SSMTPD_PASSWORD": "secret",
                          "SSMTPD_MECHANISM": "PLAIN", "SSMTPD_CLIENT_ADDR": "192.0.2.1"}


def test_try_auth_wrong_password_is_535_and_exit_1(tmp_path):
    rc, out, _ = try_run(["--try-auth", "noisy", "--try-mechanism", "login"], b"wrong\n",
                         tmp_path)
    assert (rc, printed(out, "reply")) == (1, ["535 5.7.8 Authentication credentials invalid"])
    assert printed(out, "result") == ["exit 1"]
    assert printed(out, "stderr") == ["auth: checking noisy"]  # the program's own stderr
    (run,) = records(tmp_path, "auth")
    assert run["env"]["SSMTPD_MECHANISM"] == "LOGIN"


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_try_auth_token_mechanism_passes_a_token(tmp_path, mechanism):
    """docs/auth-program.md "The auth program": for the token mechanisms the program gets
    SSMTPD_TOKEN, never SSMTPD_PASSWORD."""
    auth = script(tmp_path, "auth-token", '#!/bin/sh\n'
                  'env | grep ^SSMTPD_ | sort > "$TEST_RECORD/env"\n'
                  '[ "$SSMTPD_TOKEN" = ya29.token ] && [ -z "${SSMTPD_PASSWORD+set}" ]\n')
    rc, out, _ = try_run(["--try-auth", "alice@example.org", "--try-mechanism", mechanism],
                         b"ya29.token\n", tmp_path,
                         program_args=["--auth", auth, "--process", RECORD])
    assert (rc, printed(out, "reply")) == (0, ["235 2.7.0 Authentication successful"]), out
    env = (tmp_path / "env").read_text().splitlines()
    assert f"SSMTPD_MECHANISM={mechanism}" in env and "SSMTPD_TOKEN=ya29.token" in env
    assert not any(line.startswith("SSMTPD_PASSWORD") for line in env)
    rc, out, _ = try_run(["--try-auth", "alice@example.org", "--try-mechanism", mechanism],
                         b"expired\n", tmp_path, program_args=["--auth", auth, "--process",
                                                               RECORD])
    assert (rc, printed(out, "reply")) == (1, ["535 5.7.8 Authentication credentials invalid"])


@pytest.mark.parametrize("user, result, reply", [
    ("tempfail", "exit 75", "454 4.7.0 Temporary authentication failure"),
    ("crash", "exit 3", "535 5.7.8 Authentication credentials invalid"),
    ("signal", "killed by signal 9", "454 4.7.0 Temporary authentication failure"),
    ("slow", "timed out, killed", "454 4.7.0 Temporary authentication failure"),
])
def test_try_auth_follows_the_exit_table(tmp_path, user, result, reply):
    """docs/auth-program.md "The auth program": each row of the table, --auth-timeout included."""
    rc, out, _ = try_run(["--try-auth", user, "--auth-timeout", "1"], b"secret\n", tmp_path)
    assert (rc, printed(out, "result"), printed(out, "reply")) == (1, [result], [reply]), out


def test_try_auth_program_that_cannot_start(tmp_path):
    """A program whose command is not there (exit 127 from its shell): 454, exit 1."""
    auth = script(tmp_path, "auth-broken", "#!/bin/sh\nexec /nonexistent/checker\n")
    rc, out, _ = try_run(["--try-auth", "alice"], b"secret\n", tmp_path,
                         program_args=["--auth", auth, "--process", RECORD])
    assert (rc, printed(out, "reply")) == (1, ["454 4.7.0 Temporary authentication failure"])
    assert printed(out, "result") == ["exit 127"]
    assert any("/nonexistent/checker" in line for line in printed(out, "stderr")), out


def test_try_auth_name_the_session_would_refuse_runs_nothing(tmp_path):
    rc, out, _ = try_run(["--try-auth", "al\u2028ice"], b"secret\n", tmp_path)
    assert (rc, printed(out, "reply")) == (1, ["501 5.5.2 Malformed authentication response"])
    assert records(tmp_path, "auth") == []


def test_try_auth_without_an_auth_program_is_a_configuration_error(tmp_path):
    rc, out, err = try_run(["--try-auth", "alice", "--no-require-auth"], b"secret\n",
                           tmp_path, program_args=["--process", RECORD])
    assert (rc, out) == (2, "")
    assert err == "ssmtpd: --try-auth: no --auth program is configured\n"


@pytest.mark.parametrize("args, option", [
    (["--try-auth", "alice", "--try-process", "alice"], "--try-process"),
    (["--try-auth", "alice", "--check-config"], "--try-auth"),
    (["--try-mechanism", "XOAUTH2"], "--try-mechanism"),
    (["--try-auth", "alice", "--try-mechanism", "CRAM-MD5"], "--try-mechanism"),
])
def test_one_shot_options_that_do_not_go_together(tmp_path, args, option):
    rc, out, err = try_run(args, b"secret\n", tmp_path)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and option in err, err
    assert records(tmp_path, "auth") == []


# --- --try-process ---------------------------------------------------------------------

MESSAGE = b"Subject: try\n\nline one\n.starts with a dot\nlast line without its end"


def test_try_process_pipes_the_message_as_a_session_would(tmp_path):
    """LF taken as CRLF, a CRLF after a last line without one, the Received header with
    the placeholders; argv and environment as after a session's final dot."""
    rc, out, err = try_run(["--try-process", "alice"], MESSAGE, tmp_path)
    assert (rc, printed(out, "reply"), err) == (0, ["250 2.0.0 Message accepted"], ""), out
    (run,) = records(tmp_path, "run")
    assert run["argv"] == [RECORD, "alice"]
    env = run["env"]
    assert (env["SSMTPD_USERNAME"], env["SSMTPD_MAIL_FROM"], env["SSMTPD_RCPT_TO"],
            env["SSMTPD_CLIENT_ADDR"], env["SSMTPD_HELO"], env["SSMTPD_TLS"]) == \
        ("alice", f"alice@{HOSTNAME}", f"postmaster@{HOSTNAME}", "192.0.2.1",
         "client.invalid", "TLSv1.3")
    header, body = run["stdin"].split("\r\n\t", 2)[0], run["stdin"].split(";\r\n\t", 1)[1]
    assert header.startswith("Received: from client.invalid ([192.0.2.1])")
    assert body.split("\r\n", 1)[1] == \
        "Subject: try\r\n\r\nline one\r\n.starts with a dot\r\nlast line without its end\r\n"
    placeholders = printed(out, "placeholders")[0]
    for value in ("192.0.2.1", "client.invalid", "TLSv1.3", f"alice@{HOSTNAME}",
                  f"postmaster@{HOSTNAME}"):
        assert value in placeholders
    assert printed(out, "size") == [f"{len(MESSAGE) + 6} octets"]  # 5 LF -> CRLF, + CRLF


@pytest.mark.parametrize("sender, result, reply", [
    ("say@example.org", "exit 0", "250 2.0.0 queued as 4711"),
    ("exit75@example.org", "exit 75", "451 4.3.0 Temporary failure, try again later"),
    ("exit71@example.org", "exit 71", "451 4.3.0 Temporary failure, try again later"),
    ("exit3@example.org", "exit 3", "554 5.3.0 Message rejected"),
    ("signal@example.org", "killed by signal 9", "451 4.3.0 Temporary failure, try again later"),
    ("sleep30@example.org", "timed out, killed", "451 4.3.0 Temporary failure, try again later"),
])
def test_try_process_follows_the_exit_table(tmp_path, sender, result, reply):
    """docs/process-program.md "The process program": each row of the table, --process-timeout included.
    (A USERNAME with an @ is also the placeholder MAIL FROM; the test program acts as
    its local part says.)"""
    rc, out, _ = try_run(["--try-process", sender, "--process-timeout", "1"], b"hi\n",
                         tmp_path)
    expected = 0 if reply.startswith("250") else 1
    assert (rc, printed(out, "result"), printed(out, "reply")) == \
        (expected, [result], [reply]), out


def test_try_process_program_that_cannot_start(tmp_path):
    process = script(tmp_path, "process-broken", "#!/bin/sh\nexec /nonexistent/deliver\n")
    rc, out, _ = try_run(["--try-process", "alice"], b"hi\n", tmp_path,
                         program_args=["--auth", AUTH, "--process", process])
    assert (rc, printed(out, "reply")) == (1, ["451 4.3.0 Temporary failure, try again later"])
    assert printed(out, "result") == ["exit 127"]


@pytest.mark.parametrize("message, args, reply", [
    (b"Subject: x\n\nbare\rCR\n", [], "554 5.6.0 Message contains bare CR or LF; use CRLF "
                                      "line endings"),
    (b"Subject: x\n\nends in a bare CR\r", [], "554 5.6.0 Message contains bare CR or LF; "
                                              "use CRLF line endings"),
    (b"x" * 999 + b"\n", ["--max-message-size", "1000"], "552 5.3.4 Message size exceeds "
                                                         "fixed limit"),
])
def test_try_process_session_rules_refuse_without_running(tmp_path, message, args, reply):
    """docs/dialogue.md "The dialogue": a bare CR, or a message over --max-message-size (counted
    with CRLF line ends), is refused and no program runs."""
    rc, out, _ = try_run(["--try-process", "alice", *args], message, tmp_path)
    assert (rc, printed(out, "reply")) == (1, [reply]), out
    assert printed(out, "result")[0].startswith("not run")
    assert records(tmp_path, "run") == []


def test_try_process_at_the_size_limit_runs(tmp_path):
    rc, out, _ = try_run(["--try-process", "alice", "--max-message-size", "1000"],
                         b"x" * 998 + b"\n", tmp_path)
    assert (rc, printed(out, "reply")) == (0, ["250 2.0.0 Message accepted"]), out


# --- command line only -----------------------------------------------------------------

@pytest.mark.parametrize("variable", ["SSMTPD_TRY_AUTH", "SSMTPD_TRY_PROCESS"])
def test_an_environment_variable_never_makes_a_one_shot_run(tmp_path, variable):
    """docs/configuration.md "Configuration": the variable stops the start with one line; nothing runs."""
    rc, out, err = try_run([], b"secret\n", tmp_path, extra_env={variable: "alice"})
    assert (rc, out) == (2, "")
    assert err.startswith("ssmtpd: --try-") and "command-line only" in err and \
        len(err.splitlines()) == 1, err
    assert records(tmp_path, "auth") == [] and records(tmp_path, "run") == []


@pytest.mark.parametrize("key", ["try-auth", "try_process"])
def test_an_ini_key_never_makes_a_one_shot_run(tmp_path, key):
    ini = tmp_path / "ssmtpd.ini"
    ini.write_text(f"[ssmtpd]\n{key} = alice\n")
    rc, out, err = try_run(["-c", str(ini)], b"secret\n", tmp_path)
    assert (rc, out) == (2, "")
    assert "command-line only" in err and len(err.splitlines()) == 1, err
    assert records(tmp_path, "auth") == [] and records(tmp_path, "run") == []


# --- --user --------------------------------------------------------------------------

@needs_root
def test_programs_run_as_the_user(tmp_path):
    """docs/deploying.md "Deploying": with --user nobody the one-shot run, like the server,
    switches before any program runs."""
    nobody = pwd.getpwnam("nobody")
    with shared_tmp_dir("ssmtpd-try-", 0o777) as shared:
        auth = script(shared, "auth", '#!/bin/sh\nid -u > "$TEST_RECORD/auth-uid"\n'
                      '[ "$SSMTPD_PASSWORD" = secret ]\n')
        process = script(shared, "process", '#!/bin/sh\nid -u > "$TEST_RECORD/'
                         'process-uid"\ncat > /dev/null\n')
        programs = ["--auth", auth, "--process", process, "--user", "nobody"]
        rc, out, _ = try_run(["--try-auth", "alice"], b"secret\n", shared,
                             program_args=programs)
        assert (rc, printed(out, "reply")) == (0, ["235 2.7.0 Authentication successful"]), out
        assert printed(out, "user") == [f"nobody (uid {nobody.pw_uid}, gid {nobody.pw_gid})"]
        with open(os.path.join(shared, "auth-uid")) as f:
            assert f.read().split() == [str(nobody.pw_uid)]
        rc, out, _ = try_run(["--try-process", "alice", "--spool-dir", shared], b"hi\n",
                             shared, program_args=programs)
        assert (rc, printed(out, "reply")) == (0, ["250 2.0.0 Message accepted"]), out
        with open(os.path.join(shared, "process-uid")) as f:
            assert f.read().split() == [str(nobody.pw_uid)]


@needs_root
def test_a_program_the_user_cannot_run_is_a_configuration_error(tmp_path):
    """The checks a start makes as --user, before anything runs: exit 2."""
    os.chmod(tmp_path, 0o700)
    auth = script(tmp_path, "auth", "#!/bin/sh\nexit 0\n")
    rc, out, err = try_run(["--try-auth", "alice"], b"secret\n", tmp_path,
                           program_args=["--auth", auth, "--process", "/bin/cat",
                                         "--user", "nobody"])
    assert (rc, out) == (2, "")
    assert err.startswith("ssmtpd: --auth: ") and err.rstrip().endswith("(as --user nobody)"), err
