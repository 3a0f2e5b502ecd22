"""Property tests of the pure modules: the DATA reader (docs/dialogue.md "The dialogue"), SASL decoding
(docs/dialogue.md "The dialogue" AUTH), envelope paths and log fields.

These run in-process on generated input; the server tests pin the same rules
over real sockets.
"""

import base64
import io
import json
import os
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ssmtpd import dotreader, log, replies, sasl, syntax
from ssmtpd import spool as spooling
from ssmtpd.replies import SmtpError
from ssmtpd.stream import ClientGone

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UNLIMITED = 10 ** 12
TERMINATOR = b"\r\n.\r\n"


class ChunkStream:
    """The two ClientStream methods the DATA reader uses, over chunks given up front."""

    def __init__(self, chunks):
        assert all(chunks), "a socket read never returns nothing but at EOF"
        self.chunks = list(chunks)
        self.buffer = b""
        self.fed = 0
        self.reads = 0

    def recv_some(self) -> bytes:
        self.reads += 1
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        if not self.chunks:
            raise ClientGone("end of test input")
        data = self.chunks.pop(0)
        self.fed += len(data)
        return data

    def unread(self, data: bytes) -> None:
        self.buffer = data + self.buffer

    def rest(self) -> bytes:
        """What a later reader would see: unread bytes, then the unconsumed chunks."""
        return self.buffer + b"".join(self.chunks)


def split(data: bytes, cuts) -> list:
    points = sorted(set(c for c in cuts if 0 < c < len(data)))
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def read(chunks, limit=UNLIMITED):
    stream, spool = ChunkStream(chunks), io.BytesIO()
    result = dotreader.read_message(stream, limit, spool)
    return result, spool.getvalue(), stream.rest()


def stuff(message: bytes) -> bytes:
    """Dot-stuffing and the terminator, as a client sends a message (RFC 5321 §4.5.2)."""
    return (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def reference(stream: bytes):
    """The rule, stated directly: (content before the end, what follows it, bare?).

    DATA starts right after a CRLF, so the end is the first CRLF.CRLF of
    CRLF + stream; the content keeps the CRLF of its last line.
    """
    end = (b"\r\n" + stream).find(TERMINATOR)
    assert end >= 0
    content, after = stream[:end], stream[end + 3:]
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", content) is not None
    return content, after, bare


def unstuff(content: bytes) -> bytes:
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]


# --- strategies ----------------------------------------------------------------

# Lines without CR or LF, rich in dots, so stuffing and look-alike ends are common.
line = st.lists(st.sampled_from([b".", b"..", b"a", b" ", b"\t", b"\x00", b"\xff", b"x.y",
                                 b"MAIL FROM:<x@y>"]), max_size=6).map(b"".join)
message = st.lists(line, max_size=12).map(lambda ls: b"".join(x + b"\r\n" for x in ls))
# Arbitrary streams: fragments of every kind of line ending and dot line.
fragment = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\r\n.", b".\r\n", b"\n.\n",
                            b"\r.\r", b"\r\n.\n", b"\n.\r\n", TERMINATOR, b"\x00", b"\xc3\xa9"])
raw_bytes = st.lists(fragment, max_size=30).map(b"".join)
cuts = st.lists(st.integers(min_value=1, max_value=400), max_size=12)


# --- the DATA reader -------------------------------------------------------------

@PROPERTY
@given(message, st.binary(max_size=40), cuts)
def test_stuffed_message_round_trips(msg, after, cut_points):
    """docs/process-program.md "The process program", docs/dialogue.md "The dialogue": a dot-stuffed CRLF message comes out exactly; what follows is left unread."""
    wire = stuff(msg) + after
    result, spooled, rest = read(split(wire, cut_points))
    assert result.status == dotreader.OK
    assert spooled == msg
    assert result.size == len(msg)
    assert rest == after


@PROPERTY
@given(raw_bytes, st.binary(max_size=20), cuts)
def test_chunk_boundaries_never_matter(stream, after, cut_points):
    """docs/dialogue.md "The dialogue": how the client's bytes are split into reads never changes the outcome."""
    wire = stream + TERMINATOR + after
    whole = read([wire])
    pieces = read(split(wire, cut_points))
    assert pieces[0] == whole[0]
    assert pieces[2] == whole[2]
    if whole[0].status == dotreader.OK:
        assert pieces[1] == whole[1]


