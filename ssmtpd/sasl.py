"""Pure decoding of SASL PLAIN (RFC 4616) and LOGIN responses, no I/O.

Every malformed input raises SmtpError with the README's reply, so the session
never needs to inspect bytes itself.
"""

import binascii
import base64
from dataclasses import dataclass

from ssmtpd import replies
from ssmtpd.replies import SmtpError
from ssmtpd.syntax import has_unsafe_char

MECHANISMS = ("PLAIN", "LOGIN")

# RFC 4954 §4: the LOGIN prompts are the base64 of "Username:" / "Password:".
LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()


@dataclass(frozen=True)
class Credentials:
    username: str
    # Bytes that were not UTF-8 are kept as surrogate escapes, so the auth
    # program's environment receives exactly the octets the client sent.
    password: str = ""
    authzid: str = ""  # PLAIN only; "" when the client asked for none

    @property
    def foreign_authzid(self) -> bool:
        """Asks to act as someone else: we cannot ask the auth program whether
        authcid may, so the session refuses it (535) like a wrong password."""
        return bool(self.authzid) and self.authzid != self.username

    @property
    def secret(self) -> str:
        """What proves the login: the password (a bearer token, once token
        mechanisms exist)."""
        return self.password

    def __repr__(self) -> str:  # never show the password, not even in a traceback
        return f"Credentials(username={self.username!r}, password=***)"


def decode_response(line: str) -> bytes:
    """One client response line: `*` cancels, otherwise strict base64."""
    line = line.strip()
    if line == "*":
        raise SmtpError(replies.AUTH_CANCELLED)
    if line == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        data = base64.b64decode(line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SmtpError(replies.BAD_BASE64) from None
    # b64decode tolerates surplus padding ("c2VjcmV0="); only the canonical
    # encoding is base64 as RFC 4648 §3.3 and RFC 4954 §4 mean it.
    if base64.b64encode(data) != line.encode("ascii"):
        raise SmtpError(replies.BAD_BASE64)
    return data


def _username(raw: bytes) -> str:
    # The name goes into argv, env and logs: refuse what could split a line,
    # truncate a C string or read as something else rather than pass it on
    # (README "Envelope rules").
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX) from None
    if not name or has_unsafe_char(name):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    return name


def _password(raw: bytes) -> str:
    if b"\0" in raw:  # an environment value cannot hold NUL
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    return raw.decode("utf-8", "surrogateescape")


def plain(message: bytes) -> Credentials:
    """authzid NUL authcid NUL passwd (see Credentials.foreign_authzid)."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    authzid, authcid, passwd = parts
    username = _username(authcid)
    return Credentials(username, _password(passwd), _username(authzid) if authzid else "")


def login(username: bytes, password: bytes) -> Credentials:
    return Credentials(_username(username), _password(password))
