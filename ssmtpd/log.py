"""Logging to stderr, one line per event, as text or JSON (docs/logging.md "Logging").

Client-supplied values go through `quote()` in text: inside double quotes,
with `"`, `\\` and every non-printable character escaped, so a value can
neither split a line nor pose as another field (a username of
`] 198.51.100.23 -: AUTH` stays inside its quotes, where an anchored fail2ban
pattern never looks).  In JSON the encoder escapes them, to ASCII: a value
is a JSON string, and no byte of it can end the object or the line.
`clean()` is for our own and our programs' text.  No line grows past
MAX_LINE.  Passwords, tokens and message data are never handed to a logger
at all; there is no redaction filter to forget.

A session's lines are events (events.py) said through its SessionLog; the
text of one is rendered only when its level is on, and its JSON only with
--log-format json.
"""

import json
import logging
import sys
import time
from typing import Optional

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")

# A log line's message part, timestamp and level aside; in JSON the whole object.
MAX_LINE = 1024
TRUNCATED = " [truncated]"
# The event of a line that names none (docs/logging.md "Logging": the metrics listener's).
DEFAULT_EVENT = "server"


class _Formatter(logging.Formatter):
    # UTC with its "Z": a line means the same on every machine, and fail2ban
    # reads the zone instead of guessing it.
    converter = time.gmtime

    def formatMessage(self, record):
        line = super().formatMessage(record)
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE - len(TRUNCATED)] + TRUNCATED
        return line


def setup(level: str, stream=None, format: str = "text") -> logging.Logger:
    handler = logging.StreamHandler(stream or sys.stderr)
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("ssmtpd")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
    # The format names no thread, process or caller: skip gathering them for
    # every record, a third of a line's cost (docs/performance.md "Performance").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    return root


def _escape(c: str) -> str:
    if c == '"' or c == "\\":
        return "\\" + c
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def quote(text, limit: int = 200) -> str:
    """A client's value as one quoted, escaped field of at most ~`limit` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    if len(text) <= limit and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'  # nothing to escape or cut: the usual case
    return _quote_walk(text, limit)


def _quote_walk(text: str, limit: int) -> str:
    """quote() one character at a time: escapes each, cuts past `limit`."""
    out = []
    length = 0
    for c in text:
        piece = _escape(c)
        length += len(piece)
        if length > limit:
            out.append("...")
            break
        out.append(piece)
    return '"' + "".join(out) + '"'


def clean(text, limit: int = 200) -> str:
    """Printable form of our own or a program's text: escapes controls, cuts long input."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    if len(text) <= limit and text.isprintable():
        return text
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")




# --- a session's lines ----------------------------------------------------------------

class _Context:
    """Who a line is about: fixed until the user changes, shared by its lines."""

    __slots__ = ("session", "client", "user", "prefix", "json")

    def __init__(self, session: str, client: str, user: Optional[str]):
        self.session = session
        self.client = client
        self.user = user
        shown = "-" if user is None else quote(user, 64)
        self.prefix = f"[{session}] {client} {shown}: "
        self.json = None  # its part of a JSON line, made by the first one


class Said:
    """A record's message: an event, its fields and whom it is about.

    str() is the text line's message part, rendered only when a text
    handler formats it; the JSON formatter reads the parts instead.
    """

    __slots__ = ("event", "fields", "context")

    def __init__(self, event, fields: dict, context: _Context):
        self.event = event
        self.fields = fields
        self.context = context

    def __str__(self) -> str:
        return self.context.prefix + self.event.text(self.fields)


