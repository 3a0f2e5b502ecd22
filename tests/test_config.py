"""Options from the command line, the environment and the ini file; start-up errors (docs/configuration.md "Configuration")."""

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from conftest import (AUTH, HOSTNAME, PASSWORD, RECORD, ROOT, USER, free_port, plain_token,
                      privileged_port)

RUN_TIMEOUT = 15.0


def clean_env(extra=None):
    """The test's environment without any SSMTPD_* leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSMTPD_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_ssmtpd(args, cwd, env=None):
    """Run `python -m ssmtpd args` to completion; a server that starts is a failed test."""
    try:
        return subprocess.run([sys.executable, "-m", "ssmtpd", *args], cwd=str(cwd),
                              env=clean_env(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"ssmtpd {args} still running after {RUN_TIMEOUT}s "
                             f"(it should have refused to start):\n{e.stderr}") from None


def write_ini(directory, body: str) -> str:
    path = os.path.join(str(directory), "ssmtpd.ini")
    with open(path, "w") as f:
        f.write("[ssmtpd]\n" + body)
    return path


def start(make_server, args=(), env=None, ini=None, tls=True, auth=True, process=True):
    """A server whose hostname, size and TLS policy come only from what the test gives."""
    srv = make_server(defaults=False, start=False, env=env)
    srv.env = {k: v for k, v in srv.env.items()
               if not k.startswith("SSMTPD_") or k == "TEST_RECORD" or k in (env or {})}
    argv = ["--bind", "127.0.0.1", "--port", str(srv.port), "--auth-failure-delay", "0"]
    if process:
        argv += ["--process", RECORD]
    if auth:
        argv += ["--auth", AUTH]
    if tls:
        argv += ["--ssl-cert", srv.cert, "--ssl-key", srv.key]
    if ini is not None:
        argv += ["-c", write_ini(srv.workdir, ini)]
    srv.argv += argv + list(args)
    return srv.start()


def probe(srv):
    """(greeting line, EHLO keyword lines) of a plain connection."""
    raw = srv.raw()
    try:
        code, greeting = raw.reply()
        assert code == 220, greeting
        code, lines = raw.cmd("EHLO client.test")
        assert code == 250, lines
        raw.cmd("QUIT")
        return greeting[0], [line[4:] for line in lines[1:]]
    finally:
        raw.close()


def size_of(keywords):
    (size,) = [k for k in keywords if k.startswith("SIZE ")]
    return int(size.split()[1])


def auth_before_tls(keywords) -> bool:
    return "AUTH PLAIN LOGIN" in keywords


# --- where a value comes from: CLI > env > ini > default ---------------------------

INI_VALUES = "hostname = ini.test\nmax-message-size = 1111\nrequire-tls = false\n"
ENV_VALUES = {"SSMTPD_HOSTNAME": "env.test", "SSMTPD_MAX_MESSAGE_SIZE": "2222",
              "SSMTPD_REQUIRE_TLS": "true"}
CLI_VALUES = ["--hostname", "cli.test", "--max-message-size", "3333", "--no-require-tls"]

LEVELS = {
    # name: (ini, env, cli, expected hostname, size, AUTH offered before TLS)
    "default": (None, None, [], None, 26214400, False),
    "ini": (INI_VALUES, None, [], "ini.test", 1111, True),
    "env-over-ini": (INI_VALUES, ENV_VALUES, [], "env.test", 2222, False),
    "cli-over-env": (INI_VALUES, ENV_VALUES, CLI_VALUES, "cli.test", 3333, True),
}


@pytest.mark.parametrize("level", list(LEVELS.values()), ids=list(LEVELS))
def test_precedence(make_server, level):
    """docs/configuration.md "Configuration": CLI > env > ini > default, for a string, an int and a boolean option."""
    ini, env, cli, hostname, size, auth_offered = level
    srv = start(make_server, cli, env=env, ini=ini)
    greeting, keywords = probe(srv)
    if hostname is None:
        from ssmtpd import config
        hostname = config._default_hostname()
    assert greeting == f"220 {hostname} ESMTP ssmtpd"
    assert size_of(keywords) == size
    assert auth_before_tls(keywords) is auth_offered


@pytest.mark.parametrize("ini", [
    "hostname = ini.test\nmax_message_size = 1111\nrequire_tls = false\n",
    "hostname = ini.test\nmax-message-size = 1111\nrequire-tls = no\n",
], ids=["underscore-keys", "dash-keys"])
def test_ini_key_spellings(make_server, ini):
    """docs/configuration.md "Configuration": ini keys are the long option names with `-` or `_`."""
    greeting, keywords = probe(start(make_server, ini=ini))
    assert greeting == "220 ini.test ESMTP ssmtpd"
    assert size_of(keywords) == 1111
    assert auth_before_tls(keywords)


def test_long_config_flag(make_server):
    """docs/configuration.md "Configuration": the ini file is also given by --config."""
    srv = make_server(defaults=False, start=False)
    ini = write_ini(srv.workdir, "hostname = long.test\n")
    srv.argv += ["--bind", "127.0.0.1", "--port", str(srv.port), "--auth", AUTH,
                 "--process", RECORD, "--config", ini]
    srv.start()
    assert probe(srv)[0] == "220 long.test ESMTP ssmtpd"


def test_config_file_from_environment(make_server):
    """docs/configuration.md "Configuration": a container can name its ini file in SSMTPD_CONFIG."""
    srv = make_server(defaults=False, start=False)
    from_env = write_ini(srv.workdir, "hostname = env-file.test\n")
    srv.env = dict(srv.env, SSMTPD_CONFIG=from_env)
    srv.argv += ["--bind", "127.0.0.1", "--port", str(srv.port), "--auth", AUTH,
                 "--process", RECORD]
    srv.start()
    assert probe(srv)[0] == "220 env-file.test ESMTP ssmtpd"


@pytest.mark.parametrize("env,cli,ini,offered", [
    ({"SSMTPD_REQUIRE_TLS": "false"}, [], None, True),
    ({"SSMTPD_REQUIRE_TLS": "false"}, ["--require-tls"], None, False),
    ({"SSMTPD_REQUIRE_TLS": "true"}, ["--no-require-tls"], None, True),
    (None, ["--require-tls"], "require_tls = false\n", False),
    ({"SSMTPD_REQUIRE_TLS": "0"}, [], "require-tls = true\n", True),
], ids=["env-false", "cli-true-over-env-false", "cli-false-over-env-true",
        "cli-true-over-ini-false", "env-0-over-ini-true"])
def test_boolean_sources(make_server, env, cli, ini, offered):
    """docs/configuration.md "Configuration", docs/dialogue.md "The dialogue": --require-tls / --no-require-tls from env, CLI and ini, CLI winning."""
    _, keywords = probe(start(make_server, cli, env=env, ini=ini))
    assert auth_before_tls(keywords) is offered


def test_int_from_env_limits_recipients(make_server):
    """docs/configuration.md "Configuration": SSMTPD_MAX_RECIPIENTS overrides the ini value: the 3rd RCPT gets 452 4.5.3."""
    srv = start(make_server, env={"SSMTPD_MAX_RECIPIENTS": "2"}, ini="max_recipients = 5\n")
    raw = srv.raw()
    try:
        raw.login(srv.tls_context())
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<r1@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<r2@example.org>")[0] == 250
        code, lines = raw.cmd("RCPT TO:<r3@example.org>")
        assert code == 452 and lines[0].startswith("452 4.5.3"), lines
    finally:
        raw.close()


# --- --help ------------------------------------------------------------------------------

# docs/configuration.md "Configuration"'s table: option → what its default must read like in --help.
HELP_DEFAULTS = {
    "hostname": r"\(default: [^)]*FQDN",
    "bind": r"\(default: all interfaces\)",
    "port": r"\(default: 8025\)",
    "smtps-port": r"\(default: off\)",
    "ssl-cert": r"\(default: [^)]*self-signed",
    "ssl-key": r"\(default: none",
    "auth": r"\(default: [^)]*required unless --no-require-auth",
    "process": r"\(default: [^)]*required",
    "require-tls": r"\(default: (on|True)\)",
    "require-auth": r"\(default: (on|True)\)",
    "max-message-size": r"\(default: 26214400\)",
    "max-recipients": r"\(default: 100\)",
    "max-connections": r"\(default: 1000\)",
    "max-connections-per-ip": r"\(default: 20\)",
    "max-connection-rate-per-ip": r"\(default: 100/1m\)",
    "max-messages-per-user": r"\(default: 1000/1h\)",
    "max-recipients-per-user": r"\(default: 5000/1h\)",
    "max-sessions-per-user": r"\(default: 20\)",
    "timeout": r"\(default: 300(\.0)?\)",
    "data-timeout": r"\(default: 600(\.0)?\)",
    "auth-timeout": r"\(default: 30(\.0)?\)",
    "auth-failure-delay": r"\(default: 1(\.0)?\)",
    "auth-mechanisms": r"\(default: PLAIN,LOGIN\)",
    "process-timeout": r"\(default: 300(\.0)?\)",
    "received-header": r"\(default: (on|True)\)",
    "log-level": r"\(default: info\)",
}


def help_blocks(text: str):
    """--help text cut into one whitespace-normalised block per option."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (?:-\w[ ,\w]*, )?--([a-z-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif line.startswith("  ") and current is not None and not line.startswith("  -"):
            blocks[current] += " " + line
        else:
            current = None
    return {name: " ".join(block.split()) for name, block in blocks.items()}


