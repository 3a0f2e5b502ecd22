"""Pure parsing of command arguments: paths, ESMTP parameters, HELO names.

Values that reach the programs' argv and environment or the Received header
are refused here with a 501, never passed on, when they could harm a program
that trusts them (docs/limits.md "Envelope values that could harm a program"):
- control characters: a CR/LF could inject a header or split a log line, a
  NUL cannot be passed in argv or env at all;
- Unicode line and paragraph separators and format characters (categories
  Zl, Zp, Cf): Python's splitlines() splits at U+2028, bidi controls make a
  name read differently from what it is;
- a local part starting with `-`, quoted or not: a program that passes the
  address to sendmail(8) or the like would read it as an option
  (PHPMailer, CVE-2016-10033).
"""

import re
import unicodedata
from typing import Dict, Tuple

from ssmtpd import replies
from ssmtpd.replies import Reply, SmtpError

# RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the brackets.
MAX_PATH = 256

_PARAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?$")


# Cc: C0, DEL and C1 controls (U+0080-U+009F: CSI starts a terminal escape).
_UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp"))


def has_unsafe_char(text: str) -> bool:
    """A control, format, line or paragraph separator character."""
    if text.isascii():
        return not text.isprintable()  # for ASCII: exactly " " to "~"
    return any(unicodedata.category(c) in _UNSAFE_CATEGORIES for c in text)


# The usual path: <local@domain> of letters, digits and a few marks, nothing
# quoted, escaped or routed, the local part not starting with "-".
# _parse_path would accept it as it is; a property test holds the two together.
_SIMPLE_PATH = re.compile(r"<([A-Za-z0-9_.+=][A-Za-z0-9_.+=-]*@[A-Za-z0-9.-]+)>")


def parse_path(arg: str, keyword: str, bad: Reply,
               need_domain: bool = False) -> Tuple[str, Dict[str, str]]:
    """`FROM:<addr> PARAMS` -> (addr, {PARAM: value}).

    Accepts a space after the colon (common in the wild) and a quoted local
    part with spaces or '>' inside (RFC 5321 §4.1.2).  With `need_domain`, an
    address without `@domain` is refused, except postmaster (§4.1.1.3).
    """
    start = len(keyword) + 1
    if arg[:start].upper() == keyword + ":":
        simple = _SIMPLE_PATH.match(arg, start)
        if simple is not None and simple.end() - start <= MAX_PATH:
            return simple.group(1), parse_params(arg[simple.end():])
    return _parse_path(arg, keyword, bad, need_domain)


def _parse_path(arg: str, keyword: str, bad: Reply,
                need_domain: bool) -> Tuple[str, Dict[str, str]]:
    """parse_path for every path, one check at a time."""
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise SmtpError(replies.SYNTAX)
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise SmtpError(bad)
    end = _closing_bracket(rest)
    if end < 0:
        raise SmtpError(bad)
    address = rest[1:end]
    if len(address) + 2 > MAX_PATH or has_unsafe_char(address) or _unquoted(address, " <"):
        raise SmtpError(bad)
    # A source route (@a,@b:user@c) is obsolete; RFC 5321 §4.1.1.3 says to ignore it.
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    if address:
        local, domain = split_address(address)
        if local.lstrip('"').startswith("-"):
            raise SmtpError(bad)
        if need_domain and not domain and local.lower() != "postmaster":
            raise SmtpError(bad)
    return address, parse_params(rest[end + 1:])


def split_address(address: str) -> Tuple[str, str]:
    """(local part, domain) at the last `@` outside quotes; domain "" when none."""
    if _plain(address):
        at = address.rfind("@")
    else:
        at = -1
        for i, c in _unquoted_chars(address):
            if c == "@":
                at = i
    if at < 0:
        return address, ""
    return address[:at], address[at + 1:]


def _plain(text: str) -> bool:
    """No quoted string or escape: every character stands for itself.

    Nearly every real address is plain, and str methods then find what a
    walk of `_unquoted_chars` would, without a Python step per character.
    """
    return '"' not in text and "\\" not in text


def _unquoted_chars(text: str):
    """(index, char) of each character outside a quoted string or escape."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted:
            yield i, c


def _closing_bracket(text: str) -> int:
    if _plain(text):
        return text.find(">", 1)
    return next((i for i, c in _unquoted_chars(text) if c == ">" and i > 0), -1)


def _unquoted(text: str, chars: str) -> bool:
    """A space or '<' outside quotes means the path was never closed."""
    if _plain(text):
        return any(c in text for c in chars)
    return any(c in chars for _, c in _unquoted_chars(text))


def parse_params(text: str) -> Dict[str, str]:
    params: Dict[str, str] = {}
    if text and not text.startswith(" "):
        raise SmtpError(replies.SYNTAX)
    for word in text.split():
        if not _PARAM.match(word):
            raise SmtpError(replies.SYNTAX)
        name, _, value = word.partition("=")
        params[name.upper()] = value
    return params


def helo_name(arg: str) -> str:
    name = arg.strip(" ")
    if not name or has_unsafe_char(name) or len(name) > 255:
        raise SmtpError(replies.BAD_HELO)
    return name
