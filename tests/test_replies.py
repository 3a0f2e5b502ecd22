"""The reply catalogue (ssmtpd.replies): well-formed codes and the exact texts of the documentation."""

import re

import pytest

from ssmtpd import replies
from ssmtpd.replies import Reply, SmtpError

CATALOGUE = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
# The greeting and EHLO/HELO answers carry no enhanced code (RFC 2034 §3).
BUILT = {
    "greeting": replies.greeting("mx.test"),
    "ehlo": replies.ehlo("mx.test", "client.test", ["PIPELINING", "SIZE 26214400"]),
    "helo": replies.helo("mx.test"),
}
ALL = {**CATALOGUE, **BUILT}
# RFC 3463 §2: class "." subject "." detail, subject and detail 1 to 3 digits.
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def test_catalogue_is_not_empty():
    """docs/dialogue.md "The dialogue": every reply is named once in ssmtpd.replies (the checks below need them)."""
    assert len(CATALOGUE) >= 40, sorted(CATALOGUE)


@pytest.mark.parametrize("name", sorted(ALL))
def test_code_is_a_reply_code(name):
    """docs/dialogue.md "The dialogue": codes are 2xx-5xx with a second digit 0-5 (RFC 5321 §4.2.1)."""
    code = ALL[name].code
    assert isinstance(code, int) and 200 <= code <= 599, (name, code)
    assert code // 10 % 10 <= 5, (name, code)


@pytest.mark.parametrize("name", sorted(n for n in ALL if ALL[n].enhanced))
def test_enhanced_code_matches_class(name):
    """docs/dialogue.md "The dialogue": enhanced codes are c.sss.ddd, class = the reply's first digit (RFC 3463 §2)."""
    reply = ALL[name]
    assert ENHANCED.match(reply.enhanced), (name, reply.enhanced)
    assert reply.enhanced[0] == str(reply.code)[0], (name, reply.code, reply.enhanced)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_replies_carry_enhanced_code(name):
    """docs/dialogue.md "The dialogue": replies carry enhanced codes; RFC 2034 exempts only 3xx and greeting/EHLO/HELO."""
    reply = CATALOGUE[name]
    if reply.code // 100 == 3:
        assert reply.enhanced == "", (name, reply)
    else:
        assert reply.enhanced, (name, reply)


def test_greeting_and_helo_have_no_enhanced_code():
    """docs/dialogue.md "The dialogue": greeting `220 <hostname> ESMTP ssmtpd`; it and EHLO/HELO lack enhanced codes."""
    assert replies.greeting("mx.test").encode() == b"220 mx.test ESMTP ssmtpd\r\n"
    assert replies.helo("mx.test").encode() == b"250 mx.test\r\n"
    assert replies.ehlo("mx.test", "client.test", ["PIPELINING", "SIZE 1"]).encode() == (
        b"250-mx.test greets client.test\r\n250-PIPELINING\r\n250 SIZE 1\r\n")


def test_no_two_names_for_one_reply():
    """docs/dialogue.md "The dialogue": each reply is named once: no two names share (code, enhanced, text)."""
    seen = {}
    for name, reply in sorted(CATALOGUE.items()):
        key = (reply.code, reply.enhanced, reply.text)
        assert key not in seen, f"{name} and {seen[key]} are both {reply}"
        seen[key] = name


@pytest.mark.parametrize("name", sorted(ALL))
def test_wire_form(name):
    """docs/dialogue.md "The dialogue": lines are `<code>[ -]<enhanced> <text>` CRLF, ASCII, <= 512 octets (RFC 5321)."""
    reply = ALL[name]
    wire = reply.encode()
    assert wire.endswith(b"\r\n")
    lines = wire[:-2].split(b"\r\n")
    assert b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b"")
    for i, line in enumerate(lines):
        sep = b" " if i == len(lines) - 1 else b"-"
        head = str(reply.code).encode() + sep
        if reply.enhanced:
            head += reply.enhanced.encode() + b" "
        assert line.startswith(head), (name, line)
        assert len(line) + 2 <= 512, (name, len(line))
        line.decode("ascii")


def test_multiline_encode_uses_continuation():
    """docs/dialogue.md "The dialogue": multi-line text becomes `-` continuation lines, each with the enhanced code."""
    reply = Reply(250, "2.0.0", "first\nsecond\nthird")
    assert reply.encode() == b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 third\r\n"
    assert Reply(554, "5.3.0", "no such list").encode() == b"554 5.3.0 no such list\r\n"
    assert Reply(354, "", "go ahead").encode() == b"354 go ahead\r\n"


