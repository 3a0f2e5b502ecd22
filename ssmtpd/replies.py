"""Every reply the server sends, named once.

docs/auth-program.md "The auth program", docs/process-program.md "The process program" and "The dialogue".

Tests import these names too, so a reply text changes in one place.  Enhanced
status codes follow RFC 2034 / RFC 3463: their class digit equals the reply's.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)

    @property
    def closes(self) -> bool:
        """421 and 221 end the session (RFC 5321 §3.8, §4.1.1.10)."""
        return self.code in (221, 421)

    def encode(self) -> bytes:
        """Wire form; a text with newlines becomes a multi-line reply."""
        # Kept on the instance: most replies are the constants below, encoded
        # once.  Not a cached_property: its lock cost more than the encoding
        # for the greeting and EHLO replies each session builds.
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self.__dict__["_wire"] = self._encode()
        return wire

    def _encode(self) -> bytes:
        code = str(self.code)
        enhanced = self.enhanced + " " if self.enhanced else ""
        *first, last = self.text.split("\n")
        more = f"{code}-{enhanced}"
        head = "".join([more + line + "\r\n" for line in first])
        return f"{head}{code} {enhanced}{last}\r\n".encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class SmtpError(Exception):
    """Raised anywhere in a verb to answer with `reply` instead."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


# Greeting and EHLO have no enhanced code: RFC 2034 §3 exempts them.
def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP ssmtpd")


def ehlo(hostname: str, client: str, keywords) -> Reply:
    return Reply(250, "", "\n".join([f"{hostname} greets {client}", *keywords]))


def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset state")
ACCEPTED = Reply(250, "2.0.0", "Message accepted")
BYE = Reply(221, "2.0.0", "Bye")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_ANSWER = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentications, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_FAILED_LOGINS = Reply(421, "4.7.0", "Too many failed logins from your address, "
                               "try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_FAST_FROM_IP = Reply(421, "4.7.0", "Too many new connections from your address, "
                                       "try again later")
INTERNAL_ERROR = Reply(421, "4.3.0", "Internal server error, closing connection")
SPOOL_FAILED = Reply(451, "4.3.0", "Cannot store the message now, try again later")
PROCESS_TEMPFAIL = Reply(451, "4.3.0", "Temporary failure, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
# docs/limits.md "Accounts and limits": the per-user limits.
RATE_LIMITED = Reply(450, "4.7.1", "Sending rate limit exceeded for this account, "
                                   "try again later")
TOO_MANY_USER_SESSIONS = Reply(454, "4.7.0", "Too many sessions for this account")

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_HELO = Reply(501, "5.5.4", "Bad HELO/EHLO argument")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
BAD_CREDENTIALS_SYNTAX = Reply(501, "5.5.2", "Malformed authentication response")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
NO_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Authentication not enabled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
TLS_IN_TRANSACTION = Reply(503, "5.5.1", "STARTTLS not permitted during a mail transaction")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
BAD_CREDENTIALS = Reply(535, "5.7.8", "Authentication credentials invalid")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_LINE_ENDING = Reply(554, "5.6.0", "Message contains bare CR or LF; use CRLF line endings")
PROCESS_REJECTED = Reply(554, "5.3.0", "Message rejected")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
