"""The DATA phase as its own small machine (RFC 5321 §4.1.1.4, §4.5.2).

Data ends only at <CR><LF>.<CR><LF>; any other dot line (LF.LF, CR.CR,
LF.CRLF, CRLF.LF, ...) is content.  A bare CR or LF anywhere makes the
message refused after the real end, never "repaired": normalising is exactly
how a lone "." line gets forged (SMTP smuggling, CVE-2023-51764 and kin).

The work is done per chunk with bytes.find/count/replace, never per line in
Python.  A chunk is cut after its last LF, so a CRLF pair and a terminator are
never split across two scans.
"""

from dataclasses import dataclass
from typing import Callable, Optional

from ssmtpd.stream import ClientStream

# Without a LF for this long, scan what we have anyway so a client cannot make
# us buffer an endless line; one byte is held back in case it is the CR of a CRLF.
MAX_PENDING = 256 * 1024

TERMINATOR = b"\r\n.\r\n"

# Outcomes of read_message
OK = "ok"
TOO_BIG = "too-big"
BARE_LINE_ENDING = "bare-line-ending"


@dataclass
class DataResult:
    status: str
    size: int  # octets of the unstuffed message (counted even past the limit)


def read_message(stream: ClientStream, limit: int, spool,
                 read: Optional[Callable[[], bytes]] = None) -> DataResult:
    """Read up to the terminator, write the unstuffed message to `spool`.

    Always consumes the whole DATA phase before returning, whatever goes wrong,
    so the next command is read from the right place.  Bytes after the
    terminator go back to the stream (PIPELINING).  Raises ClientGone if the
    client vanishes first; the caller then must not deliver.  `read` takes the
    place of stream.recv_some, so the caller can bound each wait.
    """
    read = read or stream.recv_some
    size = 0
    bare = False
    after_crlf = True  # the DATA command line ended the previous line
    pending = b""
    while True:
        data = read()
        if pending:
            start = len(pending)
            pending = pending if isinstance(pending, bytearray) else bytearray(pending)
            pending += data  # amortised: a long line arriving in drips stays linear
        else:
            start, pending = 0, data
        newline = data.rfind(b"\n")
        if newline >= 0:
            cut = start + newline + 1
        elif len(pending) < MAX_PENDING:
            continue
        else:
            cut = len(pending) - 1
        region, pending = bytes(pending[:cut]), pending[cut:]

        # A terminator either starts this region (the CRLF ended the previous
        # one) or lies inside it.
        if after_crlf and region.startswith(b".\r\n"):
            end, resume = 0, 3
        else:
            end = region.find(TERMINATOR)
            resume = end + len(TERMINATOR)
            if end >= 0:
                end += 2  # keep the CRLF that ends the last line
        if end >= 0:
            stream.unread(region[resume:] + pending)
            region = region[:end]

        crlf = region.count(b"\r\n")
        if region.count(b"\r") != crlf or region.count(b"\n") != crlf:
            bare = True
        # Dot-unstuffing: a line starting with "." loses that dot (§4.5.2).
        body = region.replace(b"\r\n.", b"\r\n")
        if after_crlf and body[:1] == b".":
            body = body[1:]
        size += len(body)
        if not bare and size <= limit:
            spool.write(body)
        if end >= 0:
            break
        after_crlf = region.endswith(b"\r\n")

    if bare:
        return DataResult(BARE_LINE_ENDING, size)
    if size > limit:
        return DataResult(TOO_BIG, size)
    return DataResult(OK, size)
