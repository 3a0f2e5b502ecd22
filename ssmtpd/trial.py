"""--try-auth and --try-process: one run of a configured program, by hand
(docs/auth-program.md "The auth program", docs/process-program.md "The process program").

The program runs as a session would run it: the same Programs (environment,
argv, timeouts, exit-code tables), after the same switch to --user.  What
only a client could say (its address, HELO, TLS version, envelope) is a
placeholder, printed with the result.  What the client would have been told
is printed last, as the `reply:` line; the exit status says whether it was
235 / 250 (0) or not (1).
"""

import os
import pwd
import secrets
import shlex
import time
from typing import BinaryIO, Callable, List, Optional, TextIO, Tuple

from ssmtpd import programs, replies, sasl, spool
from ssmtpd.delivery import Envelope, Programs, received_header
from ssmtpd.programs import Outcome
from ssmtpd.replies import Reply, SmtpError

EXIT_TOLD_YES = 0
EXIT_TOLD_NO = 1

# RFC 5737 TEST-NET-1 and RFC 2606 .invalid: never a real client's.
CLIENT_ADDR = "192.0.2.1"
HELO = "client.invalid"
TLS_VERSION = "TLSv1.3"

CHUNK = 65536


def read_secret(stdin: BinaryIO, prompt: Callable[[], str]) -> bytes:
    """The first line of a stdin that is no terminal, without its line end;
    else what `prompt` (getpass: no echo) returns."""
    if not os.isatty(stdin.fileno()):
        line = stdin.readline()
        if line.endswith(b"\n"):
            line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line
    return prompt().encode("utf-8", "surrogateescape")


def try_auth(programs_: Programs, username: str, mechanism: str, secret: bytes,
             out: TextIO) -> int:
    """Run the auth program for one login, print what happened; the exit status."""
    out.write(f"login: {username!r}, mechanism {mechanism}\n")
    _placeholders(out, client_addr=CLIENT_ADDR)
    try:
        # The checks of the session's decoding: a name it would refuse never
        # reaches the program there either.
        creds = sasl.login(os.fsencode(username), secret)
    except SmtpError as e:
        return _told(out, e.reply, None, [])
    stderr: List[str] = []
    reply, outcome = programs_.authenticate(creds, mechanism, CLIENT_ADDR, stderr.append)
    _program(out, programs_.auth)
    return _told(out, reply, outcome, stderr)


def try_process(programs_: Programs, username: str, message: BinaryIO, out: TextIO, *,
                hostname: str, max_message_size: int, spool_dir: Optional[str],
                with_received: bool) -> int:
    """Pipe one message (LF line ends taken as CRLF) to the process program as a
    session would after the final dot; print what happened; the exit status."""
    # "" is the user of a session without AUTH (--no-require-auth).
    sender = username if "@" in username else f"{username or 'sender'}@{hostname}"
    envelope = Envelope(CLIENT_ADDR, HELO, True, TLS_VERSION, username or None, sender,
                        [f"postmaster@{hostname}"])
    out.write(f"message of: {username!r}\n")
    _placeholders(out, client_addr=CLIENT_ADDR, helo=HELO, tls=TLS_VERSION,
                  mail_from=envelope.mail_from, rcpt_to=envelope.rcpt_to[0])
    message_spool = spool.Spool(spool_dir)
    try:
        if with_received:
            message_spool.write(received_header(envelope, hostname, secrets.token_hex(6),
                                                time.time()))
        size, bare = copy_as_crlf(message, message_spool, max_message_size)
        out.write(f"size: {size} octets\n")
        # The session's order: a bare CR first, then the size (dotreader.py).
        if bare:
            return _told(out, replies.BARE_LINE_ENDING, None, [], "a bare CR")
        if size > max_message_size:
            return _told(out, replies.TOO_BIG, None, [], "over --max-message-size")
        try:
            stdin = message_spool.reader()
        except OSError as e:
            return _told(out, replies.SPOOL_FAILED, None, [],
                         f"cannot spool it: {e.strerror or e}")
        stderr: List[str] = []
        reply, outcome = programs_.deliver(envelope, stdin, stderr.append)
        _program(out, programs_.process + (username,))
        return _told(out, reply, outcome, stderr)
    finally:
        message_spool.close()


def copy_as_crlf(source: BinaryIO, sink, limit: int) -> Tuple[int, bool]:
    """Copy `source` to `sink` with LF and CRLF line ends as CRLF, and a CRLF
    after a last line that has none (a client sends one before its final
    dot); (octets, whether a bare CR was seen).  Past `limit` octets, or
    after a bare CR, nothing more is written but all is counted, as a session
    reads a whole DATA phase before it answers (dotreader.py)."""
    size = 0
    bare = False
    ends_with_lf = True
    held = b""  # a CR at the end of a chunk: its LF may begin the next one
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            break
        data = held + chunk
        held = b""
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        if not data:
            continue
        if data.count(b"\r") != data.count(b"\r\n"):
            bare = True
        converted = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        size += len(converted)
        ends_with_lf = converted.endswith(b"\n")
        if not bare and size <= limit:
            sink.write(converted)
    if held:
        return size + 1, True  # the message ends in a bare CR
    if not ends_with_lf:
        size += 2
        if not bare and size <= limit:
            sink.write(b"\r\n")
    return size, bare


def _placeholders(out: TextIO, **values: str) -> None:
    shown = ", ".join(f"{name}={value}" for name, value in values.items())
    out.write(f"placeholders: {shown}\n")


def _program(out: TextIO, argv) -> None:
    out.write(f"program: {shlex.join(argv)}\n")
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "?"
    out.write(f"user: {user} (uid {uid}, gid {gid})\n")


def _told(out: TextIO, reply: Reply, outcome: Optional[Outcome], stderr: List[str],
          why_not_run: str = "") -> int:
    if outcome is None:
        out.write(f"result: not run{': ' + why_not_run if why_not_run else ''}\n")
    else:
        out.write(f"result: {outcome.describe()}\n")
        if outcome.status != programs.NO_SLOT:
            out.write(f"time: {outcome.seconds:.3f}s\n")
        for line in stderr:
            out.write(f"stderr: {line}\n")
    for line in reply.encode().decode("ascii", "replace").splitlines():
        out.write(f"reply: {line}\n")
    return EXIT_TOLD_YES if reply.code in (235, 250) else EXIT_TOLD_NO
