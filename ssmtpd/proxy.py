"""Pure parser of HAProxy PROXY protocol headers, versions 1 and 2 (docs/scaling.md "Scaling").

A load balancer in front of us prepends one header to each connection saying
who the client really is.  `parse(data)` looks at the first bytes of a
connection and returns None while more bytes are needed, a Header once one is
complete, or raises ProxyError: no I/O, so it can be fed any bytes in tests.

The format is HAProxy's "proxy-protocol.txt": version 1 is one text line of at
most 107 octets; version 2 is a 16-octet binary header followed by an address
block and optional TLVs (which we skip).
"""

import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# The v2 length field allows 65535; HAProxy's own headers with TLVs stay far
# below this, and a bound keeps a bad proxy from making us wait for 64 KiB.
V2_MAX = V2_FIXED + 4096
# The most a reader must ever look at before parse() can decide.
MAX_HEADER = V2_MAX

_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_INET, _V2_INET6 = 0x1, 0x2
# Families UNSPEC, INET, INET6, UNIX and protocols UNSPEC, STREAM, DGRAM: the
# spec says any other value must be rejected by a receiver, LOCAL or not.
_V2_LAST_FAMILY, _V2_LAST_PROTOCOL = 0x3, 0x2
_V2_STREAM = 0x1


class ProxyError(Exception):
    """Not a valid PROXY header; str() says why (for the log)."""


@dataclass(frozen=True)
class Header:
    """A complete header: `length` octets long.

    `client` is the real client's (address, port), or None when the header says
    the connection is the proxy's own (v2 LOCAL, v1 UNKNOWN, an address family
    we do not serve): then the connection's own address stands.
    """

    length: int
    version: int
    client: Optional[Tuple[str, int]]


def parse(data: bytes) -> Optional[Header]:
    """The header at the start of `data`, None if incomplete; ProxyError if invalid."""
    for prefix, parse_version in ((V2_SIGNATURE, _parse_v2), (V1_PREFIX, _parse_v1)):
        if data[:len(prefix)] == prefix[:len(data)]:
            return None if len(data) < len(prefix) else parse_version(data)
    raise ProxyError("no PROXY header")


def _parse_v1(data: bytes) -> Optional[Header]:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError("v1 line without CRLF within 107 octets")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return Header(end + 2, 1, None)  # anything may follow UNKNOWN
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("v1 line is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    family = 4 if parts[1] == "TCP4" else 6
    source = _v1_address(parts[2], family)
    _v1_address(parts[3], family)
    source_port = _v1_port(parts[4])
    _v1_port(parts[5])
    return Header(end + 2, 1, (source, source_port))


def _v1_address(text: str, family: int) -> str:
    # ipaddress takes an IPv6 scope id ("fe80::1%eth0"), and the scope may be
    # any octets but a space: LF, TAB, NUL, "%".  A client address never has
    # one (Postfix and Go's net.ParseIP refuse it too), and it would reach
    # logs, the Received header and the programs' environment.
    if "%" in text:
        raise ProxyError(f"v1 address is not an IPv{family} address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"v1 address is not an IPv{family} address") from None
    if address.version != family:
        raise ProxyError(f"v1 address is not an IPv{family} address")
    return _plain(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 \
            or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyError("v1 port is not 0-65535")
    return int(text)


def _parse_v2(data: bytes) -> Optional[Header]:
    if len(data) < V2_FIXED:
        return None
    version_command, family_protocol, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2:
        raise ProxyError("v2 version is not 2")
    command = _V2_COMMANDS.get(version_command & 0xF)
    if command is None:
        raise ProxyError("v2 command is neither LOCAL nor PROXY")
    total = V2_FIXED + length
    if total > V2_MAX:
        raise ProxyError(f"v2 header of {total} octets is over {V2_MAX}")
    if len(data) < total:
        return None
    block = data[V2_FIXED:total]
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > _V2_LAST_FAMILY or protocol > _V2_LAST_PROTOCOL:
        raise ProxyError(f"v2 address family or protocol 0x{family_protocol:02x} is undefined")
    if command == "LOCAL":
        return Header(total, 2, None)  # the proxy's own connection: health checks
    if family == _V2_INET:
        size, unpack = 12, "!4s4sHH"
    elif family == _V2_INET6:
        size, unpack = 36, "!16s16sHH"
    else:
        # UNSPEC, UNIX: the spec says to use the connection's own addresses.
        return Header(total, 2, None)
    if protocol != _V2_STREAM:
        raise ProxyError("v2 transport is not STREAM (TCP)")
    if len(block) < size:
        raise ProxyError("v2 address block is too short for its family")
    source, _, source_port, _ = struct.unpack(unpack, block[:size])
    return Header(total, 2, (_plain(ipaddress.ip_address(source)), source_port))


def _plain(address) -> str:
    # A dual-stack proxy may give an IPv4 client as ::ffff:a.b.c.d; the client
    # is the IPv4 address, in logs and SSMTPD_CLIENT_ADDR alike.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(address)