class SessionLog:
    """A session's lines, each prefixed with the session id, client address and user.

    The address is the socket's, or a trusted proxy's header's, never the
    client's word; the user is quoted once it is known, `-` before.  While
    `hold()` is on, lines wait (with the time they were said) until
    `release()` writes them, as they were or, for a load balancer's health
    check, at DEBUG (docs/logging.md "Logging").
    """

    def __init__(self, logger: logging.Logger, session_id: str, client: str):
        self.logger = logger
        self.session_id = session_id
        self.client = client
        self._held = None
        self.set_user(None)

    def set_user(self, name) -> None:
        self._context = _Context(self.session_id, self.client, name)

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def say(self, level: int, event, exc_info=None, **fields) -> None:
        """One line: `event` (events.py) with its fields, if `level` is on."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        record = logger.makeRecord(logger.name, level, "", 0,
                                   Said(event, fields, self._context), (), exc_info)
        if self._held is None:
            logger.handle(record)
        else:
            self._held.append(record)

    @property
    def holding(self) -> bool:
        return self._held is not None

    def hold(self) -> None:
        self._held = []

    def release(self, health_check: bool = False) -> None:
        held, self._held = self._held, None
        for record in held or ():
            if health_check and record.levelno <= logging.INFO:
                if not self.logger.isEnabledFor(logging.DEBUG):
                    continue
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            self.logger.handle(record)


# --- JSON lines ---------------------------------------------------------------------------

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                logging.ERROR: "error", logging.CRITICAL: "error"}
# Escaped to ASCII: a line is the same bytes whatever reads it, and no
# character in a value can end the object or the line.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"),
                           check_circular=False).encode
# Fields every line keeps whole, so that a line can always be told apart.
_UNCUT = frozenset(("ts", "level", "event", "session", "client_ip"))
_ELLIPSIS = "..."


class JsonFormatter(logging.Formatter):
    """One flat JSON object per line (docs/logging.md "Logging"): ts, level, event,
    session, client_ip and user, then the event's own fields."""

    def __init__(self):
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _ts(self, created: float) -> str:
        # ISO 8601 in UTC with milliseconds, as in text; the seconds are
        # formatted once per second, not per line.
        second = int(created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        ts = self._ts(record.created)
        level = _LEVEL_NAMES.get(record.levelno, "error")
        said = record.msg
        if type(said) is Said and not record.exc_info:
            # The usual line, put together from parts encoded once per
            # session: a third cheaper than encoding it whole.
            context = said.context
            if context.json is None:
                context.json = _encode(_context_fields(context))[1:-1]
            head = f'{{"ts":"{ts}","level":"{level}","event":"{said.event.name}",{context.json}'
            text = head + "," + _encode(said.fields)[1:] if said.fields else head + "}"
            if len(text) <= MAX_LINE:
                return text
        line = {"ts": ts, "level": level}
        if type(said) is Said:
            line["event"] = said.event.name
            line.update(_context_fields(said.context))
            line.update(said.fields)
        else:
            line["event"] = getattr(record, "event", DEFAULT_EVENT)
            line["message"] = record.getMessage()
            fields = getattr(record, "fields", None)
            if fields:
                line.update(fields)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return bounded_json(line)


def _context_fields(context: _Context) -> dict:
    fields = {"session": context.session, "client_ip": context.client}
    if context.user is not None:
        fields["user"] = context.user
    return fields


def bounded_json(line: dict) -> str:
    """`line` encoded, at most MAX_LINE characters.

    A line too long has its longest strings cut (as characters, before they
    are escaped, so an escape is never split), each ending in "...", and
    `"truncated": true` added.
    """
    text = _encode(line)
    if len(text) <= MAX_LINE:
        return text
    whole = line
    line = dict(line, truncated=True)
    kept = {}  # key -> how many characters of its whole value are left
    # Each pass cuts the longest value by what it must lose, estimated from
    # its own escaping: one or two passes in practice, never more than 100.
    for _ in range(100):
        cuttable = [key for key, value in line.items()
                    if type(value) is str and key not in _UNCUT and kept.get(key) != 0]
        if not cuttable:
            break
        key = max(cuttable, key=lambda k: len(_encode(line[k])))
        value = whole[key][:kept.get(key, len(whole[key]))]
        escaped = len(_encode(value)) - 2
        excess = len(text) - MAX_LINE
        keep = max(0, min(len(value) - 1,
                          len(value) * (escaped - excess - len(_ELLIPSIS)) // max(1, escaped)))
        kept[key] = keep
        line[key] = value[:keep] + _ELLIPSIS
        text = _encode(line)
        if len(text) <= MAX_LINE:
            return text
    # Only the fields every line has: cannot be reached by the fields we log.
    return _encode({key: line[key] for key in line if key in _UNCUT or key == "truncated"})
