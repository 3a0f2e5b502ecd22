"""Pure decoding of SASL PLAIN (RFC 4616), LOGIN, OAUTHBEARER (RFC 7628) and
XOAUTH2 responses, no I/O.

Every malformed input raises SmtpError with the reply docs/dialogue.md "The dialogue" gives, so the session
never needs to inspect bytes itself.
"""

import binascii
import base64
import json
import re
from dataclasses import dataclass
from typing import Dict

from ssmtpd import replies
from ssmtpd.replies import SmtpError
from ssmtpd.syntax import has_unsafe_char

PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
# A bearer token instead of a password (docs/auth-program.md "OAuth 2 tokens").
TOKEN_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")
MECHANISMS = PASSWORD_MECHANISMS + TOKEN_MECHANISMS

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
    token: str = ""  # the bearer token of OAUTHBEARER and XOAUTH2, else ""

    @property
    def secret(self) -> str:
        """What proves the name: the token of a token mechanism, else the password."""
        return self.token or self.password

    @property
    def foreign_authzid(self) -> bool:
        """Asks to act as someone else: we cannot ask the auth program whether
        authcid may, so the session refuses it (535) like a wrong password."""
        return bool(self.authzid) and self.authzid != self.username

    def __repr__(self) -> str:  # never show the secret, not even in a traceback
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
    # (docs/limits.md "Envelope values that could harm a program").
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


# --- bearer tokens -------------------------------------------------------------

# RFC 7628 §3.1: key = 1*ALPHA; pairs end with %x01 (kvsep).
_KVSEP = b"\x01"
# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
# Checked strictly: the token goes into the auth program's environment, and
# these characters cannot split a line or end a C string there.
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(rb"Bearer +(.*)", re.IGNORECASE | re.DOTALL)


def _pairs(data: bytes) -> Dict[bytes, bytes]:
    """`key=value` pairs, each ended by %x01 (RFC 7628 §3.1); a key given
    twice, or one that is not letters, is malformed."""
    if not data.endswith(_KVSEP):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    pairs = {}
    for pair in data[:-1].split(_KVSEP):
        key, eq, value = pair.partition(b"=")
        if not eq or not key.isalpha() or key in pairs:
            raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
        pairs[key] = value
    return pairs


def _bearer(pairs: Dict[bytes, bytes]) -> str:
    """The token of `auth=Bearer <token>` (RFC 7628 §3.1, RFC 6750 §2.1)."""
    match = _BEARER.fullmatch(pairs.get(b"auth", b""))
    if match is None or not _B64TOKEN.fullmatch(match.group(1)):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    return match.group(1).decode("ascii")


def _saslname(raw: bytes) -> bytes:
    """RFC 5801 §4 saslname: "," and "=" are sent as =2C and =3D, and no
    other "=" may appear."""
    parts = raw.split(b"=")
    out = [parts[0]]
    for part in parts[1:]:
        escape, rest = part[:2], part[2:]
        if escape not in (b"2C", b"3D"):
            raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
        out.append(b"," if escape == b"2C" else b"=")
        out.append(rest)
    return b"".join(out)


def oauthbearer(message: bytes) -> Credentials:
    """gs2-header %x01 *(key=value %x01) %x01 (RFC 7628 §3.1).

    The GS2 header is `n,a=NAME,` or `y,a=NAME,` (RFC 5801 §4): channel
    binding (`p=`) is refused, since a TLS channel binding cannot be checked
    by the auth program.  The authzid is the user name, so it is required.
    """
    flag, comma, rest = message.partition(b",")
    if not comma or flag not in (b"n", b"y"):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    authzid, comma, rest = rest.partition(b",")
    if not comma or not authzid.startswith(b"a=") or not rest.startswith(_KVSEP):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    # The pairs end with an empty one: %x01 %x01.
    body = rest[1:]
    if not body.endswith(_KVSEP + _KVSEP):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    pairs = _pairs(body[:-1])
    username = _username(_saslname(authzid[2:]))
    return Credentials(username, token=_bearer(pairs))


def xoauth2(message: bytes) -> Credentials:
    """`user=NAME %x01 auth=Bearer TOKEN %x01 %x01`, the form Google and
    Microsoft document for their XOAUTH2 mechanism."""
    if not message.endswith(_KVSEP + _KVSEP):
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    pairs = _pairs(message[:-1])
    if set(pairs) != {b"user", b"auth"}:
        raise SmtpError(replies.BAD_CREDENTIALS_SYNTAX)
    return Credentials(_username(pairs[b"user"]), token=_bearer(pairs))


def token_error_challenge() -> str:
    """The base64 JSON of a rejected token (RFC 7628 §3.2.2), sent before
    the final 535.  No `scope`: which scope a token needs is the auth
    program's business, and RFC 7628 makes the field optional."""
    status = json.dumps({"status": "invalid_token", "schemes": "bearer"},
                        separators=(",", ":"))
    return base64.b64encode(status.encode("ascii")).decode("ascii")