def test_help(tmp_path):
    """docs/configuration.md "Configuration": --help exits 0 and shows each option with its SSMTPD_ env var and default."""
    result = run_ssmtpd(["--help"], tmp_path, env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    blocks = help_blocks(result.stdout)
    assert "config" in blocks
    for name, default in HELP_DEFAULTS.items():
        assert name in blocks, f"--{name} missing from --help"
        block = blocks[name]
        env_var = "SSMTPD_" + name.replace("-", "_").upper()
        assert f"env var: {env_var}]" in block, block
        assert re.search(default, block), f"--{name}: default {default!r} not in {block!r}"
    for name in ("require-tls", "require-auth", "received-header"):
        assert f"--no-{name}" in blocks[name]


# --- bad configuration: one line, exit 2 --------------------------------------------------

def valid_args(certs, port=None):
    _, cert, key = certs
    return ["--bind", "127.0.0.1", "--port", str(port or free_port()), "--hostname", HOSTNAME,
            "--auth", AUTH, "--process", RECORD, "--ssl-cert", cert, "--ssl-key", key]


def without(args, *options):
    """args minus each named option and its value."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            out.append(arg)
    return out


def assert_refused(result, option: str):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert "Traceback" not in line and "usage" not in line.lower(), line
    assert line.startswith("ssmtpd: "), line
    assert option in line, f"{option!r} not named in {line!r}"
    assert result.stdout == "", result.stdout


@pytest.fixture
def bad_files(tmp_path, certs):
    not_exec = tmp_path / "not-executable"
    not_exec.write_text("#!/bin/sh\nexit 0\n")
    not_exec.chmod(0o644)
    not_pem = tmp_path / "not-pem.crt"
    not_pem.write_text("this is not a certificate\n")
    ini = tmp_path / "bogus.ini"
    ini.write_text("[ssmtpd]\nbogus = 1\n")
    ini_bool = tmp_path / "bool.ini"
    ini_bool.write_text("[ssmtpd]\nrequire_tls = maybe\n")
    ini_port = tmp_path / "port.ini"
    ini_port.write_text("[ssmtpd]\nport = 0\n")
    ini_mechanisms = tmp_path / "mechanisms.ini"
    ini_mechanisms.write_text("[ssmtpd]\nauth_mechanisms = PLAIN XOAUTH2\n")
    files = {"not_exec": str(not_exec), "not_pem": str(not_pem), "ini": str(ini),
             "ini_bool": str(ini_bool), "ini_port": str(ini_port),
             "ini_mechanisms": str(ini_mechanisms)}
    # Programs that exec(2) would refuse at every login or message.
    for name, text in [("no_shebang", "echo hello\n"), ("cr_shebang", "#!/bin/sh\r\nexit 0\n"),
                       ("bad_interpreter", "#!/nonexistent/python\nexit 0\n"),
                       ("env_missing", "#!/usr/bin/env no-such-interpreter\nexit 0\n")]:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o755)
        files[name] = str(path)
    for name, text in [("ini_typo", "[ssmtpd]\nprot = 25\n"),
                       ("ini_dashes", "[ssmtpd]\n--port = 25\n"),
                       ("ini_port_word", "[ssmtpd]\nport = x25\n"),
                       ("ini_no_header", "port = 25\n"),
                       ("ini_check_config", "[ssmtpd]\ncheck-config = true\n"),
                       ("ini_other_section", "[smtpd]\nport = 25\n")]:
        path = tmp_path / f"{name}.ini"
        path.write_text(text)
        files[name] = str(path)
    _, cert, key = certs
    files["cert"], files["key"] = cert, key
    return files


BAD_CONFIGS = {
    # name: (options to drop from a valid command line, arguments to add, env, option named)
    "port-zero": ((), ["--port", "0"], None, "--port"),
    "port-too-big": ((), ["--port", "70000"], None, "--port"),
    "port-not-a-number": ((), ["--port", "abc"], None, "--port"),
    "port-from-env": (("--port",), [], {"SSMTPD_PORT": "0"}, "--port"),
    "port-from-ini": (("--port",), ["-c", "{ini_port}"], None, "--port"),
    "smtps-port-equals-port": ((), ["--smtps-port", "{port}"], None, "--smtps-port"),
    "ssl-cert-missing-file": ((), ["--ssl-cert", "/nonexistent/cert.pem"], None, "--ssl-cert"),
    "ssl-cert-without-key": (("--ssl-key",), [], None, "--ssl-key"),
    "ssl-key-without-cert": (("--ssl-cert",), [], None, "--ssl-cert"),
    "ssl-cert-not-pem": ((), ["--ssl-cert", "{not_pem}"], None, "--ssl-cert"),
    "auth-not-executable": ((), ["--auth", "{not_exec}"], None, "--auth"),
    "auth-nonexistent": ((), ["--auth", "/nonexistent/auth"], None, "--auth"),
    "auth-missing": (("--auth",), [], None, "--auth"),
    "auth-empty": ((), ["--auth", ""], None, "--auth"),
    "auth-unbalanced-quote": ((), ["--auth", "'{not_exec}"], None, "--auth"),
    "process-missing": (("--process",), [], None, "--process"),
    "process-not-executable": ((), ["--process", "{not_exec}"], None, "--process"),
    "unknown-ini-key": ((), ["-c", "{ini}"], None, "bogus"),
    "unknown-option": ((), ["--bogus-option", "1"], None, "--bogus-option"),
    "timeout-negative": ((), ["--timeout", "-1"], None, "--timeout"),
    "timeout-zero": ((), ["--timeout=0"], None, "--timeout"),
    "max-recipients-zero": ((), ["--max-recipients", "0"], None, "--max-recipients"),
    "auth-failure-delay-negative": ((), ["--auth-failure-delay=-1"], None,
                                    "--auth-failure-delay"),
    "log-level-unknown": ((), ["--log-level", "loud"], None, "--log-level"),
    # docs/auth-program.md "OAuth 2 tokens": only the four mechanisms, each once.
    "auth-mechanisms-unknown": ((), ["--auth-mechanisms", "PLAIN,CRAM-MD5"], None,
                                "--auth-mechanisms: 'CRAM-MD5' is not one of PLAIN, LOGIN, "
                                "OAUTHBEARER, XOAUTH2"),
    "auth-mechanisms-empty-from-env": ((), [], {"SSMTPD_AUTH_MECHANISMS": "XOAUTH2,"},
                                       "--auth-mechanisms: an empty name is not one of"),
    "auth-mechanisms-ini-without-commas": ((), ["-c", "{ini_mechanisms}"], None,
                                           "--auth-mechanisms: 'PLAIN XOAUTH2' is not one of"),
    "auth-mechanisms-twice": ((), ["--auth-mechanisms", "xoauth2,XOAUTH2"], None,
                              "--auth-mechanisms: names a mechanism twice"),
    "require-tls-env-maybe": ((), [], {"SSMTPD_REQUIRE_TLS": "maybe"}, "REQUIRE_TLS"),
    "require-tls-ini-maybe": ((), ["-c", "{ini_bool}"], None, "require-tls"),
    "bind-not-an-ip": ((), ["--bind", "not-an-ip"], None, "--bind"),
    "workers-zero": ((), ["--workers", "0"], None, "--workers"),
    "process-without-shebang": ((), ["--process", "{no_shebang}"], None,
                                "is neither a binary nor a script with a #! line"),
    "auth-shebang-with-cr": ((), ["--auth", "{cr_shebang}"], None,
                             "its #! line ends in a carriage return"),
    "process-interpreter-missing": ((), ["--process", "{bad_interpreter}"], None,
                                    "its #! interpreter /nonexistent/python is not"),
    "auth-env-interpreter-missing": ((), ["--auth", "{env_missing}"], None,
                                     "its #! line runs no-such-interpreter, which is not in PATH"),
    "timeout-nan-env": ((), [], {"SSMTPD_TIMEOUT": "nan"}, "--timeout: must be a number, not nan"),
    "timeout-inf": ((), ["--timeout", "inf"], None, "--timeout: must be a number, not inf"),
    "rate-without-window": ((), ["--max-connection-rate-per-ip", "100"], None,
                            "--max-connection-rate-per-ip: '100' is not COUNT/WINDOW"),
    "rate-bad-unit-from-env": ((), [], {"SSMTPD_MAX_CONNECTION_RATE_PER_IP": "10/1m,5/2y"},
                               "--max-connection-rate-per-ip: '5/2y' is not COUNT/WINDOW"),
    "messages-per-user-without-window": ((), ["--max-messages-per-user", "1000"], None,
                                         "--max-messages-per-user: '1000' is not COUNT/WINDOW"),
    "messages-per-user-count-zero": ((), ["--max-messages-per-user", "100/1m,0/1h"], None,
                                     "--max-messages-per-user: '0/1h' is not COUNT/WINDOW"),
    "recipients-per-user-bad-unit-from-env": ((), [], {"SSMTPD_MAX_RECIPIENTS_PER_USER":
                                                       "10/1m,5/2y"},
                                              "--max-recipients-per-user: '5/2y' is not "
                                              "COUNT/WINDOW"),
    "sessions-per-user-negative": ((), ["--max-sessions-per-user=-1"], None,
                                   "--max-sessions-per-user: must be 0 or more"),
    "state-not-redis": ((), ["--state", "http://127.0.0.1:6379"], None,
                        "--state: must be a redis://, rediss:// or unix:// URL"),
    "state-timeout-zero": ((), ["--state-timeout", "0"], None, "--state-timeout"),
    "port-word-from-env": (("--port",), [], {"SSMTPD_PORT": "abc"},
                           "--port: SSMTPD_PORT='abc' is not a whole number"),
    "env-one-typo-away": ((), [], {"SSMTPD_PORTS": "25"},
                          "--port: unknown variable SSMTPD_PORTS; did you mean SSMTPD_PORT?"),
    "env-several-edits-away": ((), [], {"SSMTPD_SSL_CERTIFICATE": "/etc/ssl/mail.pem"},
                               "--ssl-cert: unknown variable SSMTPD_SSL_CERTIFICATE; "
                               "did you mean SSMTPD_SSL_CERT?"),
    "env-like-no-option": ((), [], {"SSMTPD_DEBUG": "1"}, "unknown variable SSMTPD_DEBUG: no "
                           "option reads it (the nearest is --"),
    "env-example": ((), [], {"SSMTPD_EXAMPLE": "config"}, "unknown variable SSMTPD_EXAMPLE"),
    "env-test-prefix": ((), [], {"SSMTPD_TEST_RECORD": "/tmp"},
                        "unknown variable SSMTPD_TEST_RECORD"),
    "env-check-config": ((), [], {"SSMTPD_CHECK_CONFIG": "true"},
                         "--check-config: is command-line only; remove SSMTPD_CHECK_CONFIG"),
    "ini-check-config": ((), ["-c", "{ini_check_config}"], None,
                         "--check-config: is command-line only, not an ini key"),
    "abbreviated-option": ((), ["--max-recipient", "5"], None,
                           "unrecognized arguments: --max-recipient 5"),
    "abbreviated-boolean": ((), ["--no-require-t"], None, "unrecognized arguments: --no-require-t"),
    "ini-without-section": ((), ["-c", "{ini_no_header}"], None,
                            "--config: cannot parse: File contains no section headers. file: "
                            "'{ini_no_header}'"),
    "ini-other-section": ((), ["-c", "{ini_other_section}"], None,
                          "--config: no [ssmtpd] section in {ini_other_section}"),
    "ini-key-typo": ((), ["-c", "{ini_typo}"], None, "unknown key 'prot' in [ssmtpd] of"),
    "ini-key-typo-hint": ((), ["-c", "{ini_typo}"], None, "did you mean port?"),
    "ini-key-with-dashes": ((), ["-c", "{ini_dashes}"], None,
                            "keys are option names without the leading dashes (port = ...)"),
    "ini-port-word": (("--port",), ["-c", "{ini_port_word}"], None,
                      "--port: port = 'x25' in "),
    "ssl-cert-and-key-swapped": (("--ssl-cert", "--ssl-key"),
                                 ["--ssl-cert", "{key}", "--ssl-key", "{cert}"], None,
                                 "the two files are swapped"),
    "group-without-user": ((), ["--group", "nogroup"], None, "--group: needs --user"),
    "user-unknown": ((), ["--user", "no-such-user-here"], None,
                     "--user: no such user 'no-such-user-here'"),
    "max-auth-programs-zero": ((), ["--max-auth-programs", "0"], None, "--max-auth-programs"),
    "auth-failure-window-zero": ((), ["--auth-failure-window", "0"], None,
                                 "--auth-failure-window"),
    "ipv6-prefix-length-129": ((), ["--ipv6-prefix-length", "129"], None,
                               "--ipv6-prefix-length"),
    "busy-timeout-zero": ((), ["--busy-timeout", "0"], None, "--busy-timeout"),
    "proxy-protocol-untrusted": ((), ["--proxy-protocol"], None, "--proxy-trusted"),
    "proxy-trusted-not-a-network": ((), ["--proxy-protocol", "--proxy-trusted", "10.0.0.0/33"],
                                    None, "--proxy-trusted"),
    "spool-dir-missing": ((), ["--spool-dir", "/nonexistent/spool"], None, "--spool-dir"),
    "config-file-missing": ((), ["-c", "/nonexistent/ssmtpd.ini"], None,
                            "/nonexistent/ssmtpd.ini"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config(tmp_path, certs, bad_files, case):
    """docs/configuration.md "Configuration": a bad value stops start-up with one line naming the option, exit status 2."""
    drop, add, env, option = case
    port = free_port()
    args = without(valid_args(certs, port), *drop) + add
    args = [a.format(port=port, **bad_files) for a in args]
    assert_refused(run_ssmtpd(args, tmp_path, env), option.format(**bad_files))


def test_address_not_on_this_machine_names_bind(tmp_path, certs):
    """docs/configuration.md "Configuration": an address the machine does not have blames --bind, not --port."""
    args = without(valid_args(certs), "--bind") + ["--bind", "192.0.2.1"]
    result = run_ssmtpd(args, tmp_path)
    assert_refused(result, "--bind: cannot listen on 192.0.2.1")


def test_one_pem_with_certificate_and_key(tmp_path, certs):
    """docs/configuration.md "Configuration": --ssl-cert alone may name one PEM holding the chain and the key."""
    _, cert, key = certs
    both = tmp_path / "both.pem"
    both.write_bytes(open(cert, "rb").read() + open(key, "rb").read())
    args = without(valid_args(certs), "--ssl-cert", "--ssl-key") + ["--ssl-cert", str(both),
                                                                    "--check-config"]
    result = run_ssmtpd(args, tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, CHECKED_OK, "")


def test_quoted_ini_value_loses_its_quotes(tmp_path, monkeypatch):
    """docs/configuration.md "Configuration": `hostname = "mail.example.org"` means mail.example.org; a
    program value keeps its quotes for the shell-style split."""
    from ssmtpd import config
    ini = tmp_path / "q.ini"
    ini.write_text(f'[ssmtpd]\nhostname = "mail.example.org"\nprocess = "{RECORD}" --x\n'
                   "require-auth = 'false'\n")
    for key in list(os.environ):
        if key.startswith("SSMTPD_"):
            monkeypatch.delenv(key)
    settings = config.parse(["-c", str(ini)])
    assert settings.hostname == "mail.example.org"
    assert settings.process == (RECORD, "--x")
    assert settings.require_auth is False


def test_version(tmp_path):
    """docs/configuration.md "Configuration": --version prints `ssmtpd X.Y.Z` and exits 0."""
    from ssmtpd import __version__
    result = run_ssmtpd(["--version"], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"ssmtpd {__version__}\n", "")


# What --check-config prints for valid_args(): the file each program option runs, then OK.
CHECKED_OK = (f"ssmtpd: --auth runs {AUTH}\nssmtpd: --process runs {RECORD}\n"
              "ssmtpd: configuration OK\n")


def test_check_config(tmp_path, certs):
    """docs/configuration.md "Configuration": --check-config checks as a start would, binds nothing, and
    says OK (exit 0) or the usual one line (exit 2)."""
    with socket.socket() as taken:  # a port in use is not its business: it binds nothing
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_ssmtpd(valid_args(certs, port) + ["--check-config"], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, CHECKED_OK, "")
    bad = without(valid_args(certs), "--process") + ["--process", "/nonexistent/x",
                                                     "--check-config"]
    assert_refused(run_ssmtpd(bad, tmp_path), "--process")


def test_port_in_use_with_workers(tmp_path, certs):
    """docs/scaling.md "Scaling", docs/configuration.md "Configuration": with --workers the master binds first: a taken port is the same one
    line and exit 2, and no worker starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_ssmtpd(valid_args(certs, port) + ["--workers", "2"], tmp_path)
    assert_refused(result, "--port")
    assert "worker" not in result.stderr


def test_port_error_comes_before_any_warning(tmp_path, certs):
    """docs/configuration.md "Configuration": without a certificate (and as root) the warnings come
    only once the ports are bound, so a port error is the one line on stderr."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = without(valid_args(certs, port), "--ssl-cert", "--ssl-key")
        result = run_ssmtpd(args, tmp_path)
    assert_refused(result, "--port")


def test_port_below_1024_says_how(tmp_path, certs):
    """docs/configuration.md "Configuration", docs/deploying.md "Deploying": a port below 1024 refused for want of privilege
    is one line that names the port and both ways to get it: root with --user, or
    CAP_NET_BIND_SERVICE."""
    # Whoever runs the tests: a process without the capability, as a plain user is.
    wrapper = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv(1) is needed to drop CAP_NET_BIND_SERVICE as root")
        wrapper = ["setpriv", "--inh-caps=-net_bind_service",
                   "--bounding-set=-net_bind_service"]
    port = privileged_port()
    argv = wrapper + [sys.executable, "-m", "ssmtpd"] + valid_args(certs, port)
    result = subprocess.run(argv, cwd=str(tmp_path), env=clean_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert_refused(result, f"--port: cannot listen on port {port}: Permission denied; ")
    assert "--user" in result.stderr and "CAP_NET_BIND_SERVICE" in result.stderr


def test_reserved_variables_are_accepted(tmp_path, certs):
    """docs/configuration.md "Configuration": the SSMTPD_ variables the server sets for its programs, and
    variables without the prefix, do not stop a start."""
    env = {name: "x" for name in (
        "SSMTPD_USERNAME", "SSMTPD_PASSWORD", "SSMTPD_MECHANISM", "SSMTPD_TOKEN",
        "SSMTPD_CLIENT_ADDR", "SSMTPD_MAIL_FROM", "SSMTPD_RCPT_TO", "SSMTPD_HELO",
        "SSMTPD_TLS", "TEST_ANYTHING")}
    result = run_ssmtpd(valid_args(certs) + ["--check-config"], tmp_path, env)
    assert (result.returncode, result.stdout, result.stderr) == (0, CHECKED_OK, "")


def test_full_option_names_still_work_everywhere(tmp_path, certs):
    """docs/configuration.md "Configuration": without abbreviations, the full names still come from the
    command line (also as --name=value), the environment and the ini file."""
    ini = tmp_path / "full.ini"
    ini.write_text("[ssmtpd]\nmax-recipients = 5\n")
    env = {"SSMTPD_MAX_CONNECTIONS": "7"}
    for args in (["--max-recipients", "5"], ["--max-recipients=5"], ["-c", str(ini)], []):
        result = run_ssmtpd(valid_args(certs) + args + ["--check-config"], tmp_path, env)
        assert (result.returncode, result.stderr) == (0, ""), args


# --- the default --hostname -------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "localhost4", "localhost6", "ip6-localhost", "ip6-loopback")


def default_greeting_name(make_server, wrapper=()):
    """The name a server started without --hostname greets with."""
    srv = make_server(defaults=False, start=False)
    srv.argv = list(wrapper) + srv.argv + [
        "--bind", "127.0.0.1", "--port", str(srv.port), "--auth", AUTH, "--process", RECORD,
        "--ssl-cert", srv.cert, "--ssl-key", srv.key]
    srv.start()
    greeting = probe(srv)[0]
    assert greeting.startswith("220 ") and greeting.endswith(" ESMTP ssmtpd"), greeting
    return greeting[4:-len(" ESMTP ssmtpd")]


def test_default_hostname_is_this_machines_name(make_server):
    """docs/configuration.md "Configuration": without --hostname the greeting names the machine as
    `hostname -f` does, never a loopback name while the machine has another."""
    name = default_greeting_name(make_server)
    if socket.gethostname().split(".")[0] not in LOOPBACK_NAMES:
        assert name.split(".")[0] not in LOOPBACK_NAMES, name
    if shutil.which("hostname"):
        full = subprocess.run(["hostname", "-f"], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT).stdout.strip()
        if "." in full and full.split(".")[0] not in LOOPBACK_NAMES:
            assert name == full


@pytest.mark.parametrize("hosts,expected", [
    # The hostname on 127.0.0.1 after localhost: the address's first name is
    # localhost, the hostname's canonical name is the full one.
    ("127.0.0.1 localhost\n127.0.0.1 mail.example.test mail\n", "mail.example.test"),
    # Only loopback names and the bare hostname: the bare hostname.
    ("127.0.0.1 localhost\n127.0.1.1 localhost mail\n", "mail"),
], ids=["canonical-name", "bare-hostname"])
def test_default_hostname_where_hosts_file_says_localhost_first(make_server, tmp_path, hosts,
                                                                expected):
    """docs/configuration.md "Configuration": the default --hostname under an /etc/hosts that makes a
    reverse lookup answer localhost (a host of its own: UTS and mount namespaces)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--uts", "--mount", "true"], capture_output=True,
            timeout=RUN_TIMEOUT).returncode != 0:
        pytest.skip("needs root and unshare(1) for a hostname and /etc/hosts of its own")
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts)
    script = f'hostname mail && mount --bind {hosts_file} /etc/hosts && exec "$@"'
    wrapper = ["unshare", "--uts", "--mount", "sh", "-c", script, "sh"]
    assert default_greeting_name(make_server, wrapper) == expected


