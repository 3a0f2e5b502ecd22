"""Where the windowed counts live: here (limits.Limits, or the master's
ledger), or with --state in Redis, shared by every instance that names it
(docs/limits.md "Accounts and limits", docs/scaling.md "Scaling").

Only the windowed counts go to Redis: failed logins per address key, and
messages and recipients per user.  Connections and sessions stay with the
instance, as a load balancer limits connections.

redis-py's blocking client runs in gevent's pool of native threads: the
event loop never waits for Redis, and nothing in the process is
monkey-patched.  Each call gives up after --state-timeout.  While Redis
fails, the local counts answer instead (what this instance counted itself),
with one ERROR line a minute at most for the whole server; Redis is tried
again a second after each failure, and the first answer returns the counts
to it.  Local counts are not copied back.
"""

import hashlib
import secrets
import time
from typing import Dict, Optional, Tuple

import gevent

from ssmtpd import events
from ssmtpd.limits import MESSAGES, RECIPIENTS

# After Redis failed, it is left alone this long before a call tries it again.
RETRY_AFTER = 1.0
# How long the room a user's MAIL saw answers the RCPTs after it, and for how
# many users at most (past it, every room is looked up again).
ROOM_FRESH = 1.0
MAX_ROOMS = 10_000

# Each check-and-count is one script, so two instances can never both take
# the last unit.  Per user and limit, a sorted set of what was sent (members
# "token:count", scored by Redis's own clock in milliseconds, so instances
# need no common clock), and beside it a hash with each window's running sum
# and the time up to which members have left it: a call reads only the
# members that left a window since the last one, not the whole window (a
# user at 5000 recipients an hour would otherwise cost every call 5000).
# The fields carry the limit's longest span, as members past it are
# removed: a reload to other windows starts fresh sums, read once.
#
# ARGV of all three: two limits (messages, recipients), each as its wanted
# count, its number of windows, then COUNT and milliseconds of each window;
# KEYS: the two sorted sets, then the two hashes.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function count_of(member) return tonumber(string.match(member, ':(%d+)$')) end
local function limits(pos)
  local out = {}
  for i = 1, 2 do
    local wanted, nwindows = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
    pos = pos + 2
    local windows, longest = {}, 0
    for w = 1, nwindows do
      windows[w] = {tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])}
      if windows[w][2] > longest then longest = windows[w][2] end
      pos = pos + 2
    end
    out[i] = {wanted = wanted, windows = windows, longest = longest}
  end
  return out
end
local function field(kind, ms, longest) return kind .. ms .. '/' .. longest end
local function used(i, ms, longest)
  local horizon = now - ms
  local cursor = redis.call('HGET', KEYS[i + 2], field('c', ms, longest))
  local sum = 0
  if not cursor then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. horizon, '+inf')) do
      sum = sum + count_of(m)
    end
  else
    cursor = tonumber(cursor)
    sum = tonumber(redis.call('HGET', KEYS[i + 2], field('s', ms, longest)) or '0')
    if horizon > cursor then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. cursor, horizon)) do
        sum = sum - count_of(m)
      end
    else
      horizon = cursor
    end
  end
  redis.call('HSET', KEYS[i + 2], field('c', ms, longest), horizon, field('s', ms, longest), sum)
  return sum
end
"""

# Check and take: 0, or the limit (1, 2) without room.  ARGV[1] is the token.
_SENDING = _PRELUDE + """
local plan = limits(2)
for i = 1, 2 do
  if plan[i].wanted > 0 then
    for _, w in ipairs(plan[i].windows) do
      if used(i, w[2], plan[i].longest) + plan[i].wanted > w[1] then return i end
    end
  end
end
for i = 1, 2 do
  local p = plan[i]
  if p.wanted > 0 and p.longest > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - p.longest)
    redis.call('ZADD', KEYS[i], now, ARGV[1] .. ':' .. p.wanted)
    for _, w in ipairs(p.windows) do
      redis.call('HINCRBY', KEYS[i + 2], field('s', w[2], p.longest), p.wanted)
    end
    redis.call('PEXPIRE', KEYS[i], p.longest)
    redis.call('PEXPIRE', KEYS[i + 2], p.longest)
  end
end
return 0
"""

# The room left of each limit (the wanted counts ignored): the least of
# COUNT - used over its windows, -1 for a limit that is off.  ARGV[1] unused.
_ROOM = _PRELUDE + """
local plan = limits(2)
local rooms = {}
for i = 1, 2 do
  local room = -1
  for _, w in ipairs(plan[i].windows) do
    local left = math.max(w[1] - used(i, w[2], plan[i].longest), 0)
    if room < 0 or left < room then room = left end
  end
  rooms[i] = room