@PROPERTY
@given(raw_bytes, st.binary(max_size=20), cuts)
def test_ends_only_at_the_first_crlf_dot_crlf(stream, after, cut_points):
    """docs/dialogue.md "The dialogue": DATA ends at the first CRLF.CRLF and nowhere else; a bare CR or LF before it
    makes the message bare-line-ending, otherwise it is the unstuffed content."""
    wire = stream + TERMINATOR + after
    content, expected_rest, bare = reference(wire)
    result, spooled, rest = read(split(wire, cut_points))
    assert rest == expected_rest
    if bare:
        assert result.status == dotreader.BARE_LINE_ENDING
    else:
        assert result.status == dotreader.OK
        assert spooled == unstuff(content)
        assert result.size == len(spooled)


@PROPERTY
@given(raw_bytes, cuts)
def test_no_terminator_means_client_gone(stream, cut_points):
    """docs/dialogue.md "The dialogue": without CRLF.CRLF the DATA phase never ends; a vanished client is ClientGone."""
    assume(TERMINATOR not in b"\r\n" + stream and stream)
    with pytest.raises(ClientGone):
        read(split(stream, cut_points))


@PROPERTY
@given(message, st.integers(min_value=0, max_value=200), st.binary(max_size=20), cuts)
def test_size_limit(msg, limit, after, cut_points):
    """docs/dialogue.md "The dialogue": over the limit → too-big after reading to the real end; nothing past the
    limit is kept; the next command is still in place."""
    result, spooled, rest = read(split(stuff(msg) + after, cut_points), limit)
    assert rest == after
    assert result.size == len(msg)
    if len(msg) > limit:
        assert result.status == dotreader.TOO_BIG
        assert len(spooled) <= limit
        assert msg.startswith(spooled)
    else:
        assert result.status == dotreader.OK
        assert spooled == msg


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=1000, max_value=300000), st.sampled_from([b"a", b"\r", b"\xff"]),
       st.booleans())
def test_endless_line_is_scanned_in_bounded_memory(chunk, filler, dotted):
    """docs/dialogue.md "The dialogue" / stream bounds: a 1 MB line without LF is not buffered whole (MAX_PENDING)."""
    line = filler * (1024 * 1024)
    wire = (b".." if dotted else b"") + line + TERMINATOR + b"NOOP\r\n"
    expected = (b"." if dotted else b"") + line + b"\r\n"
    stream, spool = ChunkStream(split(wire, range(chunk, len(wire), chunk))), io.BytesIO()
    worst = 0
    original = stream.recv_some

    def recv_some():
        nonlocal worst
        # Octets taken from the client but neither written out nor given back.
        worst = max(worst, stream.fed - len(stream.buffer) - spool.tell())
        return original()

    stream.recv_some = recv_some
    result = dotreader.read_message(stream, UNLIMITED, spool)
    assert stream.rest() == b"NOOP\r\n"
    if filler == b"\r":
        assert result.status == dotreader.BARE_LINE_ENDING
        return
    assert result.status == dotreader.OK
    assert spool.getvalue() == expected
    assert worst <= dotreader.MAX_PENDING


@PROPERTY
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(min_value=0, max_value=2000))
def test_spool_keeps_every_octet_and_goes_to_disk_when_big(writes, memory_limit):
    """docs/process-program.md "The process program": the spool returns the message intact, always as a real file to hand over."""
    spool = spooling.Spool(memory_limit=memory_limit)
    try:
        for data in writes:
            spool.write(data)
        total = b"".join(writes)
        reader = spool.reader()
        assert reader.read() == total
        assert reader.fileno() >= 0
        os.lseek(reader.fileno(), 0, os.SEEK_SET)  # what the program reads on fd 0
        assert os.read(reader.fileno(), len(total) + 1) == total
    finally:
        spool.close()


# --- SASL decoding ------------------------------------------------------------------

def test_spool_failure_still_reads_to_the_end(monkeypatch):
    """docs/dialogue.md "The dialogue" DATA: a spool that cannot grow (disk full) never stops the reader mid-message."""
    import errno
    import tempfile

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_space)
    spool = spooling.Spool(memory_limit=10)
    body = b"x" * 100 + b"\r\nMAIL FROM:<smuggled@x>\r\n"
    stream = ChunkStream(split(body + TERMINATOR + b"NOOP\r\n", [7, 50, 120]))
    result = dotreader.read_message(stream, UNLIMITED, spool)
    assert result.status == dotreader.OK
    assert stream.rest() == b"NOOP\r\n"  # the smuggled line was data, not a command
    with pytest.raises(OSError):
        spool.reader()
    spool.close()


