"""SMTP smuggling: DATA ends only at <CR><LF>.<CR><LF> (docs/dialogue.md "The dialogue", RFC 5321 §2.3.8, §4.1.1.4).

Each attack hides a second transaction behind a would-be end of data that some
other server in a chain might honour.  Here it must stay data: one reply for
the whole thing, never a second transaction, and a message with a bare CR or
LF is refused (554 5.6.0) without running the process program.
"""

import re
import time

import pytest

from ssmtpd import replies

SMUGGLED = b"MAIL FROM:<smuggled@x>\r\nRCPT TO:<y@z>\r\nDATA\r\nsmuggled\r\n"
HEAD = b"From: a@example.org\r\nSubject: s\r\n\r\nhello"

# Would-be ends containing a bare CR or LF: never an end, and the message is refused.
BARE_FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n",
                  b"\r\n.\r\r\n", b"\r\n\n.\r\n", b"\r\n\r.\r\n"]
# The same right after the DATA line, whose CRLF counts as the one before the dot.
BARE_FAKE_STARTS = [b".\n", b".\r", b".\r\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n"]
# Lines that look like an end to a careless eye but are CRLF-clean: plain data.
CLEAN_FAKE_ENDS = [b"\r\n..\r\n", b"\r\n. \r\n", b"\r\n.x\r\n", b"\r\n.\t\r\n",
                   b"\r\n .\r\n", b"\r\n.\x00\r\n"]

BARE_LINE_ENDING = str(replies.BARE_LINE_ENDING)


def session(srv):
    raw = srv.raw(timeout=20)
    raw.login(srv.tls_context())
    return raw


def start_data(raw, sender="real@example.org"):
    raw.start_data(sender, ("rcpt@example.net",))


def nothing_pending(raw, wait=0.1) -> bool:
    """No further reply is on its way: the server answered exactly once."""
    if raw.buf:
        return False
    raw.sock.settimeout(wait)
    try:
        raw.buf += raw.sock.recv(65536)  # a reply, or b"" if the server hung up
        return False
    except TimeoutError:
        return True
    finally:
        raw.sock.settimeout(20)


def assert_session_goes_on(raw):
    """Exactly one reply was sent, no smuggled transaction is open, the session lives."""
    assert nothing_pending(raw)
    assert raw.cmd("NOOP")[1] == [str(replies.OK)]
    # A smuggled MAIL would have opened a transaction: RCPT would be accepted.
    assert raw.cmd("RCPT TO:<y@z>")[0] == 503
    assert raw.cmd("DATA")[0] == 503


def senders(srv):
    return [r["env"]["SSMTPD_MAIL_FROM"] for r in srv.runs()]


