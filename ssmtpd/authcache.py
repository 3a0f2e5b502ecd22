"""The auth program's recent answers, reused for a while (docs/auth-program.md "The auth cache").

A login with the same mechanism, username and secret as one the auth program
answered 235 within --auth-cache-ttl seconds (535 within
--auth-cache-negative-ttl) gets that answer again without a program run.  An
expensive auth program (scrypt costs tens of milliseconds of CPU on purpose)
then runs once per password per TTL, not once per login.

Only a keyed hash of the three values is held: HMAC-SHA256 (RFC 2104) under a
key drawn at start and never written anywhere, so neither this process's
memory nor anything it could leak holds a secret, or a hash an attacker could
test guesses against without the key.  The client's address is not part of
the key: an auth program that decides by address must not be cached.

Per process, bounded: past MAX_ENTRIES the least recently used entry goes.
An entry expires TTL seconds after the program answered, however often it is
used, so a changed or revoked password stops working by then at the latest.
"""

import collections
import hmac
import secrets
import time
from typing import Callable, Optional, Tuple

from ssmtpd.programs import Outcome
from ssmtpd.replies import Reply

# About 200 octets an entry: 10,000 logins held cost ~2 MiB.
MAX_ENTRIES = 10_000
KEY_BYTES = 32

Answer = Tuple[Reply, Outcome]


class AuthCache:
    """Answers of the auth program by keyed hash of (mechanism, username, secret)."""

    def __init__(self, ttl: float, negative_ttl: float, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic):
        self._ttl = {235: ttl, 535: negative_ttl}
        self._max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(KEY_BYTES)
        # digest -> (expires, answer), least recently used first.
        self._entries: "collections.OrderedDict[bytes, Tuple[float, Answer]]" = \
            collections.OrderedDict()
        # Counts clear()s: an answer asked for before one is not kept after it
        # (a password revoked, then SIGHUP, while its program still ran).
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return any(ttl > 0 for ttl in self._ttl.values())

    @property
    def size(self) -> int:
        # Not __len__: an empty cache must not read as no cache.
        return len(self._entries)

    def key(self, mechanism: str, username: str, secret: str) -> bytes:
        """The only form in which a login is held.  Each value is length-prefixed,
        so no two different triples can be spelt alike."""
        message = bytearray()
        for value in (mechanism, username, secret):
            # surrogateescape: a secret's octets that were not UTF-8 (sasl.py).
            raw = value.encode("utf-8", "surrogateescape")
            message += len(raw).to_bytes(4, "big") + raw
        return hmac.digest(self._key, bytes(message), "sha256")

    def get(self, key: bytes) -> Optional[Answer]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answer

    def put(self, key: bytes, reply: Reply, outcome: Outcome, generation: int) -> None:
        """Keep a 235 or a 535 for its TTL; anything else (454) is never kept,
        nor an answer asked for before the last clear()."""
        ttl = self._ttl.get(reply.code, 0)
        if ttl <= 0 or generation != self.generation:
            return
        self._entries[key] = (self._clock() + ttl, (reply, outcome))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1