def test_port_in_use(tmp_path, certs):
    """docs/configuration.md "Configuration": a port that cannot be bound stops start-up with one line naming --port, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_ssmtpd(valid_args(certs, port), tmp_path)
    assert_refused(result, "--port")


def test_smtps_port_in_use(tmp_path, certs):
    """docs/configuration.md "Configuration": the same holds for --smtps-port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_ssmtpd(valid_args(certs) + ["--smtps-port", str(port)], tmp_path)
    assert_refused(result, "--smtps-port")


# --- programs: required or not, split shell-style, never through a shell -----------------

def test_no_require_auth_runs_without_auth_program(make_server):
    """docs/configuration.md "Configuration": with --no-require-auth no --auth is needed and mail is taken without AUTH."""
    srv = start(make_server, ["--no-require-auth"], auth=False)
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(srv.tls_context())
        assert raw.cmd("EHLO client.test")[0] == 250
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send("Subject: t\r\n\r\nhi\r\n.\r\n")
        assert raw.reply()[0] == 250
    finally:
        raw.close()
    (run,) = srv.runs()
    assert run["argv"] == [RECORD, ""]
    assert run["env"]["SSMTPD_USERNAME"] == ""


def test_no_auth_program_refuses_auth(make_server):
    """docs/configuration.md "Configuration": without an auth program AUTH is not offered, and AUTH gets a reply, not a crash."""
    srv = start(make_server, ["--no-require-auth"], auth=False)
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(srv.tls_context())
        code, ehlo = raw.cmd("EHLO client.test")
        code, lines = raw.cmd(f"AUTH PLAIN {plain_token()}")
        assert code in (454, 502, 503), lines
        assert raw.cmd("NOOP")[0] == 250
    finally:
        raw.close()
    # Offering what can only fail would send clients into a retry loop (RFC 4954 §4).
    assert not any(line[4:].startswith("AUTH") for line in ehlo), ehlo