def body(stdin: str) -> bytes:
    """What the program got, without the Received line the server put first."""
    data = stdin.encode("latin-1")
    m = re.match(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    assert m, data[:200]
    return data[m.end():]


@pytest.mark.parametrize("lead", [HEAD + fake for fake in BARE_FAKE_ENDS] + BARE_FAKE_STARTS,
                         ids=lambda lead: repr(lead.replace(HEAD, b"<head>")))
def test_bare_fake_end_is_data_and_refused(server, lead):
    """docs/dialogue.md "The dialogue": LF.LF, CR.CR, LF.CRLF, CRLF.LF, CRLF.CR, CR.CRLF never end DATA → one 554 5.6.0."""
    raw = session(server)
    start_data(raw)
    assert b"\r\n.\r\n" not in b"\r\n" + lead + SMUGGLED
    raw.send(lead + SMUGGLED + b".\r\n")
    code, lines = raw.reply()
    assert lines == [BARE_LINE_ENDING]
    assert_session_goes_on(raw)
    raw.close()
    assert server.runs() == []


@pytest.mark.parametrize("fake", BARE_FAKE_ENDS, ids=repr)
def test_bare_fake_end_split_across_writes(server, fake):
    """docs/dialogue.md "The dialogue": the same, with every byte around the fake end in its own TCP segment."""
    raw = session(server)
    start_data(raw)
    raw.send(HEAD)
    for byte in fake:
        time.sleep(0.01)
        raw.send(bytes([byte]))
    time.sleep(0.01)
    raw.send(SMUGGLED)
    time.sleep(0.01)
    raw.send(b".\r\n")
    assert raw.reply()[1] == [BARE_LINE_ENDING]
    assert_session_goes_on(raw)
    raw.close()
    assert server.runs() == []


@pytest.mark.parametrize("fake", CLEAN_FAKE_ENDS, ids=repr)
def test_clean_look_alike_is_just_data(server, fake):
    """docs/dialogue.md "The dialogue": a CRLF-clean dot line that is not CRLF.CRLF is content: one message, one run."""
    raw = session(server)
    start_data(raw)
    raw.send(HEAD + fake + SMUGGLED + b".\r\n")
    assert raw.reply()[1] == [str(replies.ACCEPTED)]
    assert_session_goes_on(raw)
    raw.close()
    assert senders(server) == ["real@example.org"]
    unstuffed = fake.replace(b"\r\n.", b"\r\n")
    assert body(server.runs()[0]["stdin"]) == HEAD + unstuffed + SMUGGLED


def test_real_end_split_across_writes(server):
    """docs/dialogue.md "The dialogue": CRLF.CRLF split over several segments still ends DATA, once."""
    raw = session(server)
    start_data(raw)
    for part in (HEAD + b"\r", b"\n", b".", b"\r", b"\n"):
        raw.send(part)
        time.sleep(0.02)
    assert raw.reply()[1] == [str(replies.ACCEPTED)]
    assert_session_goes_on(raw)
    raw.close()
    assert [body(r["stdin"]) for r in server.runs()] == [HEAD + b"\r\n"]


@pytest.mark.parametrize("message", [
    b"Subject: s\r\n\r\nhello\nworld\r\n",
    b"Subject: s\r\n\r\nhello\rworld\r\n",
    b"Subject: s\nX: y\r\n\r\nbody\r\n",
    b"\nSubject: s\r\n\r\nbody\r\n",
    b"\rSubject: s\r\n\r\nbody\r\n",
    b"Subject: s\r\n\r\nbody\r\r\n",
    b"Subject: s\r\n\r\nbody\n\r\n",
    b"Subject: s\r\n\r\n" + b"x" * 300000 + b"\r" + b"y" * 300000 + b"\r\n",
], ids=["LF-in-body", "CR-in-body", "LF-in-header", "leading-LF", "leading-CR",
        "CR-before-CRLF", "LF-before-CRLF", "CR-in-long-line"])
def test_bare_cr_or_lf_anywhere_is_refused(server, message):
    """docs/dialogue.md "The dialogue": a message with a bare CR or LF → 554 5.6.0 after the real end, no run."""
    raw = session(server)
    start_data(raw)
    raw.send(message + b".\r\n")
    assert raw.reply()[1] == [BARE_LINE_ENDING]
    assert_session_goes_on(raw)
    # The refusal is per message: the next clean one on the same connection is delivered.
    start_data(raw, sender="next@example.org")
    raw.send(b"From: a@example.org\r\n\r\nclean\r\n.\r\n")
    assert raw.reply()[0] == 250
    raw.close()
    assert senders(server) == ["next@example.org"]


def test_dot_unstuffing_exact_bytes(server):
    """RFC 5321 §4.5.2: a leading dot is removed from each line; nothing else changes."""
    raw = session(server)
    start_data(raw)
    wire = (b"..\r\nFrom: a@example.org\r\n\r\n"
            b"..\r\n.foo\r\n...\r\n..foo\r\n. \r\n x.\r\nmid.dle\r\n.\t.\r\n...\r\n.\r\n")
    raw.send(wire)
    assert raw.reply()[1] == [str(replies.ACCEPTED)]
    raw.close()
    [run] = server.runs()
    assert body(run["stdin"]) == (b".\r\nFrom: a@example.org\r\n\r\n"
                                  b".\r\nfoo\r\n..\r\n.foo\r\n \r\n x.\r\nmid.dle\r\n\t.\r\n..\r\n")