def decodes_or_refuses(call, *args):
    """Run `call`; only SmtpError may come out (docs/dialogue.md "The dialogue": every bad input is a reply)."""
    try:
        return call(*args)
    except SmtpError as e:
        assert isinstance(e.reply, replies.Reply)
        assert 500 <= e.reply.code < 600
        return None


@PROPERTY
@given(st.one_of(st.text(), st.text(alphabet="ABCDabcd0189+/= *\t\r\n")))
def test_decode_response_never_raises_anything_else(line):
    """docs/dialogue.md "The dialogue" AUTH: arbitrary response lines decode or are refused with an SMTP reply."""
    out = decodes_or_refuses(sasl.decode_response, line)
    assert out is None or isinstance(out, bytes)


@PROPERTY
@given(st.binary(max_size=200), st.sampled_from(["", " ", "\t", "  "]))
def test_decode_response_reads_strict_base64(data, pad):
    """RFC 4954 §4: a base64 response decodes to its octets; surrounding blanks are ignored."""
    token = base64.b64encode(data).decode()
    assume(token not in ("", "=", "*"))
    assert sasl.decode_response(pad + token + pad) == data


@pytest.mark.parametrize("line", ["*", " *", "* ", "\t*\t"])
def test_star_cancels(line):
    """docs/dialogue.md "The dialogue" / RFC 4954 §4: `*` cancels the exchange with 501."""
    with pytest.raises(SmtpError) as e:
        sasl.decode_response(line)
    assert e.value.reply == replies.AUTH_CANCELLED


@PROPERTY
@given(st.binary(max_size=200))
def test_plain_never_raises_anything_else(message):
    """docs/dialogue.md "The dialogue" AUTH PLAIN: arbitrary decoded octets give credentials or an SMTP reply."""
    creds = decodes_or_refuses(sasl.plain, message)
    if creds is not None:
        assert creds.username and "\0" not in creds.password


@PROPERTY
@given(st.binary(max_size=100), st.binary(max_size=100))
def test_login_never_raises_anything_else(username, password):
    """docs/dialogue.md "The dialogue" AUTH LOGIN: arbitrary username and password octets never crash the decoder."""
    decodes_or_refuses(sasl.login, username, password)


# Control, format and line/paragraph separator characters are refused in names.
UNSAFE = ("Cc", "Cf", "Zl", "Zp")
username = st.text(st.characters(blacklist_categories=("Cs",) + UNSAFE), min_size=1,
                   max_size=40)
password = st.binary(max_size=60).filter(lambda p: b"\0" not in p)


@PROPERTY
@given(username, password, st.booleans())
def test_plain_round_trip(user, secret, with_authzid):
    """RFC 4616: authzid (empty or equal) NUL authcid NUL passwd decodes to exactly those."""
    raw_user = user.encode("utf-8")
    token = base64.b64encode((raw_user if with_authzid else b"") + b"\0" + raw_user + b"\0"
                             + secret).decode()
    creds = sasl.plain(sasl.decode_response(token))
    assert creds.username == user
    # Octets that are not UTF-8 survive unchanged to the auth program's environment.
    assert creds.password.encode("utf-8", "surrogateescape") == secret
    assert repr(creds) == f"Credentials(username={user!r}, password=***)"


@PROPERTY
@given(username, username, password)
def test_plain_foreign_authzid_is_refused(authzid, user, secret):
    """docs/dialogue.md "The dialogue": a PLAIN authzid that differs from the authcid is marked, for the 535."""
    assume(authzid != user)
    message = authzid.encode() + b"\0" + user.encode() + b"\0" + secret
    creds = sasl.plain(message)
    assert creds.foreign_authzid and creds.username == user


@PROPERTY
@given(username, username, st.characters(whitelist_categories=UNSAFE), password)
def test_plain_unsafe_name_is_refused(head, tail, bad, secret):
    """docs/limits.md "Envelope values that could harm a program": a name with a control, format or separator character → 501."""
    for name in (head + bad + tail, bad + tail, head + bad):
        with pytest.raises(SmtpError) as e:
            sasl.plain(b"\0" + name.encode("utf-8") + b"\0" + secret)
        assert e.value.reply == replies.BAD_CREDENTIALS_SYNTAX