end
return rooms
"""

# A message given back: its members removed, and taken off each window's
# sum that still counts them.  ARGV[1] is the token; the wanted counts are
# the message's (1, its recipients).
_GIVE_BACK = _PRELUDE + """
local plan = limits(2)
for i = 1, 2 do
  local member = ARGV[1] .. ':' .. plan[i].wanted
  local score = redis.call('ZSCORE', KEYS[i], member)
  if score then
    redis.call('ZREM', KEYS[i], member)
    for _, w in ipairs(plan[i].windows) do
      local cursor = redis.call('HGET', KEYS[i + 2], field('c', w[2], plan[i].longest))
      if cursor and tonumber(score) > tonumber(cursor) then
        redis.call('HINCRBY', KEYS[i + 2], field('s', w[2], plan[i].longest), -plan[i].wanted)
      end
    end
  end
end
return 0
"""

# A failed login (ARGV[1] == '1') or only a look: the seconds the key is
# blocked for, as a string (Lua numbers are cut to integers on the way out).
_LOGINS = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local limit, ms = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ms)
if ARGV[1] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':1')
  redis.call('PEXPIRE', KEYS[1], ms)
end
local times = redis.call('ZREVRANGE', KEYS[1], limit - 1, limit - 1, 'WITHSCORES')
if #times == 0 then return '0' end
return tostring((tonumber(times[2]) + ms - now) / 1000)
"""


class StateError(Exception):
    """Redis did not answer, or not in time."""


def connect(url: str, timeout: float):
    """A redis-py client for `url`, which gives up after `timeout` and never retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), decode_responses=True)


def check(url: str, timeout: float) -> str:
    """Whether Redis at `url` answers a PING, in words (for --check-config)."""
    try:
        connect(url, timeout).ping()
    except Exception as e:  # redis-py's errors, and OSError beneath them
        return f"did not answer: {type(e).__name__}: {e}"
    return "answered"


def safe_url(url: str) -> str:
    """`url` without its password, for a log line."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:  # not a port: redis-py will say so, without our help
        pass
    # Without the query too: unix:// URLs carry the password there.
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisCounts:
    """The windowed counts in Redis: each call one script, run off the loop."""

    def __init__(self, client, prefix: str, timeout: float):
        self._client = client
        self._prefix = prefix
        self._timeout = timeout
        self._sending = client.register_script(_SENDING)
        self._room = client.register_script(_ROOM)
        self._give_back = client.register_script(_GIVE_BACK)
        self._logins = client.register_script(_LOGINS)

    def _call(self, script, keys, args):
        return self._off_loop(lambda: script(keys, args))

    def _off_loop(self, call):
        """call() in a native thread; its result, or StateError."""
        def run():
            # Caught in the thread: gevent would print an escaping error
            # with a traceback of redis-py's insides.
            try:
                return True, call()
            except Exception as e:  # redis-py's errors, and OSError beneath them
                return False, e
        # The thread's own socket timeout ends a Redis that stopped; this
        # one bounds the wait for a free thread too.
        with gevent.Timeout(self._timeout * 2 + 0.1, StateError("timed out")):
            ok, result = gevent.get_hub().threadpool.apply(run)
        if not ok:
            raise StateError(f"{type(result).__name__}: {result}")
        return result

    def _user(self, kind: str, user: str) -> str:
        digest = hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16)
        return f"{self._prefix}{kind}:{digest.hexdigest()}"

    def _keys(self, user: str) -> list:
        sets = [self._user("m", user), self._user("r", user)]
        return sets + [f"{key}:sums" for key in sets]

    @staticmethod
    def _args(rates, wanted: Tuple[int, int], token: str) -> list:
        args = [token]
        for limit, count in zip((MESSAGES, RECIPIENTS), wanted):
            windows = rates[limit]
            args += [count, len(windows)]
            for limit_count, seconds in windows:
                args += [limit_count, int(seconds * 1000)]
        return args

    def take(self, user: str, rates, recipients: int, token: str) -> Optional[str]:
        """Check and take a message with `recipients`: the limit without room, or None."""
        refused = self._call(self._sending, self._keys(user),
                             self._args(rates, (1, recipients), token))
        return {1: MESSAGES, 2: RECIPIENTS}.get(int(refused))

    def room(self, user: str, rates) -> Tuple[int, int]:
        """(messages, recipients) the user may still send now; -1 for no limit."""
        rooms = self._call(self._room, self._keys(user), self._args(rates, (0, 0), ""))
        return int(rooms[0]), int(rooms[1])

    def give_back(self, user: str, rates, token: str, recipients: int) -> None:
        self._call(self._give_back, self._keys(user), self._args(rates, (1, recipients), token))

    def logins(self, key: str, failed: bool, limit: int, window: float) -> float:
        left = self._call(self._logins, [f"{self._prefix}f:{key}"],
                          ["1" if failed else "0", limit, int(window * 1000),
                           secrets.token_hex(8)])
        return max(0.0, float(left))