def test_ini_percent_sign_is_literal(make_server):
    """docs/configuration.md "Configuration": an ini value runs to the end of its line; a `%` in it is an ordinary character."""
    srv = make_server(defaults=False, start=False)
    ini = write_ini(srv.workdir, f"process = {RECORD} 100% %(x)s\n")
    srv.argv += ["--bind", "127.0.0.1", "--port", str(srv.port), "--auth", AUTH,
                 "--ssl-cert", srv.cert, "--ssl-key", srv.key, "-c", ini]
    srv.start()
    assert deliver_one(srv)[0] == 250
    (run,) = srv.runs()
    assert run["argv"] == [RECORD, "100%", "%(x)s", USER]


@pytest.fixture
def spaced_record(tmp_path):
    """A copy of the record program in a directory whose name has a space."""
    directory = tmp_path / "my programs"
    directory.mkdir()
    path = directory / "record it"
    shutil.copy(RECORD, path)
    return str(path)


def deliver_one(srv):
    raw = srv.raw()
    try:
        raw.login(srv.tls_context())
        assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        raw.send("Subject: t\r\n\r\nhi\r\n.\r\n")
        return raw.reply()
    finally:
        raw.close()


def test_program_split_shell_style(make_server, spaced_record):
    """docs/configuration.md "Configuration": --process is split shell-style: quotes keep a spaced path and argument whole."""
    srv = make_server("--process", f"'{spaced_record}' arg1 \"two words\"")
    assert deliver_one(srv)[0] == 250
    (run,) = srv.runs()
    assert run["argv"] == [spaced_record, "arg1", "two words", USER]