@PROPERTY
@given(username, password)
def test_login_round_trip(user, secret):
    """RFC 4954 LOGIN: username and password octets decode to exactly those."""
    creds = sasl.login(base64.b64decode(base64.b64encode(user.encode())), secret)
    assert creds.username == user
    assert creds.password.encode("utf-8", "surrogateescape") == secret


# --- bearer tokens: OAUTHBEARER (RFC 7628) and XOAUTH2 (docs/auth-program.md "OAuth 2 tokens")

# RFC 6750 §2.1 b64token.
bearer_token = st.builds(lambda body, pad: body + "=" * pad,
                         st.text("ABCXYZabcxyz0189-._~+/", min_size=1, max_size=80),
                         st.integers(0, 2))
# Other pairs a client may add (RFC 7628 §3.1: host, port; any ALPHA key).
extra_pairs = st.lists(st.tuples(st.sampled_from(["host", "port", "mth", "path", "qs"]),
                                 st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                                         max_size=20)),
                       max_size=3, unique_by=lambda kv: kv[0])


def saslname(name: str) -> str:
    """RFC 5801 §4: "," and "=" escaped in an authzid."""
    return name.replace("=", "=3D").replace(",", "=2C")


def kv(pairs) -> str:
    return "".join(f"{k}={v}\x01" for k, v in pairs)


@PROPERTY
@given(username, bearer_token, extra_pairs, st.sampled_from(["n", "y"]), st.booleans())
def test_oauthbearer_round_trip(user, token, extra, flag, auth_first):
    """RFC 7628 §3.1: gs2-header %x01 key=value pairs (auth=Bearer among any others)
    %x01 decodes to the authzid as the user name and exactly the token."""
    pairs = [("auth", f"Bearer {token}")] + extra if auth_first \
        else extra + [("auth", f"Bearer {token}")]
    message = f"{flag},a={saslname(user)},\x01{kv(pairs)}\x01".encode("utf-8")
    creds = sasl.oauthbearer(sasl.decode_response(base64.b64encode(message).decode()))
    assert (creds.username, creds.token, creds.password) == (user, token, "")
    assert creds.secret == token
    assert repr(creds) == f"Credentials(username={user!r}, password=***)"


@PROPERTY
@given(username, bearer_token)
def test_xoauth2_round_trip(user, token):
    """XOAUTH2: user=NAME %x01 auth=Bearer TOKEN %x01 %x01 decodes to exactly those."""
    message = f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8")
    creds = sasl.xoauth2(sasl.decode_response(base64.b64encode(message).decode()))
    assert (creds.username, creds.token, creds.password) == (user, token, "")
    assert creds.secret == token
    assert repr(creds) == f"Credentials(username={user!r}, password=***)"


# Pieces of token messages, so that near-misses are common among the arbitrary bytes.
token_piece = st.sampled_from([b"n,", b"y,", b"p=tls-unique,", b"a=", b"alice", b"=2C", b"=3D",
                               b"=", b",", b"\x01", b"\x01\x01", b"auth=", b"Bearer ",
                               b"bearer ", b"user=", b"host=x", b"tok/en+==", b" ", b"\x00",
                               b"\xe2\x80\xae", b"\xff", b"\n"])
token_bytes = st.one_of(st.binary(max_size=200), st.lists(token_piece, max_size=16).map(b"".join))


@PROPERTY
@given(token_bytes)
def test_token_decoders_never_raise_anything_else(message):
    """docs/auth-program.md "OAuth 2 tokens": arbitrary octets give credentials or 501 5.5.2, never
    another exception; what they give is a safe name and a b64token."""
    for decode in (sasl.oauthbearer, sasl.xoauth2):
        try:
            creds = decode(message)
        except SmtpError as e:
            assert e.reply == replies.BAD_CREDENTIALS_SYNTAX
            continue
        assert creds.username and not syntax.has_unsafe_char(creds.username)
        assert re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", creds.token), creds.token
        assert creds.password == ""


