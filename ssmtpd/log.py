"""Logging to stderr, one line per event (README "Logging", README "Logging").

Client-supplied values go through `quote()`: inside double quotes, with `"`,
`\\` and every non-printable character escaped, so a value can neither split
a line nor pose as another field (a username of `] 198.51.100.23 -: AUTH`
stays inside its quotes, where an anchored fail2ban pattern never looks).
`clean()` is for our own and our programs' text.  No line grows past
MAX_LINE.  Passwords and message bodies are never handed to a logger at all;
there is no redaction filter to forget.
"""

import logging
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}

# A log line's message part, timestamp and level aside.
MAX_LINE = 1024
TRUNCATED = " [truncated]"


class _Formatter(logging.Formatter):
    # UTC with its "Z": a line means the same on every machine, and fail2ban
    # reads the zone instead of guessing it.
    converter = time.gmtime

    def formatMessage(self, record):
        line = super().formatMessage(record)
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE - len(TRUNCATED)] + TRUNCATED
        return line


def setup(level: str, stream=None) -> logging.Logger:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("ssmtpd")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
    # The format names no thread, process or caller: skip gathering them for
    # every record, a third of a line's cost (README "Performance").
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


class SessionLog(logging.LoggerAdapter):
    """Prefixes every line with the session id, client address and user.

    The address is the socket's, or a trusted proxy's header's, never the
    client's word; the user is quoted once it is known, `-` before.
    """

    def __init__(self, logger: logging.Logger, session_id: str, client: str):
        super().__init__(logger, {})
        self.session_id = session_id
        self.client = client
        self.set_user(None)

    def set_user(self, name) -> None:
        self.user = "-" if name is None else quote(name, 64)
        self._prefix = f"[{self.session_id}] {self.client} {self.user}: "
        # The prefix goes in front of a format string: a "%" in a username
        # ("user%domain") must stay a character, not become a conversion.
        self._prefix_in_format = self._prefix.replace("%", "%%")

    def log(self, level, msg, *args, **kwargs):
        if self.logger.isEnabledFor(level):
            prefix = self._prefix_in_format if args else self._prefix
            self.logger.log(level, prefix + msg, *args, **kwargs)
