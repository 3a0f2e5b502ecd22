"""The one table of options, and the parser and Settings built from it (docs/configuration.md "Configuration").

Each Option yields a command-line flag, its SSMTPD_* environment variable, its
ini key (`-` or `_`), the --help line and a validator.  Validation errors
become ConfigError("--name: why"), which the CLI prints on one line with exit 2.
"""

import argparse
import configparser
import difflib
import importlib.util
import ipaddress
import math
import os
import shlex
import shutil
import socket
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, Tuple

import configargparse

from ssmtpd import __version__, privileges, sasl

ENV_PREFIX = "SSMTPD_"
INI_SECTION = "ssmtpd"


class ConfigError(Exception):
    """A bad setting; str() is the one line printed before exit 2."""


@dataclass(frozen=True)
class Option:
    name: str  # long option without dashes, e.g. "max-message-size"
    default: Any
    help: str
    kind: str = "str"  # str, int, float, bool
    check: Optional[Callable[[Any], Any]] = None  # returns the cleaned value or raises ValueError

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name


# --- validators: each raises ValueError with the reason --------------------

def _port(value):
    if not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


def _optional_port(value):
    return None if value in (None, 0) else _port(value)


_RATE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _rate(value):
    """RATE: COUNT/WINDOW[,COUNT/WINDOW...], WINDOW a number with s, m, h or d
    ("100/1m,1000/1h"), or 0 for none: a tuple of (count, seconds)."""
    if isinstance(value, tuple):
        return value
    text = str(value).strip()
    if text == "0":
        return ()
    rates = []
    for part in text.split(","):
        count, slash, window = part.strip().partition("/")
        unit = _RATE_UNITS.get(window[-1:])
        try:
            seconds = float(window[:-1]) * unit if unit else float("nan")
        except ValueError:
            seconds = float("nan")
        if not slash or not count.isdigit() or int(count) < 1 or not 0 < seconds < math.inf:
            raise ValueError(f"{part.strip()!r} is not COUNT/WINDOW (e.g. 100/1m; "
                             "WINDOW in s, m, h or d), and the whole is not 0")
        rates.append((int(count), seconds))
    return tuple(rates)


def _state_url(value):
    if value is None:
        return None
    if value.split("://", 1)[0] not in ("redis", "rediss", "unix") or "://" not in value:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    # Looked for, not imported: only a server with --state loads it.
    if importlib.util.find_spec("redis") is None:
        raise ValueError("needs the Python package redis (pip install 'ssmtpd[redis]')")
    return value


def _finite(value):
    # float("nan") and float("inf") parse, and would switch a timeout off.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a number, not {value}")
    return value


def _positive(value):
    if _finite(value) <= 0:
        raise ValueError("must be greater than 0")
    return value


def _not_negative(value):
    if _finite(value) < 0:
        raise ValueError("must be 0 or more")
    return value


def _prefix_length(value):
    if not 0 <= value <= 128:
        raise ValueError("must be 0-128")
    return value


def _spool_dir(value):
    """A directory we can create files in (docs/limits.md "Limits and abuse")."""
    value = value or tempfile.gettempdir()
    if not os.path.isdir(value):
        raise ValueError(f"{value} is not a directory")
    try:
        with tempfile.TemporaryFile(prefix="ssmtpd-check-", dir=value):
            pass
    except OSError as e:
        raise ValueError(f"cannot create files in {value}: {e.strerror}") from None
    return value


def _networks(value):
    """CIDR[,CIDR...] -> a tuple of networks; a bare address is a /32 or /128."""
    if value in (None, ""):
        return ()
    networks = []
    for part in value.split(","):
        try:
            networks.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not an address or CIDR network") from None
    return tuple(networks)


def _holds_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read(1 << 20)
    except OSError:
        return False


def _metrics_bind(value):
    if value in (None, ""):
        return None
    from ssmtpd.metrics import parse_bind
    return parse_bind(value)


