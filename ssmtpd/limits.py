"""Accounting across connections: who holds how many slots, who failed to log in.

A defence that lives inside one connection is one reconnect away from useless
(docs/limits.md "Limits and abuse"), so these counts are kept per client address for
the whole server.  An IPv6 client is counted by its prefix: one /64 is usually
one customer, who holds as many addresses as they like inside it.  A stolen
password is used from anywhere, so what an account sends is counted by its
username too (docs/limits.md "Accounts and limits"), in the same kind of window.

Everything here is plain bookkeeping with an injectable clock, no I/O.
"""

import collections
import hashlib
import ipaddress
import socket
import sys
import time
from typing import Callable, Deque, Dict, Optional, Tuple

# Refusal reasons of ConnectionCount.admit (also the metrics' labels).
TOO_MANY = "max-connections"
TOO_MANY_FROM_ADDRESS = "max-connections-per-ip"
TOO_FAST_FROM_ADDRESS = "max-connection-rate-per-ip"
# With --workers: the master, which keeps the counts, did not answer in time.
UNANSWERED = "master-unanswered"

# The per-user limits (docs/limits.md "Accounts and limits"): what a refusal names,
# and the metrics' `limit` label.
MESSAGES = "messages"
RECIPIENTS = "recipients"
SESSIONS = "sessions"

# Postfix enters its stress mode when the process limit is nearly reached;
# we do when more than this share of --max-connections is in use.
PRESSURE_SHARE = 0.75

# Bounds the failed-login table against an attacker with many addresses: past
# this many addresses the one with the oldest failure is forgotten first.
MAX_TRACKED_ADDRESSES = 100_000
# A --state that fails is told at most this often, for the whole server.
STATE_FAILURE_EVERY = 60.0


def address_key(ip: str, ipv6_prefix_length: int) -> str:
    """What per-address limits count by: IPv4 whole, IPv6 by its prefix."""
    if "." in ip and ":" not in ip:
        # The usual case, once per connection: inet_pton takes dotted quads
        # only and inet_ntop gives ipaddress's own spelling of them.
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip))
        except (OSError, ValueError):  # not a dotted quad (ValueError: NUL, surrogates)
            pass
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip  # not an IP address (a UNIX socket, say): count it as it is
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    network = ipaddress.IPv6Network((address, ipv6_prefix_length), strict=False)
    return str(network)


def user_key(user: str) -> str:
    """What a user is counted under: the same name, the same key, in every
    process (a worker sends it to its master; docs/limits.md "Accounts and limits")."""
    return hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class UserKey(str):
    """A user already as its user_key(), as a worker's channel carries it."""


def _keyed(user: str) -> UserKey:
    return user if isinstance(user, UserKey) else UserKey(user_key(user))


def is_loopback_key(key: str) -> bool:
    """The key of a client on this machine (127.0.0.0/8, ::1), which no rate
    limits: local tools and a proxy's health checks on the same host (as
    Postfix's smtpd_client_event_limit_exceptions holds $mynetworks)."""
    return key.startswith("127.") or key.startswith("::/") or key == "::1"


class ConnectionCount:
    """Open sessions, in all and per address key."""

    def __init__(self, max_total: int, max_per_key: int):
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self.per_key: Dict[str, int] = collections.Counter()

    def admit(self, key: str) -> Optional[str]:
        """Take a slot for `key`, or return why not (TOO_MANY, TOO_MANY_FROM_ADDRESS)."""
        if self.total >= self.max_total:
            return TOO_MANY
        if self.per_key[key] >= self.max_per_key:
            return TOO_MANY_FROM_ADDRESS
        self.total += 1
        self.per_key[key] += 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        self.per_key[key] -= 1
        if not self.per_key[key]:
            del self.per_key[key]

    def hold(self, key: str, count: int) -> None:
        """`count` slots of `key` taken elsewhere, whatever the limits."""
        self.total += count
        self.per_key[key] += count

    def of(self, key: str) -> int:
        return self.per_key.get(key, 0)

    @property
    def under_pressure(self) -> bool:
        return self.total > PRESSURE_SHARE * self.max_total