@pytest.mark.parametrize("where", ["env", "ini"])
def test_program_split_shell_style_env_and_ini(make_server, spaced_record, where):
    """docs/configuration.md "Configuration": a quoted program value from the env or the ini file is split shell-style too."""
    value = f"'{spaced_record}'"
    if where == "env":
        srv = start(make_server, env={"SSMTPD_PROCESS": value}, process=False)
    else:
        srv = start(make_server, ini=f"process = {value}\n", process=False)
    assert deliver_one(srv)[0] == 250
    (run,) = srv.runs()
    assert run["argv"] == [spaced_record, USER]


def test_program_never_through_a_shell(make_server, tmp_path):
    """docs/configuration.md "Configuration": shell syntax in a program value is passed as literal arguments, never run."""
    marker = tmp_path / "pwned"
    process = f"{RECORD} ; touch {marker} && touch {marker} $(touch {marker})"
    auth = f"{AUTH} | touch {marker}"
    srv = make_server("--process", process, "--auth", auth, start=False)
    try:
        srv.start()
    except RuntimeError:
        # Refusing such a value at start-up is the other acceptable answer.
        assert srv.proc.wait(timeout=10) == 2
        assert not marker.exists()
        return
    assert deliver_one(srv)[0] == 250
    (run,) = srv.runs()
    assert run["argv"] == [RECORD, ";", "touch", str(marker), "&&", "touch", str(marker),
                           "$(touch", f"{marker})", USER]
    (auth_run,) = srv.runs("auth")
    assert auth_run["argv"] == [AUTH, "|", "touch", str(marker)]
    assert not marker.exists()


# --- signals without a certificate -------------------------------------------------------

def test_sighup_without_certificate(make_server):
    """docs/configuration.md "Configuration", docs/operations.md "Signals": without a certificate STARTTLS is self-signed, and SIGHUP keeps running."""
    srv = make_server(with_tls=False)
    srv.wait_log("self-signed")
    for _ in range(2):
        srv.signal(signal.SIGHUP)
    srv.wait_log("reload: new sessions use")
    assert srv.proc.poll() is None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = srv.raw()
    try:
        assert raw.reply()[0] == 220
        assert raw.cmd("EHLO client.test")[0] == 250
        raw.starttls(ctx)
        der = raw.sock.getpeercert(binary_form=True)
        assert raw.cmd("EHLO client.test")[0] == 250
        assert raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")[0] == 235
    finally:
        raw.close()
    from cryptography import x509
    cert = x509.load_der_x509_certificate(der)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert HOSTNAME in names.get_values_for_type(x509.DNSName)
    assert srv.proc.poll() is None