@PROPERTY
@given(username, username, st.characters(whitelist_categories=UNSAFE), bearer_token)
def test_token_unsafe_name_is_refused(head, tail, bad, token):
    """docs/limits.md "Envelope values that could harm a program": an authzid or user= with a control, format or separator
    character (bidi controls among them) → 501 5.5.2."""
    for name in (head + bad + tail, bad + tail, head + bad):
        for message in (f"n,a={saslname(name)},\x01auth=Bearer {token}\x01\x01",
                        f"user={name}\x01auth=Bearer {token}\x01\x01"):
            decode = sasl.oauthbearer if message.startswith("n,") else sasl.xoauth2
            with pytest.raises(SmtpError) as e:
                decode(message.encode("utf-8", "surrogatepass"))
            assert e.value.reply == replies.BAD_CREDENTIALS_SYNTAX


@PROPERTY
@given(username, bearer_token, st.text("abc-", min_size=1, max_size=12))
def test_oauthbearer_channel_binding_is_refused(user, token, cb_name):
    """RFC 7628 §3.1 / RFC 5801 §4: a `p=` (channel binding) GS2 header → 501 5.5.2."""
    message = f"p={cb_name},a={saslname(user)},\x01auth=Bearer {token}\x01\x01"
    with pytest.raises(SmtpError) as e:
        sasl.oauthbearer(message.encode("utf-8"))
    assert e.value.reply == replies.BAD_CREDENTIALS_SYNTAX


def test_token_error_challenge_is_rfc_7628_json():
    """RFC 7628 §3.2.2: the error challenge is base64 of a JSON object with the status."""
    status = json.loads(base64.b64decode(sasl.token_error_challenge(), validate=True))
    assert status == {"status": "invalid_token", "schemes": "bearer"}


# --- envelope paths and log fields: the fast paths agree with the character walk

def _walk(text):
    """Reference: (index, char) outside quotes and escapes, one step per character."""
    return list(syntax._unquoted_chars(text))


path_text = st.text(alphabet=st.sampled_from('ab@.<> "\\-\x7f\x00\u00e9\u2028'), max_size=40)


@PROPERTY
@given(path_text)
def test_address_split_agrees_with_the_walk(text):
    at = max((i for i, c in _walk(text) if c == "@"), default=-1)
    expected = (text, "") if at < 0 else (text[:at], text[at + 1:])
    assert syntax.split_address(text) == expected


@PROPERTY
@given(path_text)
def test_closing_bracket_and_unquoted_agree_with_the_walk(text):
    walk = _walk(text)
    assert syntax._closing_bracket(text) == next(
        (i for i, c in walk if c == ">" and i > 0), -1)
    assert syntax._unquoted(text, " <") == any(c in " <" for _, c in walk)


def _outcome(parse, arg, keyword, need_domain):
    try:
        return parse(arg, keyword, replies.BAD_RECIPIENT, need_domain)
    except SmtpError as e:
        return e.reply


_path_piece = st.one_of(
    st.text(alphabet=st.sampled_from('ab9_+=@.<>-" \\:\u00e9\x00'), max_size=12),
    st.text(alphabet=st.sampled_from("ab9_+=.-"), max_size=6),  # mostly what the fast path takes
    st.sampled_from(["a" * 126, "a" * 127]))  # a path of 256 octets, and of 257


@PROPERTY
@given(st.sampled_from(["TO:", "to:", "To: ", "FROM:", "TO", ""]),
       st.one_of(_path_piece.map(lambda t: t * 3),
                 st.tuples(_path_piece, _path_piece).map(lambda p: f"<{p[0]}@{p[1]}>")),
       st.sampled_from(["", ">", " SIZE=10", " BODY=8BITMIME x", "  ", "x" * 250]),
       st.booleans())
def test_simple_path_agrees_with_the_general_parser(head, path, tail, need_domain):
    arg = head + path + tail
    for keyword in ("TO", "FROM"):
        assert _outcome(syntax.parse_path, arg, keyword, need_domain) == \
            _outcome(syntax._parse_path, arg, keyword, need_domain)


@PROPERTY
@given(st.text(max_size=300))
def test_unsafe_char_means_control_format_or_separator(text):
    import unicodedata
    assert syntax.has_unsafe_char(text) == any(
        unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


@PROPERTY
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)), st.integers(-3, 3))
def test_quote_fast_path_agrees_with_the_walk(value, near):
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
    limit = max(1, len(text) + near)  # the cut is where the two paths could part
    assert log.quote(value, limit) == log._quote_walk(text, limit)
