"""The per-address accounting in ssmtpd/limits.py, alone (docs/limits.md "Limits and abuse").

Pure bookkeeping with a clock we drive, so the window arithmetic and the IPv6
grouping are checked exactly; test_abuse.py checks the same rules end to end.
"""

import ipaddress
import json

from hypothesis import example, given, settings
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from ssmtpd.limits import (MESSAGES, RECIPIENTS, TOO_MANY, TOO_MANY_FROM_ADDRESS,
                           ConnectionCount, Limits, Window, address_key, user_key)

PROPERTY = settings(max_examples=300, deadline=None)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- grouping addresses -------------------------------------------------------------

def test_ipv6_addresses_of_one_prefix_share_a_key():
    """docs/limits.md "Limits and abuse": IPv6 clients count by their --ipv6-prefix-length prefix (default 64)."""
    a = address_key("2001:db8:1:2::a", 64)
    assert a == address_key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64) == "2001:db8:1:2::/64"
    assert a != address_key("2001:db8:1:3::a", 64)
    assert address_key("2001:db8:1:3::a", 48) == address_key("2001:db8:1:2::a", 48)
    assert address_key("2001:db8::a", 128) != address_key("2001:db8::b", 128)


def test_ipv4_counts_whole_and_mapped_addresses_are_ipv4():
    """docs/limits.md "Limits and abuse": IPv4 by its whole address, also when a dual-stack socket maps it."""
    assert address_key("192.0.2.1", 64) == "192.0.2.1"
    assert address_key("192.0.2.1", 64) != address_key("192.0.2.2", 64)
    assert address_key("::ffff:192.0.2.1", 64) == "192.0.2.1"


@PROPERTY
@given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_same_key_exactly_when_same_prefix(a, b, length):
    """Two IPv6 addresses share a key if and only if their first `length` bits agree."""
    for address in (a, b):
        if ipaddress.IPv6Address(address).ipv4_mapped is not None:
            return  # counted as IPv4, tested above
    same_prefix = (a >> (128 - length)) == (b >> (128 - length)) if length else True
    key_a = address_key(str(ipaddress.IPv6Address(a)), length)
    key_b = address_key(str(ipaddress.IPv6Address(b)), length)
    assert (key_a == key_b) == same_prefix


# --- connections -------------------------------------------------------------------

def test_connection_count_refuses_at_each_limit():
    count = ConnectionCount(max_total=3, max_per_key=2)
    assert count.admit("a") is None and count.admit("a") is None
    assert count.admit("a") == TOO_MANY_FROM_ADDRESS
    assert count.admit("b") is None
    assert count.admit("c") == TOO_MANY
    count.release("a")
    assert count.admit("c") is None
    assert count.total == 3 and count.of("a") == 1


def test_pressure_is_more_than_three_quarters():
    """docs/limits.md "Limits and abuse": under pressure while more than 3/4 of --max-connections are in use."""
    count = ConnectionCount(max_total=8, max_per_key=8)
    for _ in range(6):
        count.admit("a")
    assert not count.under_pressure
    count.admit("a")
    assert count.under_pressure
    count.release("a")
    assert not count.under_pressure


# --- failed logins -----------------------------------------------------------------

def test_blocked_after_limit_failures_inside_the_window():
    clock = Clock()
    logins = Window(limit=3, window=60, clock=clock)
    for _ in range(2):
        logins.record("a")
        clock.now += 10
    assert not logins.blocked("a")
    logins.record("a")
    assert logins.blocked("a") and not logins.blocked("b")
    # The window moves past the oldest failure: two are left, below the limit.
    clock.now += 40.5
    assert not logins.blocked("a")
    assert logins.count("a") == 2


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 100)), max_size=60),
       st.integers(1, 5), st.floats(1, 200))
# A failure exactly one window old, where t + window - now and t > now - window
# part by rounding: found once, kept.
@example([("a", 17.153001520213), ("a", 7.0)], 2, 7.0)
def test_blocked_matches_a_plain_count(events, limit, window):
    """blocked(key) is exactly: at least `limit` failures of key within the last `window`."""
    clock = Clock()
    logins = Window(limit=limit, window=window, clock=clock)
    history = []
    for key, pause in events:
        clock.now += pause
        logins.record(key)
        history.append((key, clock.now))
        for k in "abc":
            recent = sum(1 for hk, t in history if hk == k and t > clock.now - window)
            assert logins.blocked(k) == (recent >= limit)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from("ab"), st.floats(0, 50), st.integers(1, 4),
                          st.booleans()), max_size=40),
       st.integers(1, 6), st.floats(1, 100), st.integers(1, 7))
def test_room_matches_a_plain_count(steps, limit, window, wanted):
    """docs/limits.md "Accounts and limits": room(key, n) is exactly: the events of key within the
    last `window`, plus n, are at most `limit`; taking only what has room, and giving
    back a take, keep that true."""
    clock = Clock()
    sent = Window(limit=limit, window=window, clock=clock)
    history = []
    for key, pause, count, given_back in steps:
        clock.now += pause
        if sent.room(key, count):
            sent.take(key, count, clock.now)
            if given_back:
                sent.give_back(key, count, clock.now)
            else:
                history += [(key, clock.now)] * count
        for k in "ab":
            recent = sum(1 for hk, t in history if hk == k and t > clock.now - window)
            assert recent <= limit
            assert sent.room(k, wanted) == (recent + wanted <= limit), (k, recent)