def test_with_text_keeps_the_codes():
    """docs/process-program.md "The process program": the process program chooses the words, never the code."""
    reply = replies.ACCEPTED.with_text("queued as 4711")
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.0.0", "queued as 4711")
    assert reply.encode() == b"250 2.0.0 queued as 4711\r\n"
    assert replies.ACCEPTED.text != "queued as 4711"  # the catalogue entry is untouched


def test_closing_replies():
    """docs/dialogue.md "The dialogue", docs/operations.md "Signals": 221 and 421 end the session, nothing else does."""
    closing = sorted(n for n, r in CATALOGUE.items() if r.closes)
    assert closing == sorted(n for n, r in CATALOGUE.items() if r.code in (221, 421))
    assert replies.BYE.closes and replies.SHUTTING_DOWN.closes
    assert not replies.OK.closes and not replies.TOO_BIG.closes


def test_smtp_error_carries_its_reply():
    """docs/dialogue.md "The dialogue": a verb can answer by raising SmtpError(reply)."""
    err = SmtpError(replies.NEED_MAIL)
    assert err.reply is replies.NEED_MAIL
    assert "503" in str(err)


def test_help_names_every_command():
    """docs/dialogue.md "The dialogue": HELP lists the commands the server implements."""
    for verb in ("EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP",
                 "QUIT", "VRFY", "HELP"):
        assert verb in replies.HELP.text.split(), verb


# (name, code, enhanced, exact text or None where the documentation leaves the words free)
SPEC_REPLIES = [
    ("AUTH_OK", 235, "2.7.0", "Authentication successful"),
    ("BAD_CREDENTIALS", 535, "5.7.8", "Authentication credentials invalid"),
    ("MUST_STARTTLS", 530, "5.7.0", "Must issue a STARTTLS command first"),
    ("AUTH_REQUIRED", 530, "5.7.0", "Authentication required"),
    ("LINE_TOO_LONG", 500, "5.5.2", "Line too long"),
    ("TOO_MANY_RECIPIENTS", 452, "4.5.3", None),
    ("TOO_BIG", 552, "5.3.4", None),
    ("BARE_LINE_ENDING", 554, "5.6.0", None),
    ("SHUTTING_DOWN", 421, "4.3.2", None),
    ("IDLE_TIMEOUT", 421, "4.4.2", None),
    ("TOO_MANY_AUTH_FAILURES", 421, "4.7.0", None),
    ("PROCESS_TEMPFAIL", 451, "4.3.0", None),
    ("AUTH_TEMPFAIL", 454, "4.7.0", None),
    ("PROCESS_REJECTED", 554, "5.3.0", None),
    ("NOT_IMPLEMENTED", 502, "5.5.1", None),
    ("ACCEPTED", 250, "2.0.0", None),
    ("BAD_BASE64", 501, "5.5.2", None),
    ("ALREADY_AUTHENTICATED", 503, "5.5.1", None),
    ("AUTH_IN_TRANSACTION", 503, "5.5.1", None),
    ("NO_HELO", 503, "5.5.1", None),
    ("NEED_MAIL", 503, "5.5.1", None),
    ("NEED_RCPT", 503, "5.5.1", None),
    ("NESTED_MAIL", 503, "5.5.1", None),
    ("TOO_MANY_CONNECTIONS", 421, None, None),
    ("TOO_MANY_FROM_IP", 421, None, None),
    ("VRFY_ANSWER", 252, None, None),
    ("HELP", 214, None, None),
    ("BYE", 221, None, None),
]


@pytest.mark.parametrize("name,code,enhanced,text", SPEC_REPLIES,
                         ids=[row[0] for row in SPEC_REPLIES])
def test_spec_reply(name, code, enhanced, text):
    """docs/auth-program.md "The auth program" to docs/operations.md "Signals": the contract's codes, and its words where the documentation fixes them."""
    reply = getattr(replies, name)
    assert reply.code == code, reply
    if enhanced is not None:
        assert reply.enhanced == enhanced, reply
    if text is not None:
        assert reply.text == text, reply
        assert reply.encode() == f"{code} {enhanced} {text}\r\n".encode()


def test_auth_cancel_is_501():
    """docs/dialogue.md "The dialogue": `*` cancels an AUTH with 501."""
    assert replies.AUTH_CANCELLED.code == 501
