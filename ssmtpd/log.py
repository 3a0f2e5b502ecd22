"""Logging to stderr, one line per event (SPEC §7).

Client-supplied text goes through `clean()` so it can never split a line or
forge another entry.  Passwords and message bodies are never handed to a
logger at all; there is no redaction filter to forget.
"""

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


def setup(level: str, stream=None) -> logging.Logger:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("ssmtpd")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
    return root


def clean(text, limit: int = 200) -> str:
    """Printable form of untrusted text: escapes controls, cuts long input."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    if len(text) <= limit and text.isprintable():
        return text
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


class SessionLog(logging.LoggerAdapter):
    """Prefixes every line with the session id, client address and user."""

    def __init__(self, logger: logging.Logger, session_id: str, client: str):
        super().__init__(logger, {})
        self.session_id = session_id
        self.client = client
        self.user = "-"

    def process(self, msg, kwargs):
        return f"[{self.session_id}] {self.client} {self.user}: {msg}", kwargs