def settings(**overrides):
    import types
    values = dict(ipv6_prefix_length=64, max_connections=100, max_connections_per_ip=10,
                  max_auth_failures_per_ip=10, auth_failure_window=600,
                  max_connection_rate_per_ip=(), max_messages_per_user=((3, 60), (5, 3600)),
                  max_recipients_per_user=((10, 60),), max_sessions_per_user=2)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_a_message_is_taken_with_its_recipients_and_given_back_whole():
    """docs/limits.md "Accounts and limits": every window must allow it; a message not accepted
    counts for nothing; users are counted exactly as given."""
    limits = Limits(settings())
    assert limits.sending_refused("alice", 1, 11) == RECIPIENTS
    refused, ticket = limits.take_message("alice", 8)
    assert refused is None
    assert limits.sending_refused("alice", 0, 3) == RECIPIENTS
    assert limits.sending_refused("Alice", 0, 3) is None
    limits.give_back_message("alice", ticket)
    for _ in range(3):
        assert limits.take_message("alice", 1)[0] is None
    assert limits.take_message("alice", 1) == (MESSAGES, "")
    assert limits.sending_refused("alice", 1, 1) == MESSAGES


def test_zero_turns_each_limit_off():
    """docs/limits.md "Accounts and limits": 0 for no limit, for all three."""
    limits = Limits(settings(max_messages_per_user=(), max_recipients_per_user=(),
                             max_sessions_per_user=0))
    for _ in range(3000):
        assert limits.take_message("alice", 100)[0] is None
        assert limits.user_session_opened("alice")
    assert limits.sending_refused("alice", 1, 10**6) is None


def test_sessions_per_user_are_held_and_released():
    limits = Limits(settings())
    assert limits.user_session_opened("alice") and limits.user_session_opened("alice")
    assert not limits.user_session_opened("alice")
    assert limits.user_session_opened("bob")
    limits.user_session_closed("alice")
    assert limits.user_session_opened("alice")


def test_a_reload_keeps_what_the_windows_counted(monkeypatch):
    """docs/operations.md "Reloading (SIGHUP)": a reload is no way around a limit. 100 messages
    sent over 10 minutes under 10/1m,100/1h stay counted after a reload to 100/1h alone,
    and a session slot taken while the limit was off is counted once it is on."""
    clock = Clock()
    monkeypatch.setattr("ssmtpd.limits.time.monotonic", clock)
    limits = Limits(settings(max_messages_per_user=((10, 60.0), (100, 3600.0)),
                             max_sessions_per_user=0))
    for window in limits.sending[MESSAGES]:
        window._clock = clock
    taken = 0
    for _ in range(11):
        taken += sum(limits.take_message("alice", 1)[0] is None for _ in range(10))
        clock.now += 61
    assert taken == 100
    assert limits.user_session_opened("alice")
    limits.reconfigure(settings(max_messages_per_user=((100, 3600.0),),
                                max_sessions_per_user=1))
    for window in limits.sending[MESSAGES]:
        window._clock = clock
    assert limits.take_message("alice", 1)[0] == MESSAGES
    assert not limits.user_session_opened("alice")
    limits.user_session_closed("alice")
    assert limits.user_session_opened("alice")


def test_table_is_bounded_and_forgets_expired_addresses():
    clock = Clock()
    logins = Window(limit=2, window=10, clock=clock, max_keys=100)
    for i in range(250):
        logins.record(f"10.0.{i // 256}.{i % 256}")
    assert len(logins) == 100
    clock.now += 11
    logins.record("192.0.2.1")
    assert len(logins) == 1


@PROPERTY
@given(st.one_of(st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
                 st.text(alphabet="0123456789.", max_size=16)))
def test_ipv4_fast_path_agrees_with_ipaddress(text):
    """The dotted-quad shortcut keys exactly what ipaddress would, and nothing it refuses."""
    try:
        expected = str(ipaddress.ip_address(text))
    except ValueError:
        expected = text  # not an address: counted as it is
    assert address_key(text, 64) == expected


# --- an upgrade carries the counts over -----------------------------------------------

OPERATIONS = st.lists(st.tuples(st.sampled_from(["admit", "fail", "send", "open", "tick"]),
                                st.sampled_from(["a", "b", "c"]), st.integers(1, 4)),
                      max_size=60)


@hyp_settings(max_examples=200, deadline=None)
@given(OPERATIONS)
def test_counts_survive_a_snapshot_as_json(operations):
    """docs/operations.md "Upgrading in place (SIGUSR2)": whatever was counted,
    a Limits restored from another's snapshot (through JSON, as it travels) answers
    every question as the first one does."""
    clock = Clock()
    config = settings(max_connection_rate_per_ip=((5, 30.0),), max_auth_failures_per_ip=3,
                      max_connections_per_ip=3)

    def made():
        limits = Limits(config)
        for window in [limits.logins, *limits.connection_rates,
                       *limits.sending[MESSAGES], *limits.sending[RECIPIENTS]]:
            window._clock = clock
        limits._clock = clock
        return limits
    first = made()
    for op, key, n in operations:
        if op == "admit":
            first.admit(key)
        elif op == "fail":
            first.login_failed(key)
        elif op == "send":
            first.take_message(key, n)
        elif op == "open":
            first.user_session_opened(key)
        else:
            clock.now += 7 * n
    second = made()
    second.restore(json.loads(json.dumps(first.snapshot())))
    for window in [second.logins, *second.connection_rates,
                   *second.sending[MESSAGES], *second.sending[RECIPIENTS]]:
        window._clock = clock
    for key in "abc":
        assert second.connections.of(key) == first.connections.of(key)
        assert second.login_blocked(key) == first.login_blocked(key)
        assert second.sending_refused(key, 1, 1) == first.sending_refused(key, 1, 1)
        assert second.user_sessions.of(user_key(key)) == first.user_sessions.of(user_key(key))
        assert second.admit(key) == first.admit(key)
