"""What the server logs: the event vocabulary of docs/logging.md "Logging", and each event's text line.

An `Event` is one kind of line: its name (the JSON `event`, from the fixed
vocabulary below) and how its fields read as a text line.  The session and
the server say what happened once, as an event and its fields; log.py writes
that as a text line or, with --log-format json, as one JSON object.  Several
kinds of line may share a name: an AUTH the auth program answered 454 reads
like every AUTH line in text, and is a `refused` event like every refusal.

Text lines read as they always have: tests, fail2ban filters and operators'
habits depend on them.  A client's value goes through `quote()` in text; in
JSON the encoder escapes it.
"""

import logging
from typing import Any, Callable, Dict

from ssmtpd.log import clean, quote

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

Fields = Dict[str, Any]


class Event:
    """One kind of line: `name` is its `event`, `text(fields)` its text line."""

    __slots__ = ("name", "text")

    def __init__(self, name: str, text: Callable[[Fields], str]):
        self.name = name
        self.text = text

    def __repr__(self) -> str:
        return f"Event({self.name!r})"


class Told:
    """A reply, and the event that says what happened (docs/logging.md "Logging").

    `said` once its line is written: a failed login's is written as soon as
    it is known, before the pause and any challenge, and not again with the
    reply.
    """

    __slots__ = ("reply", "level", "event", "fields", "said")

    def __init__(self, reply, level: int, event: Event, fields: Fields):
        self.reply = reply
        self.level = level
        self.event = event
        self.fields = fields
        self.said = False


def _seconds(milliseconds: int) -> str:
    return f"{milliseconds / 1000:.3f}s"


# --- a session's events ------------------------------------------------------------

CONNECTED = Event("connected", lambda f: "connected (implicit TLS)" if f.get("implicit_tls")
                  else "connected")
PROXY = Event("proxy", lambda f: f"via PROXY from {f['proxy_ip']}")
TLS = Event("tls", lambda f: f"TLS established: {f['tls_version']} {f['cipher']}")
STARTTLS_DISCARDED = Event("starttls_discarded", lambda f:
                           f"discarded {f['octets']} octets pipelined after STARTTLS")
# AUTH's arguments are a credential: never in a line, at any level.
COMMAND = Event("command", lambda f: "command AUTH" if f["command"] == "AUTH"
                else f"command {quote(f['line'])}")
UNKNOWN_COMMAND = Event("command", lambda f: f"unrecognised command ({f['octets']} octets)")


def _auth_text(f: Fields) -> str:
    # One line per attempt with the address (in the prefix) and the quoted
    # name, in a fixed order: the failures' line is what fail2ban reads.
    if "authzid" in f:
        result = f"authzid {quote(f['authzid'], 64)} refused"
    else:
        # A cached answer says so, after the program result it repeats
        # (docs/auth-program.md "The auth cache"); the fail2ban filters read no further than the code.
        cached = " (cached)" if f.get("cached") else ""
        result = f"{f['program_result']}{cached} in {_seconds(f['duration_ms'])}"
    return f"AUTH {f['mechanism']} user={quote(f['username'], 128)}: {f['code']}, {result}"


AUTH = Event("auth", _auth_text)
AUTH_FAILED = Event("auth_failed", _auth_text)
AUTH_REFUSED = Event("refused", _auth_text)  # the auth program's 454: not a failed login
AUTH_THROTTLED = Event("auth_throttled", lambda f:
                       "AUTH refused: too many failed logins from this address")
MAIL = Event("mail", lambda f: f"MAIL FROM:{quote(f['mail_from'])}")
RCPT = Event("rcpt", lambda f: f"RCPT TO:{quote(f['rcpt_to'])}")


def _refused_text(f: Fields) -> str:
    line = f"{f['command']} refused: {f['code']} {f['enhanced']} {f['reason']}"
    if "argument" in f:
        line += f", argument {quote(f['argument'])}"
    return line


REFUSED = Event("refused", _refused_text)


def _message_text(f: Fields) -> str:
    return (f"message from={quote(f['mail_from'])} rcpts={f['rcpts']} size={f['size']}: "
            f"{f['code']}, process program {f['program_result']} in "
            f"{_seconds(f['program_ms'])}, total {_seconds(f['duration_ms'])}")


# The reply after the final dot, whatever it is; refused before any program ran:
MESSAGE = Event("message", _message_text)
MESSAGE_TOO_BIG = Event("message", lambda f:
                        f"message refused: {f['size']} octets over the limit")
MESSAGE_BARE_LINE_ENDING = Event("message", lambda f:
                                 f"message refused: bare CR or LF ({f['size']} octets)")
MESSAGE_NOT_SPOOLED = Event("message", lambda f: f"message refused: {f['reason']}")
# A per-user limit (docs/limits.md "Accounts and limits"): the name as the client
# gave it, and the option whose limit it reached.
def _rate_limited_text(f: Fields) -> str:
    line = (f"{f['command']} refused: {f['code']} {f['enhanced']} {f['reason']}: "
            f"user={quote(f['username'], 128)} over --max-{f['limit']}-per-user")
    if "argument" in f:
        line += f", argument {quote(f['argument'])}"
    return line


RATE_LIMITED = Event("rate_limited", _rate_limited_text)
PROGRAM_OUTPUT = Event("program_output", lambda f:
                       f"{f['program']} program stderr: {clean(f['stderr'], 1000)}")
PROGRAM_ERROR = Event("program_error", lambda f:
                      f"{f['program']} program {f['path']} could not start: {f['reason']}")
INTERNAL_ERROR = Event("internal_error", lambda f:
                       f"internal error: {f['error_type']}: {clean(f['reason'])}")
DISCONNECTED = Event("disconnected", lambda f:
                     f"disconnected: {f['reason']} after {_seconds(f['duration_ms'])}")
# Before a session: over a connection limit (421 and close), or a connection
# the PROXY protocol closes without a byte.
CONNECTION_REFUSED = Event("connection_refused", lambda f: f"refused: {f['reason']}")
PROXY_REFUSED = Event("proxy_refused", lambda f: f"closed: {f['reason']}")

# --- the server's own lines: text as written, `message` in JSON ----------------------

START = "start"  # what start-up did: the user it runs as
CONFIG = "config"  # a warning about the configuration: self-signed, root, a lowered limit
LISTENING = "listening"  # a port is served: listening (or, in a worker, accepting) on it
ACCEPT = "accept"  # accepting paused for want of descriptors, and resumed
SHUTDOWN = "shutdown"  # SIGTERM/SIGINT: draining, a second signal, sessions still busy
STOPPED = "stopped"  # the last line of a stop
RELOAD = "reload"  # SIGHUP: the certificate reloaded, or kept
UPGRADE = "upgrade"  # SIGUSR2: refused, or done
WORKER = "worker"  # the master of --workers: a worker started, died, stopped, killed
STATE = "state"  # --state: Redis failed, the counts are local for now
# Any other line of the server: the metrics listener's warnings.
SERVER = "server"

SESSION_EVENTS = frozenset(e.name for e in globals().values() if isinstance(e, Event))
SERVER_EVENTS = frozenset((START, CONFIG, LISTENING, ACCEPT, SHUTDOWN, STOPPED, RELOAD, UPGRADE,
                           WORKER, STATE, SERVER))
VOCABULARY = SESSION_EVENTS | SERVER_EVENTS


def note(logger: logging.Logger, level: int, event: str, msg: str, *args, **fields) -> None:
    """One of the server's own lines: `msg % args` in text; in JSON `event`,
    the same words as `message`, and `fields`."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, *args, extra={"event": event, "fields": fields})