def _readable_file(value):
    if value is None:
        return None
    try:
        with open(value, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {value}: {e.strerror}") from None
    return value


def _program(value):
    """Split shell-style (docs/configuration.md "Configuration") and check the program can be executed."""
    if value is None:
        return None
    try:
        argv = tuple(shlex.split(value))
    except ValueError as e:
        raise ValueError(f"cannot parse {value!r}: {e}") from None
    if not argv:
        raise ValueError("is empty")
    exe = argv[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ValueError(f"{exe} is not an executable file")
        path = exe
    else:
        path = _which(exe)
        if path is None:
            raise ValueError(f"{exe} not found in PATH")
        # The program that runs is the one found now, not whatever PATH
        # holds when it is started (docs/configuration.md "Configuration").
        argv = (path,) + argv[1:]
    _check_startable(exe, path)
    return argv


def _which(name: str) -> Optional[str]:
    """A bare program name as docs/configuration.md "Configuration" says it is looked up.

    One of ssmtpd's own commands (ssmtpd-...) first among the commands
    installed with this ssmtpd, so another installation's earlier in PATH
    cannot take its place; then PATH, then next to the Python running us,
    where a virtualenv's commands are even when it was never activated.
    """
    own = (sysconfig.get_path("scripts"),) if name.startswith("ssmtpd-") else ()
    for directory in own + (None, os.path.dirname(sys.executable)):
        path = shutil.which(name, path=directory)
        if path is not None:
            return os.path.abspath(path)
    return None


def _check_startable(exe: str, path: str) -> None:
    """Refuse now what exec would refuse at every login or message later.

    The kernel runs a file that starts with an ELF header, or with a `#!` line
    naming an interpreter that exists; anything else fails with "Exec format
    error" (a script without `#!`), and a `#!` line saved with Windows line
    ends names "/bin/sh\r", which does not exist.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise ValueError(f"cannot read {exe}: {e.strerror}") from None
    if head.startswith(b"\x7fELF"):
        return
    if not head.startswith(b"#!"):
        raise ValueError(f"{exe} is neither a binary nor a script with a #! line "
                         "(a script must start with one, such as #!/bin/sh)")
    line = head[2:].split(b"\n", 1)[0]
    if b"\r" in line:
        raise ValueError(f"{exe}: its #! line ends in a carriage return (saved with Windows "
                         "line ends?); the interpreter would not be found")
    words = line.decode("utf-8", "replace").split()
    if not words:
        raise ValueError(f"{exe}: its #! line names no interpreter")
    interpreter = words[0]
    if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        raise ValueError(f"{exe}: its #! interpreter {interpreter} is not an executable file")
    if os.path.basename(interpreter) == "env" and len(words) > 1 \
            and not words[1].startswith("-") and shutil.which(words[1]) is None:
        raise ValueError(f"{exe}: its #! line runs {words[1]}, which is not in PATH")


def _bind(value):
    if value in (None, ""):
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
            return value
        except OSError:
            pass
    raise ValueError(f"{value!r} is not an IPv4 or IPv6 address")


# Names /etc/hosts commonly gives the loopback addresses (with or without a domain).
_LOOPBACK_NAMES = ("", "localhost", "localhost4", "localhost6", "ip6-localhost", "ip6-loopback")


def _default_hostname() -> str:
    """The machine's name as `hostname -f` gives it, never "localhost" if it has another.

    socket.getfqdn() takes the first name of the hostname's address, which is
    "localhost" where /etc/hosts lists the hostname on a loopback line after
    it; `hostname -f` asks the resolver for the hostname's canonical name.  A
    name with a domain is preferred to one without (docs/configuration.md "Configuration").
    """
    name = socket.gethostname()
    candidates = []
    try:
        candidates += [info[3] for info in socket.getaddrinfo(
            name, None, flags=socket.AI_CANONNAME) if info[3]]
    except OSError:
        pass  # a hostname the resolver does not know: what follows still holds
    candidates += [socket.getfqdn(name), name]
    real = [c for c in candidates if c.split(".")[0].lower() not in _LOOPBACK_NAMES]
    qualified = [c for c in real if "." in c]
    return (qualified or real or ["localhost"])[0]


def _hostname(value):
    value = value or _default_hostname()
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} is not a host name")
    return value


def _mechanisms(value):
    """MECHANISM[,MECHANISM...] of sasl.MECHANISMS, in the order given: a tuple."""
    if isinstance(value, tuple):
        return value
    names = [part.strip().upper() for part in str(value).split(",")]
    for name in names:
        if name not in sasl.MECHANISMS:
            shown = repr(name) if name else "an empty name"
            raise ValueError(f"{shown} is not one of {', '.join(sasl.MECHANISMS)}")
    if len(set(names)) != len(names):
        raise ValueError("names a mechanism twice")
    return tuple(names)


def _log_level(value):
    value = value.lower()
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return value


def _log_format(value):
    value = value.lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


OPTIONS: Tuple[Option, ...] = (
    Option("hostname", None, "name in the greeting, EHLO reply and Received header "
           "(default: the machine's FQDN)", check=_hostname),
    Option("bind", None, "address to listen on, IPv4 or IPv6 (default: all interfaces)", check=_bind),
    Option("port", 8025, "submission port: plain, STARTTLS offered", "int", _port),
    Option("smtps-port", None, "optional second port with implicit TLS (RFC 8314)", "int",
           _optional_port),
    Option("ssl-cert", None, "PEM certificate chain (default: self-signed, generated at start)",
           check=_readable_file),
    Option("ssl-key", None, "PEM private key (default: none; goes with --ssl-cert)", check=_readable_file),
    Option("auth", None, "auth program, split shell-style, run without a shell "
           "(default: none; required unless --no-require-auth)", check=_program),
    Option("process", None, "process program, split shell-style, run without a shell "
           "(default: none; required)", check=_program),
    Option("require-tls", True, "refuse AUTH and MAIL before TLS", "bool"),
    Option("require-auth", True, "refuse MAIL before AUTH", "bool"),
    Option("max-message-size", 26214400, "largest message in octets, advertised as SIZE", "int",
           _positive),
    Option("max-recipients", 100, "RCPTs per message", "int", _positive),
    Option("max-connections", 1000, "concurrent clients; over it: 421 and close", "int", _positive),
    Option("max-connections-per-ip", 20, "concurrent clients from one address", "int", _positive),
    Option("max-connection-rate-per-ip", "100/1m", "new connections from one address: "
           "COUNT/WINDOW[,...] (WINDOW in s, m, h or d), 0 for no limit; loopback clients are "
           "never limited", "str", _rate),
    Option("max-messages-per-user", "1000/1h", "messages one authenticated user may have "
           "accepted: COUNT/WINDOW[,...] (WINDOW in s, m, h or d), 0 for no limit; over it, "
           "MAIL gets 450", "str", _rate),
    Option("max-recipients-per-user", "5000/1h", "recipients of accepted messages per "
           "authenticated user: COUNT/WINDOW[,...], 0 for no limit; over it, RCPT gets 450",
           "str", _rate),
    Option("state", None, "keep the windowed counts (failed logins, messages and recipients "
           "per user) in Redis, shared by every instance: redis://[:PASSWORD@]HOST:PORT/DB, "
           "rediss://... or unix:///PATH?db=N (default: in the server)", check=_state_url),
    Option("state-prefix", "ssmtpd:", "prefix of the keys in --state"),
    Option("state-timeout", 0.5, "seconds a --state call may take before the server counts "
           "locally", "float", _positive),
    Option("max-sessions-per-user", 20, "concurrent sessions of one authenticated user, 0 for "
           "no limit; over it, AUTH gets 454", "int", _not_negative),
    Option("timeout", 300.0, "seconds to wait for a command line or a TLS handshake", "float",
           _positive),
    Option("data-timeout", 600.0, "seconds a whole DATA phase may take", "float", _positive),
    Option("auth-mechanisms", "PLAIN,LOGIN", "SASL mechanisms AUTH offers, comma-separated: "
           "PLAIN, LOGIN, OAUTHBEARER, XOAUTH2 (the last two take an OAuth 2 bearer token)",
           check=_mechanisms),
    Option("auth-timeout", 30.0, "seconds the auth program may run", "float", _positive),
    Option("auth-failure-delay", 1.0, "seconds before a failed AUTH is answered", "float",
           _not_negative),
    Option("auth-cache-ttl", 0.0, "seconds the auth program's 235 for the same mechanism, "
           "username and password or token is reused without running it, per process; 0: off "
           "(default: 0)", "float", _not_negative),
    Option("auth-cache-negative-ttl", 0.0, "seconds its 535 is reused likewise; a 454 never "
           "is (default: 0)", "float", _not_negative),
    Option("process-timeout", 300.0, "seconds the process program may run", "float", _positive),
    Option("graceful-timeout", 300.0, "seconds a draining process waits for its sessions: an "
           "old worker after a reload, or the server after SIGTERM (where idle sessions end "
           "at once and one sending its message may finish); then the rest get 421 4.3.2, "
           "a running process program is answered first", "float", _not_negative),
    Option("max-auth-failures-per-ip", 10, "failed AUTHs from one address within "
           "--auth-failure-window before its AUTHs get 421 unchecked", "int", _positive),
    Option("auth-failure-window", 600.0, "seconds over which failed AUTHs are counted",
           "float", _positive),
    Option("max-auth-programs", 16, "auth programs running at once (per worker); more AUTHs "
           "wait their turn within --auth-timeout", "int", _positive),
    Option("ipv6-prefix-length", 64, "IPv6 clients are counted per prefix of this length by "
           "the per-address limits", "int", _prefix_length),
    Option("busy-timeout", 10.0, "seconds an unauthenticated client may stay silent while more "
           "than 3/4 of --max-connections are in use", "float", _positive),
    Option("spool-dir", None, "directory for messages too large to keep in memory "
           "(default: the system's temporary directory)", check=_spool_dir),
    Option("workers", 1, "worker processes serving the same ports; above 1, a master "
           "process supervises them", "int", _positive),
    Option("proxy-protocol", False, "expect a HAProxy PROXY protocol header (v1 or v2) on "
           "every connection, from --proxy-trusted addresses only", "bool"),
    Option("proxy-trusted", None, "comma-separated addresses or CIDR networks allowed to "
           "send PROXY headers (required with --proxy-protocol)", check=_networks),
    Option("metrics-bind", None, "serve Prometheus metrics at http://HOST:PORT/metrics "
           "([::1]:9100 for IPv6)", check=_metrics_bind),
    Option("user", None, "after binding the ports, switch to this user for good (needs root)"),
    Option("group", None, "with --user: this group instead of the user's own"),
    Option("received-header", True, "prepend a Received: trace header", "bool"),
    Option("log-level", "info", "debug, info, warning or error", check=_log_level),
    Option("log-format", "text", "text, or json: one JSON object per line", check=_log_format),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings; program options are already argv tuples."""

    hostname: str
    bind: Optional[str]
    port: int
    smtps_port: Optional[int]
    ssl_cert: Optional[str]
    ssl_key: Optional[str]
    auth: Optional[Tuple[str, ...]]
    process: Tuple[str, ...]
    require_tls: bool
    require_auth: bool
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    max_connection_rate_per_ip: Tuple[Tuple[int, float], ...]
    max_messages_per_user: Tuple[Tuple[int, float], ...]
    max_recipients_per_user: Tuple[Tuple[int, float], ...]
    max_sessions_per_user: int
    state: Optional[str]
    state_prefix: str
    state_timeout: float
    timeout: float
    data_timeout: float
    auth_mechanisms: Tuple[str, ...]
    auth_timeout: float
    auth_failure_delay: float
    auth_cache_ttl: float
    auth_cache_negative_ttl: float
    process_timeout: float
    graceful_timeout: float
    max_auth_failures_per_ip: int
    auth_failure_window: float
    max_auth_programs: int
    ipv6_prefix_length: int
    busy_timeout: float
    spool_dir: str
    workers: int
    proxy_protocol: bool
    proxy_trusted: Tuple[Any, ...]
    metrics_bind: Optional[Tuple[str, int]]
    user: Optional[str]
    group: Optional[str]
    received_header: bool
    log_level: str
    log_format: str
    # Not settings of the server: what the command line asked this run to do.
    check_config: bool = False
    try_auth: Optional[str] = None  # USERNAME of --try-auth
    try_process: Optional[str] = None  # USERNAME of --try-process
    try_mechanism: str = "PLAIN"
    identity: Any = None  # privileges.Identity of --user/--group, or None


# What a run is asked to do once instead of serving (docs/auth-program.md "The auth program",
# "The process program"): on the command line only, so that no environment
# variable or ini key can turn a server's start into a one-shot run.
ONE_SHOT = ("check-config", "try-auth", "try-process", "try-mechanism")
TRY_MECHANISMS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")

# Values split shell-style later: their quotes must reach shlex.
_SHELL_STYLE = ("auth", "process")
_KIND_WORDS = {"int": "a whole number", "float": "a number"}


class _IniParser(configargparse.ConfigFileParser):
    """Reads [ssmtpd] literally: no %-interpolation, no lists.

    A program value is split shell-style later, so its quotes must survive to
    that point; any other value may be written in one pair of quotes
    (`hostname = "mail.example.org"`), which are removed.  `-` or `_` in keys
    are both accepted; an unknown key is refused with the file's name and the
    nearest known key; numbers are checked here, where the file is known.
    """

    def __init__(self, options: Sequence[Option]):
        super().__init__()
        self.kinds = {o.name: o.kind for o in options}

    def get_syntax_description(self):
        return f"An ini file with an [{INI_SECTION}] section; keys are the long option names."

    def parse(self, stream):
        where = getattr(stream, "name", "the config file")
        ini = configparser.ConfigParser(interpolation=None)
        try:
            ini.read_string(stream.read(), source=where)
        except configparser.Error as e:
            raise configargparse.ConfigFileParserException(
                f"--config: cannot parse: {' '.join(str(e).split())}") from None
        if not ini.has_section(INI_SECTION):
            raise configargparse.ConfigFileParserException(
                f"--config: no [{INI_SECTION}] section in {where}")
        items = {}
        for key, value in ini.items(INI_SECTION):
            name = key.replace("_", "-")
            if name.startswith("-"):
                raise configargparse.ConfigFileParserException(
                    f"--config: key {key!r} in {where}: keys are option names without the "
                    f"leading dashes ({name.lstrip('-')} = ...)")
            if name in ONE_SHOT:
                raise configargparse.ConfigFileParserException(
                    f"--{name}: is command-line only, not an ini key ({key} in {where})")
            if name not in self.kinds:
                near = difflib.get_close_matches(name, self.kinds, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise configargparse.ConfigFileParserException(
                    f"--config: unknown key {key!r} in [{INI_SECTION}] of {where}{hint}")
            value = value.strip()
            if name not in _SHELL_STYLE and len(value) >= 2 and value[0] == value[-1] \
                    and value[0] in "'\"":
                value = value[1:-1]
            kind = self.kinds[name]
            if kind in _KIND_WORDS and not _parses(value, kind):
                raise configargparse.ConfigFileParserException(
                    f"--{name}: {key} = {value!r} in {where} is not {_KIND_WORDS[kind]}")
            items[name] = value
        return items


def _parses(raw: str, kind: str) -> bool:
    try:
        {"int": int, "float": float}[kind](raw.strip())
    except ValueError:
        return False
    return True


class _Parser(configargparse.ArgParser):
    def error(self, message):
        # argparse prints usage plus the message; the contract wants one line.
        raise ConfigError(message.replace("\n", " "))

    def get_possible_config_keys(self, action):
        # Printing an example is asked for on the command line only: no
        # SSMTPD_EXAMPLE variable or ini key that would make every start print;
        # nor may one make every start a one-shot run.
        if isinstance(action, _PrintExample) or action.dest in _ONE_SHOT_DESTS:
            return []
        return super().get_possible_config_keys(action)


_ONE_SHOT_DESTS = frozenset(name.replace("-", "_") for name in ONE_SHOT)


def _env_name(opt: Option) -> str:
    return ENV_PREFIX + opt.attr.upper()


# Variables the server sets for its programs (docs/auth-program.md "The auth program", "The
# process program"): a program that starts an ssmtpd of its own passes them on.
PROGRAM_VARIABLES = ("SSMTPD_USERNAME", "SSMTPD_PASSWORD", "SSMTPD_MECHANISM", "SSMTPD_TOKEN",
                     "SSMTPD_CLIENT_ADDR", "SSMTPD_MAIL_FROM", "SSMTPD_RCPT_TO", "SSMTPD_HELO",
                     "SSMTPD_TLS")


def _check_environment() -> None:
    """What argparse would say without naming the variable, said with its name.

    A boolean must be a boolean word (argparse takes any word: a typo would be
    "false"), a number a number.  Every other SSMTPD_ variable is refused,
    naming the nearest option, unless docs/configuration.md "Configuration" reserves it: a
    misspelt SSMTPD_SSL_CERTIFICATE would otherwise leave the server on a
    self-signed certificate without a word.
    """
    known = {_env_name(opt): opt.flag for opt in OPTIONS}
    for opt in OPTIONS:
        raw = os.environ.get(_env_name(opt))
        if raw is None:
            continue
        if opt.kind == "bool" and raw.strip().lower() not in (
                "1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(f"{opt.flag}: {_env_name(opt)}={raw!r} "
                              "is not a boolean (true/false)")
        if opt.kind in _KIND_WORDS and not _parses(raw, opt.kind):
            raise ConfigError(f"{opt.flag}: {_env_name(opt)}={raw!r} "
                              f"is not {_KIND_WORDS[opt.kind]}")
    for name in ONE_SHOT:
        variable = ENV_PREFIX + name.replace("-", "_").upper()
        if variable in os.environ:
            raise ConfigError(f"--{name}: is command-line only; remove {variable} from the "
                              "environment")
    known[ENV_PREFIX + "CONFIG"] = "--config"
    allowed = set(known) | set(PROGRAM_VARIABLES)
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIX) or name in allowed:
            continue
        # Compared without the prefix that every one of them shares.
        suffix = {known_name[len(ENV_PREFIX):]: known_name for known_name in known}
        (near,) = difflib.get_close_matches(name[len(ENV_PREFIX):], suffix, n=1, cutoff=0)
        near = suffix[near]
        if difflib.SequenceMatcher(None, name, near).ratio() >= 0.8:
            raise ConfigError(f"{known[near]}: unknown variable {name}; did you mean {near}?")
        raise ConfigError(f"unknown variable {name}: no option reads it (the nearest is "
                          f"{known[near]}, {near}; ssmtpd --help lists them all)")


# What --example prints: name -> file of the ssmtpd.examples package (docs/deploying.md "Deploying").
EXAMPLES = {
    "config": "ssmtpd.ini",
    "systemd": "ssmtpd.service",
    "supervisord": "supervisord.conf",
    "fail2ban-filter": "fail2ban-filter.conf",
    "fail2ban-filter-json": "fail2ban-filter-json.conf",
    "fail2ban-jail": "fail2ban-jail.local",
    "auth-introspect": "auth-introspect",
}


class _PrintExample(argparse.Action):
    """--example NAME, --example-config: like --version, print and exit before anything is checked."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import resources
        name = values if isinstance(values, str) else self.const
        text = resources.files("ssmtpd.examples").joinpath(EXAMPLES[name]).read_text()
        sys.stdout.write(text)
        parser.exit(0)


def build_parser() -> configargparse.ArgParser:
    parser = _Parser(
        prog="ssmtpd",
        description="SMTP submission server: STARTTLS, AUTH PLAIN/LOGIN checked by an auth "
                    "program, each message piped to a process program.",
        auto_env_var_prefix=ENV_PREFIX,
        config_file_parser_class=_IniParser(OPTIONS),
        # --max-recipient would be --max-recipients until an option named
        # --max-recipient-... made it ambiguous, or another option altogether.
        allow_abbrev=False,
    )
    # Added by hand, not through args_for_setting_config_path, so that a
    # container can name its config file in the environment too.
    parser.add_argument("-c", "--config", is_config_file_arg=True, env_var=ENV_PREFIX + "CONFIG",
                        metavar="FILE", help=f"ini file with an [{INI_SECTION}] section")
    parser.add_argument("--version", action="version", version=f"ssmtpd {__version__}")
    parser.add_argument("--example", action=_PrintExample, choices=list(EXAMPLES),
                        metavar="NAME",
                        help="print an example file and exit: config (a first ini file for an "
                             "installed ssmtpd: the example programs, state in ./var), "
                             "systemd (a unit), supervisord (a [program:ssmtpd] section), "
                             "fail2ban-filter, fail2ban-filter-json (for --log-format json), "
                             "fail2ban-jail, auth-introspect (an auth program for OAuth 2 "
                             "tokens)")
    parser.add_argument("--example-config", action=_PrintExample, nargs=0, const="config",
                        help="the same as --example config")
    parser.add_argument("--check-config", action="store_true",
                        help="check every setting, the certificate and both programs as a "
                             "start would, print 'ssmtpd: configuration OK' and exit; binds "
                             "nothing")
    parser.add_argument("--try-auth", metavar="USERNAME",
                        help="run the auth program once for USERNAME as a login would (the "
                             "password or token from a prompt, or the first line of stdin), "
                             "print what the client would be told and exit: 0 for 235, 1 "
                             "otherwise; command line only")
    parser.add_argument("--try-mechanism", type=str.upper, choices=TRY_MECHANISMS,
                        help="the mechanism of --try-auth (default: PLAIN); OAUTHBEARER and "
                             "XOAUTH2 pass a token as SSMTPD_TOKEN")
    parser.add_argument("--try-process", metavar="USERNAME",
                        help="pipe the message on stdin (LF line ends taken as CRLF) to the "
                             "process program once, as after USERNAME's final dot; print what "
                             "the client would be told and exit: 0 for 250, 1 otherwise; "
                             "command line only")
    types = {"str": str, "int": int, "float": float}
    for opt in OPTIONS:
        help = opt.help
        if "default" not in help:  # options without a fixed default say so in their text
            if opt.kind == "bool":
                shown = "on" if opt.default else "off"
            else:
                shown = "off" if opt.default is None else opt.default
            help += f" (default: {shown})"
        if opt.kind == "bool":
            parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction,
                                default=opt.default, help=help)
        else:
            parser.add_argument(opt.flag, type=types[opt.kind], default=opt.default,
                                help=help, metavar=opt.attr.upper())
    return parser


def parse(argv: Optional[Sequence[str]] = None) -> Settings:
    """Parse CLI > env > ini > defaults into Settings, or raise ConfigError."""
    _check_environment()
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except configargparse.ConfigFileParserException as e:
        raise ConfigError(str(e)) from None
    values = {}
    for opt in OPTIONS:
        value = getattr(ns, opt.attr)
        if opt.check is not None:
            try:
                value = opt.check(value)
            except ValueError as e:
                raise ConfigError(f"{opt.flag}: {e}") from None
        values[opt.attr] = value
    if values["process"] is None:
        raise ConfigError("--process: is required")
    if values["auth"] is None and values["require_auth"]:
        raise ConfigError("--auth: is required unless --no-require-auth")
    if values["ssl_cert"] and not values["ssl_key"] and _holds_key(values["ssl_cert"]):
        values["ssl_key"] = values["ssl_cert"]  # one PEM with the chain and the key
    if bool(values["ssl_cert"]) != bool(values["ssl_key"]):
        missing = "--ssl-key" if values["ssl_cert"] else "--ssl-cert"
        raise ConfigError(f"{missing}: --ssl-cert and --ssl-key go together (or give one "
                          "PEM file with both the certificate chain and the key as --ssl-cert)")
    if values["group"] is not None and values["user"] is None:
        raise ConfigError("--group: needs --user")
    try:
        values["identity"] = privileges.resolve(values["user"], values["group"])
    except ValueError as e:
        option = "--group" if "group" in str(e) else "--user"
        raise ConfigError(f"{option}: {e}") from None
    identity = values["identity"]
    if identity is not None and os.geteuid() not in (0, identity.uid):
        raise ConfigError(f"--user: only root can switch to {identity.user}")
    values["check_config"] = ns.check_config
    values.update(_one_shot(ns, values))
    if values["proxy_protocol"] and not values["proxy_trusted"]:
        raise ConfigError("--proxy-trusted: is required with --proxy-protocol")
    if values["smtps_port"] is not None and values["smtps_port"] == values["port"]:
        raise ConfigError("--smtps-port: must differ from --port")
    assert set(values) == {f.name for f in fields(Settings)}
    return Settings(**values)


def _one_shot(ns, values) -> dict:
    """--try-auth, --try-process, --try-mechanism, checked against each other."""
    asked = [flag for flag, value in (("--check-config", ns.check_config),
                                      ("--try-auth", ns.try_auth),
                                      ("--try-process", ns.try_process)) if value]
    if len(asked) > 1:
        raise ConfigError(f"{asked[1]}: one of --check-config, --try-auth, --try-process "
                          "at a time")
    if ns.try_mechanism is not None and ns.try_auth is None:
        raise ConfigError("--try-mechanism: goes with --try-auth")
    if ns.try_auth is not None and values["auth"] is None:
        raise ConfigError("--try-auth: no --auth program is configured")
    if ns.try_auth == "":
        raise ConfigError("--try-auth: needs a USERNAME")
    return {"try_auth": ns.try_auth, "try_process": ns.try_process,
            "try_mechanism": ns.try_mechanism or "PLAIN"}


def recheck_as_user(settings: Settings) -> None:
    """After the switch to --user: the checks whose answer depends on who we are.

    Raises ConfigError naming the option.  The certificate files are not
    checked: they were read before the switch and are needed again only at
    SIGHUP, whose failure is logged and keeps the running configuration.
    """
    for opt in OPTIONS:
        value = getattr(settings, opt.attr)
        if opt.name not in ("auth", "process", "spool-dir") or value is None:
            continue
        raw = shlex.join(value) if opt.name in ("auth", "process") else value
        try:
            opt.check(raw)
        except ValueError as e:
            raise ConfigError(f"{opt.flag}: {e} (as --user {settings.user})") from None