class SharedLimits:
    """The methods of limits.Limits: the windowed counts in Redis, falling back
    to `local` (a Limits or a ledger.RemoteLimits) while Redis fails; the
    rest always `local`'s.

    After a failure Redis is left alone for RETRY_AFTER: a stopped Redis
    would otherwise cost every call --state-timeout, several per message.
    Then one call tries it while the others still count locally, and the
    first answer returns every call to it.
    """

    def __init__(self, local, counts: RedisCounts, settings, log, metrics):
        self._local = local
        self._counts = counts
        self._rates = {MESSAGES: settings.max_messages_per_user,
                       RECIPIENTS: settings.max_recipients_per_user}
        self._login_limit = settings.max_auth_failures_per_ip
        self._login_window = settings.auth_failure_window
        self._log = log
        self._metrics = metrics
        self._url = safe_url(settings.state)
        self._retry_at = 0.0  # while failing: when Redis is tried again; 0 when it answers
        self._trying = False  # a call is trying a failing Redis now
        self._told_failure = False  # this process logged the failure still on
        # user -> (time.monotonic() seen, messages left, recipients left)
        self._rooms: Dict[str, Tuple[float, int, int]] = {}

    def __getattr__(self, name):
        return getattr(self._local, name)

    def _shared(self, call, local):
        """call() against Redis, or local() while Redis fails."""
        trying = False
        if self._retry_at:
            if self._trying or time.monotonic() < self._retry_at:
                return local()
            trying = self._trying = True
        try:
            result = call()
        except StateError as e:
            self._failed(e)
            return local()
        finally:
            if trying:
                self._trying = False
        if self._retry_at:
            self._retry_at = 0.0
            if self._told_failure:
                self._told_failure = False
                events.note(self._log, events.INFO, events.STATE,
                            "--state %s answers again; counting there", self._url)
        return result

    def _failed(self, error: StateError) -> None:
        self._retry_at = time.monotonic() + RETRY_AFTER
        self._metrics.state_error()
        # Asked of the whole server (the master, with --workers): one line a
        # minute at most, not one per worker.
        if self._local.state_failure_to_tell():
            self._told_failure = True
            events.note(self._log, events.ERROR, events.STATE,
                        "--state %s: %s; counting locally", self._url, error,
                        reason=str(error))

    def login_blocked(self, key: str) -> bool:
        return self._shared(
            lambda: self._counts.logins(key, False, self._login_limit, self._login_window) > 0,
            lambda: self._local.login_blocked(key))

    def login_failed(self, key: str) -> float:
        return self._shared(
            lambda: self._counts.logins(key, True, self._login_limit, self._login_window),
            lambda: self._local.login_failed(key))

    def sending_refused(self, user: str, messages: int, recipients: int) -> Optional[str]:
        # Only a look (the take at the end of DATA decides): MAIL asks Redis
        # for the room left, and the RCPTs that follow within ROOM_FRESH are
        # answered from it, a Redis call a recipient saved.
        now = time.monotonic()
        seen = self._rooms.get(user)
        if messages or seen is None or now - seen[0] > ROOM_FRESH:
            rooms = self._shared(lambda: self._counts.room(user, self._rates), lambda: None)
            if rooms is None:
                return self._local.sending_refused(user, messages, recipients)
            if len(self._rooms) >= MAX_ROOMS:
                self._rooms.clear()
            seen = self._rooms[user] = (now, *rooms)
        _, messages_left, recipients_left = seen
        if 0 <= messages_left < messages:
            return MESSAGES
        if 0 <= recipients_left < recipients:
            return RECIPIENTS
        return None

    def take_message(self, user: str, recipients: int) -> Tuple[Optional[str], str]:
        token = secrets.token_hex(8)
        self._rooms.pop(user, None)  # the room seen is no longer the room left

        def in_redis():
            refused = self._counts.take(user, self._rates, recipients, token)
            return refused, "" if refused else f"R{recipients} {token}"

        def here():
            refused, ticket = self._local.take_message(user, recipients)
            return refused, ticket and "L" + ticket
        return self._shared(in_redis, here)

    def give_back_message(self, user: str, ticket: str) -> None:
        self._rooms.pop(user, None)
        if ticket.startswith("L"):
            self._local.give_back_message(user, ticket[1:])
        elif ticket.startswith("R"):
            recipients, _, token = ticket[1:].partition(" ")
            # Whatever Redis holds of a message is Redis's to give back: a
            # failing one is tried all the same, and the unit expires with
            # its window if that fails too.
            try:
                self._counts.give_back(user, self._rates, token, int(recipients))
            except StateError as e:
                self._failed(e)