class Window:
    """Events per key over a sliding window: failed AUTHs or connections per
    address key.  A key is blocked while it has `limit` events inside the
    last `window` seconds.

    Only the newest `limit` event times of a key are kept: that is all that
    decides whether the key is blocked, so one address cannot grow the table
    by doing more.
    """

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_TRACKED_ADDRESSES):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        # Ordered by each key's newest event, oldest first, so expired keys
        # are found at the front without a scan.
        self._events: "collections.OrderedDict[str, Deque[float]]" = collections.OrderedDict()

    def record(self, key: str) -> None:
        self._record_at(key, self._clock())

    def _record_at(self, key: str, now: float) -> None:
        self._forget_expired(now)
        times = self._events.pop(key, None)
        if times is None:
            times = collections.deque(maxlen=self.limit)
            while len(self._events) >= self.max_keys:
                self._events.popitem(last=False)
        times.append(now)
        self._events[key] = times

    def blocked(self, key: str) -> bool:
        """True while `key` has `limit` events inside the window."""
        return not self.room(key)

    def blocked_for(self, key: str) -> float:
        """Seconds until `key` is no longer blocked; 0 when it is not (to
        rounding: blocked() is the exact test)."""
        oldest = self._oldest_counted(key)
        return 0.0 if oldest is None else max(0.0, oldest + self.window - self._clock())

    def block_times(self):
        """(key, blocked_for(key)) of every key with events on record."""
        for key in list(self._events):
            yield key, self.blocked_for(key)

    def _oldest_counted(self, key: str) -> Optional[float]:
        """The oldest of the newest `limit` events of `key`; None if fewer."""
        times = self._events.get(key)
        if times is None or len(times) < self.limit:
            return None
        return times[0]

    def room(self, key: str, wanted: int = 1) -> bool:
        """Whether `wanted` more events of `key` fit inside the window."""
        if wanted > self.limit:
            return False
        times = self._events.get(key)
        if times is None or len(times) + wanted <= self.limit:
            return True
        # The deque holds the newest `limit` times: the ones `wanted` new
        # events would leave counted must all be older than the window.
        return times[len(times) + wanted - self.limit - 1] <= self._clock() - self.window

    def take(self, key: str, count: int, stamp: float) -> None:
        """Record `count` events at `stamp` (a time of this window's clock)."""
        for _ in range(count):
            self._record_at(key, stamp)

    def give_back(self, key: str, count: int, stamp: float) -> None:
        """Forget `count` events recorded at `stamp`: what was taken for a
        message that was not accepted after all."""
        times = self._events.get(key)
        for _ in range(count):
            if times is None or stamp not in times:
                break
            times.remove(stamp)
        if times is not None and not times:
            del self._events[key]

    def resized(self, limit: int, window: float) -> "Window":
        """A window of another limit and span that starts with this one's
        events (the newest `limit` of each key): a reload keeps the counts."""
        other = Window(limit, window, self._clock, self.max_keys)
        for key, times in self._events.items():
            other._events[key] = collections.deque(times, maxlen=limit)
        return other

    def count(self, key: str) -> int:
        """Events of `key` inside the window (for logs and tests)."""
        horizon = self._clock() - self.window
        return sum(1 for t in self._events.get(key, ()) if t > horizon)

    def _forget_expired(self, now: float) -> None:
        horizon = now - self.window
        while self._events:
            key, times = next(iter(self._events.items()))
            if times[-1] > horizon:
                return
            del self._events[key]

    def __len__(self) -> int:
        return len(self._events)

    def events(self):
        """[(key, [times])], oldest key first: what an upgrade carries over."""
        return [(key, list(times)) for key, times in self._events.items()]

    @classmethod
    def of_events(cls, limit: int, window: float, events) -> "Window":
        """A window holding `events` (as events() gives them)."""
        made = cls(limit, window)
        for key, times in events:
            made._events[key] = collections.deque(times, maxlen=limit)
        return made


