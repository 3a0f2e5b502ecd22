#!/usr/bin/env python3
"""Example process program for ssmtpd: delivers each message into a Maildir per user.

    deliver-maildir ROOT USERNAME

ssmtpd appends USERNAME (the authenticated user) to the configured command, so
`process = conf/deliver-maildir var/mail` delivers alice's mail to
var/mail/alice/new/.  The message is stored byte for byte as ssmtpd hands it
over (Received: header first, CRLF line ends).

Delivery follows the Maildir protocol (https://cr.yp.to/proto/maildir.html):
write into tmp/ under a unique name, fsync, rename into new/, fsync new/.
Only then does it exit 0, which ssmtpd turns into the client's 250 (docs/process-program.md "The process program").

Exit status (sysexits, as docs/process-program.md "The process program" reads them):
  0   delivered; the last stdout line "delivered as NAME" becomes the 250 text
  64  EX_USAGE: wrong arguments                          -> 554
  67  EX_NOUSER: empty or unsafe user name               -> 554
  75  EX_TEMPFAIL: any I/O error (disk full, permissions) -> 451, client retries
"""

import os
import socket
import sys
import time

EX_USAGE = 64
EX_NOUSER = 67
EX_TEMPFAIL = 75
CHUNK = 1 << 16


def safe_user(name: str) -> bool:
    # The name becomes a path component: no separators, no "..", no hidden
    # directories, nothing a terminal or a log line would misrender.
    return (bool(name) and "/" not in name and not name.startswith(".")
            and all(c.isprintable() for c in name))


def unique_name() -> str:
    """`sec.MusecPpidRrandom.host`, the Maildir spec's modern form.

    The random part keeps names distinct even when a pid is reused within the
    same microsecond (containers, fast forks).
    """
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    # The spec escapes the two characters that would break the name.
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return f"{sec}.M{usec}P{os.getpid()}R{os.urandom(8).hex()}.{host}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(maildir: str, source) -> str:
    """Copy `source` into maildir/new; returns the file name.  Raises OSError."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    name = unique_name()
    tmp = os.path.join(maildir, "tmp", name)
    try:
        # "x": a name clash must fail, never overwrite another delivery.
        with open(tmp, "xb") as out:
            os.fchmod(out.fileno(), 0o600)
            while True:
                # Messages can be 25 MiB: stream, never hold one in memory.
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, os.path.join(maildir, "new", name))
    except BaseException:
        # A half-written file in tmp/ is garbage; readers never look there,
        # but it would fill the disk over many failures.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.join(maildir, "new"))
    return name


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) != 3:
        print("usage: deliver-maildir ROOT USERNAME", file=sys.stderr)
        return EX_USAGE
    root, user = argv[1], argv[2]
    if not safe_user(user):
        # On stdout for the client's reply; the name itself is not echoed.
        print("no mailbox for this user")
        print(f"deliver-maildir: refusing user name {user!r}", file=sys.stderr)
        return EX_NOUSER
    try:
        name = deliver(os.path.join(root, user), sys.stdin.buffer)
    except OSError as e:
        print(f"deliver-maildir: {os.path.join(root, user)}: {e}", file=sys.stderr)
        print("mailbox temporarily unavailable")
        return EX_TEMPFAIL
    print(f"delivered as {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