class Limits:
    """The server-wide counts one process's sessions consult.

    With --workers, each worker holds a ledger.RemoteLimits with the same
    methods instead, and the master keeps the one Limits (docs/scaling.md "Scaling").
    """

    def __init__(self, settings):
        self.ipv6_prefix_length = settings.ipv6_prefix_length
        self.connections = ConnectionCount(settings.max_connections,
                                           settings.max_connections_per_ip)
        self.logins = Window(settings.max_auth_failures_per_ip, settings.auth_failure_window)
        self.connection_rates = [Window(count, seconds)
                                 for count, seconds in settings.max_connection_rate_per_ip]
        self.sending = {
            MESSAGES: [Window(count, seconds)
                       for count, seconds in settings.max_messages_per_user],
            RECIPIENTS: [Window(count, seconds)
                         for count, seconds in settings.max_recipients_per_user]}
        # Only the per-key count matters for users: the total is --max-connections'.
        # Counted even when off, so that a reload that turns it on counts the
        # sessions already open.
        self.user_sessions = ConnectionCount(sys.maxsize,
                                             settings.max_sessions_per_user or sys.maxsize)
        self._clock = time.monotonic
        self._state_failure_told = -STATE_FAILURE_EVERY

    def reconfigure(self, settings) -> None:
        """New limits from a reload; what was counted stays counted."""
        self.ipv6_prefix_length = settings.ipv6_prefix_length
        self.connections.max_total = settings.max_connections
        self.connections.max_per_key = settings.max_connections_per_ip
        self.logins = self.logins.resized(settings.max_auth_failures_per_ip,
                                          settings.auth_failure_window)
        self.connection_rates = _resized(self.connection_rates,
                                         settings.max_connection_rate_per_ip)
        self.sending = {MESSAGES: _resized(self.sending[MESSAGES],
                                           settings.max_messages_per_user),
                        RECIPIENTS: _resized(self.sending[RECIPIENTS],
                                             settings.max_recipients_per_user)}
        self.user_sessions.max_per_key = settings.max_sessions_per_user or sys.maxsize

    def snapshot(self) -> dict:
        """Every count, as plain data: an upgrade hands it to the code it
        goes on with (upgrade.py).  Times are time.monotonic(), which the
        machine keeps across exec."""
        def fullest(windows):
            if not windows:
                return None
            window = max(windows, key=lambda w: w.limit)
            return [window.limit, window.events()]
        return {"connections": dict(self.connections.per_key),
                "user_sessions": dict(self.user_sessions.per_key),
                "logins": fullest([self.logins]),
                "connection_rates": fullest(self.connection_rates),
                MESSAGES: fullest(self.sending[MESSAGES]),
                RECIPIENTS: fullest(self.sending[RECIPIENTS])}

    def restore(self, snapshot: dict) -> None:
        """Take over the counts of snapshot() (of another process), fitted
        to this one's limits as a reload fits them."""
        def fitted(windows, held, rates):
            if held is None:
                return windows
            return _resized([Window.of_events(held[0], 1.0, held[1])], rates)
        for key, count in snapshot["connections"].items():
            self.connections.hold(key, count)
        for key, count in snapshot["user_sessions"].items():
            self.user_sessions.hold(key, count)
        self.logins = fitted([self.logins], snapshot["logins"],
                             [(self.logins.limit, self.logins.window)])[0]
        self.connection_rates = fitted(self.connection_rates, snapshot["connection_rates"],
                                       [(w.limit, w.window) for w in self.connection_rates])
        for limit in (MESSAGES, RECIPIENTS):
            windows = self.sending[limit]
            self.sending[limit] = fitted(windows, snapshot[limit],
                                         [(w.limit, w.window) for w in windows])

    def key(self, ip: str) -> str:
        return address_key(ip, self.ipv6_prefix_length)

    def admit(self, key: str) -> Optional[str]:
        rated = not is_loopback_key(key)
        if rated and any(rate.blocked(key) for rate in self.connection_rates):
            return TOO_FAST_FROM_ADDRESS
        reason = self.connections.admit(key)
        if reason is None and rated:
            for rate in self.connection_rates:
                rate.record(key)
        return reason

    def release(self, key: str) -> None:
        self.connections.release(key)

    @property
    def under_pressure(self) -> bool:
        return self.connections.under_pressure

    def login_blocked(self, key: str) -> bool:
        return self.logins.blocked(key)

    def block_times(self):
        """(key, seconds it is blocked from AUTH for, 0 if not) of every key with failures."""
        return self.logins.block_times()

    def login_failed(self, key: str) -> float:
        """Record a failure; seconds `key` is now blocked for (0: not blocked)."""
        self.logins.record(key)
        return self.logins.blocked_for(key)

    # --- per user (docs/limits.md "Accounts and limits") ----------------------------

    def sending_refused(self, user: str, messages: int, recipients: int) -> Optional[str]:
        """Which limit (MESSAGES, RECIPIENTS) leaves `user` no room for this
        many more; None when all do."""
        user = _keyed(user)
        for limit, wanted in ((MESSAGES, messages), (RECIPIENTS, recipients)):
            if wanted and not all(w.room(user, wanted) for w in self.sending[limit]):
                return limit
        return None

    def take_message(self, user: str, recipients: int) -> Tuple[Optional[str], str]:
        """Check and take one message with `recipients` in one step, so that
        concurrent sessions can never together pass a limit: (the limit
        without room, "") or (None, a ticket for give_back_message)."""
        user = _keyed(user)
        refused = self.sending_refused(user, 1, recipients)
        if refused is not None:
            return refused, ""
        stamp = self._clock()
        for limit, count in ((MESSAGES, 1), (RECIPIENTS, recipients)):
            for window in self.sending[limit]:
                window.take(user, count, stamp)
        return None, f"{recipients} {stamp!r}"

    def give_back_message(self, user: str, ticket: str) -> None:
        """A message taken was not accepted: it counts for nothing."""
        user = _keyed(user)
        recipients, _, stamp = ticket.partition(" ")
        try:
            count, when = int(recipients), float(stamp)
        except ValueError:
            return
        for limit, taken in ((MESSAGES, 1), (RECIPIENTS, count)):
            for window in self.sending[limit]:
                window.give_back(user, taken, when)

    def user_session_opened(self, user: str) -> bool:
        """Take a session slot of `user`; False when it has none left."""
        return self.user_sessions.admit(_keyed(user)) is None

    def user_session_closed(self, user: str) -> None:
        self.user_sessions.release(_keyed(user))

    def state_failure_to_tell(self) -> bool:
        """Whether a failing --state is to be logged now: it is once a minute
        at most, for the whole server (docs/limits.md "Accounts and limits")."""
        now = self._clock()
        if now - self._state_failure_told < STATE_FAILURE_EVERY:
            return False
        self._state_failure_told = now
        return True


def _resized(windows, rates):
    """Windows for `rates` ((count, seconds), ...), each starting from the
    window now counting that holds the most events: every window records
    every event, and each keeps only its newest COUNT, so that one has the
    longest history (a reload must not let a user send again what an hour's
    limit had refused)."""
    if not windows:
        return [Window(count, seconds) for count, seconds in rates]
    fullest = max(windows, key=lambda window: window.limit)
    return [fullest.resized(count, seconds) for count, seconds in rates]
