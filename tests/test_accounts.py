"""Limits per authenticated user, end to end (docs/limits.md "Accounts and limits").

A real server, one process and --workers 3, real clients over TLS.  With
workers, a user's connections land on whichever worker accepts them, so each
limit is tried over several connections: counts kept per worker would let
one of them through.
"""

import json
import time

import pytest

from conftest import PASSWORD, free_port, plain_token, wait_until
from test_metrics import scrape, value

from ssmtpd import replies

WORKERS = 3
# Enough connections that, with counts kept per worker, one would land on a
# worker that had not yet seen the user's messages.
TRIES = 6


def start(make_server, workers, *args):
    extra = ["--workers", str(workers)] if workers > 1 else []
    srv = make_server("--max-connections-per-ip", "100", *extra, *args)
    if workers > 1:
        assert wait_until(lambda: srv.log().count("accepting on") == workers), srv.log()
    return srv


def session(srv, user="alice"):
    raw = srv.raw(timeout=30)
    raw.login(srv.tls_context(), user)
    return raw


def send(srv, user="alice", sender="sender@example.org", rcpts=("rcpt@example.org",)):
    """One message in a session of its own: the final reply's code."""
    raw = session(srv, user)
    try:
        return raw.send_message(sender=sender, rcpts=rcpts)[0]
    finally:
        raw.cmd("QUIT")
        raw.close()


def rate_limited_lines(srv, limit):
    return [line for line in srv.log().splitlines()
            if f"over --max-{limit}-per-user" in line]


def code_and_text(answer):
    code, lines = answer
    return code, lines[-1][4:]


LIMITED = (replies.RATE_LIMITED.code,
           f"{replies.RATE_LIMITED.enhanced} {replies.RATE_LIMITED.text}")


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_fourth_message_of_a_user_is_refused_on_any_connection(make_server, workers):
    """docs/limits.md "Accounts and limits": with --max-messages-per-user 3/1h, after three accepted
    messages every MAIL of that user, on any connection and any worker, gets 450 4.7.1;
    the user still logs in and the session goes on; another user is not affected; each
    refusal is one WARNING line naming the user and the limit, and counted."""
    mport = free_port()
    srv = start(make_server, workers, "--max-messages-per-user", "3/1h",
                "--metrics-bind", f"127.0.0.1:{mport}")
    assert [send(srv) for _ in range(3)] == [250] * 3
    for _ in range(TRIES):
        raw = session(srv)  # the login itself is not refused
        assert code_and_text(raw.cmd("MAIL FROM:<sender@example.org>")) == LIMITED
        assert raw.cmd("NOOP")[0] == 250  # the session goes on
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
        raw.cmd("QUIT")
        raw.close()
    assert send(srv, user="bob") == 250
    assert wait_until(lambda: len(rate_limited_lines(srv, "messages")) == 2 * TRIES), srv.log()
    for line in rate_limited_lines(srv, "messages"):
        assert "WARNING" in line and 'user="alice"' in line and "MAIL refused: 450 4.7.1" in line
    assert len(srv.runs()) == 4
    assert wait_until(lambda: value(scrape(mport), "ssmtpd_rate_limited_total",
                                    limit="messages") == 2 * TRIES)


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_a_short_window_frees_up_after_it_passes(make_server, workers):
    """docs/limits.md "Accounts and limits": a window slides: with 2/3s, the third MAIL is refused,
    and a MAIL is accepted again once the first messages are older than 3 s."""
    srv = start(make_server, workers, "--max-messages-per-user", "2/3s")
    first = time.monotonic()
    assert [send(srv) for _ in range(2)] == [250] * 2
    raw = session(srv)
    answers = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code = raw.cmd("MAIL FROM:<sender@example.org>")[0]
        answers.append(code)
        if code == 250:
            break
        time.sleep(0.25)
    assert answers[0] == 450 or time.monotonic() - first >= 3, answers
    assert answers[-1] == 250 and time.monotonic() - first >= 3, answers
    assert raw.cmd("RCPT TO:<rcpt@example.org>")[0] == 250
    raw.cmd("QUIT")
    raw.close()


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_recipients_over_the_limit_are_refused_and_earlier_ones_stand(make_server, workers):
    """docs/limits.md "Accounts and limits": with --max-recipients-per-user 3/1h, the fourth RCPT of a
    transaction gets 450 4.7.1, the three before it are delivered; then the window is full
    and the next MAIL, on any connection, is refused too."""
    srv = start(make_server, workers, "--max-recipients-per-user", "3/1h")
    raw = session(srv)
    assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    for i in range(3):
        assert raw.cmd(f"RCPT TO:<r{i}@example.org>")[0] == 250
    assert code_and_text(raw.cmd("RCPT TO:<r3@example.org>")) == LIMITED
    assert raw.cmd("DATA")[0] == 354
    raw.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
    assert raw.reply()[0] == 250
    raw.cmd("QUIT")
    raw.close()
    (run,) = srv.runs()
    assert run["env"]["SSMTPD_RCPT_TO"].split("\n") == [f"r{i}@example.org" for i in range(3)]
    for _ in range(TRIES):
        raw = session(srv)
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
        raw.close()
    assert send(srv, user="bob", rcpts=("a@example.org", "b@example.org", "c@example.org")) \
        == 250
    assert wait_until(lambda: len(rate_limited_lines(srv, "recipients")) == 1 + TRIES), \
        srv.log()


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_a_message_answered_otherwise_counts_for_nothing(make_server, workers):
    """docs/limits.md "Accounts and limits": a message counts when it is accepted (250), with its
    recipients: one answered 451 or 554 leaves the user's messages and recipients as
    they were."""
    srv = start(make_server, workers, "--max-messages-per-user", "1/1h",
                "--max-recipients-per-user", "2/1h")
    assert send(srv, sender="exit75@example.org", rcpts=("a@example.org", "b@example.org")) \
        == 451
    assert send(srv, sender="exit1@example.org", rcpts=("a@example.org", "b@example.org")) \
        == 554
    assert send(srv, rcpts=("a@example.org", "b@example.org")) == 250
    for _ in range(TRIES):
        raw = session(srv)
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
        raw.close()


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_concurrent_sessions_cannot_pass_the_limit_together(make_server, workers):
    """docs/limits.md "Accounts and limits": two sessions of one user both past MAIL and RCPT with
    room for one message: the message and its recipients are checked and taken before
    the program runs, so the second final dot gets 450 4.7.1 and no program runs for it."""
    srv = start(make_server, workers, "--max-messages-per-user", "1/1h")
    first, second = session(srv), session(srv)
    for raw in (first, second):
        assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        assert raw.cmd("RCPT TO:<rcpt@example.org>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
    first.send(b"Subject: t\r\n\r\none\r\n.\r\n")
    assert first.reply()[0] == 250
    second.send(b"Subject: t\r\n\r\ntwo\r\n.\r\n")
    assert code_and_text(second.reply()) == LIMITED
    assert second.cmd("NOOP")[0] == 250
    for raw in (first, second):
        raw.cmd("QUIT")
        raw.close()
    assert [run["stdin"].endswith("one\r\n") for run in srv.runs()] == [True]
    assert wait_until(lambda: any("DATA refused: 450 4.7.1" in line
                                  for line in rate_limited_lines(srv, "messages"))), srv.log()


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_third_concurrent_session_of_a_user_is_refused_and_not_a_failed_login(make_server,
                                                                               workers):
    """docs/limits.md "Accounts and limits": with --max-sessions-per-user 2 the third concurrent AUTH
    of a user gets 454 4.7.0 (the auth program said yes), which is not a failed login; the
    slot is free again when a session ends; another user is not affected."""
    srv = start(make_server, workers, "--max-sessions-per-user", "2",
                "--max-auth-failures-per-ip", "1")
    held = [session(srv), session(srv)]
    third = srv.raw(timeout=30)
    third.hello(srv.tls_context())
    token = plain_token("alice", PASSWORD)
    for _ in range(TRIES):
        assert code_and_text(third.cmd(f"AUTH PLAIN {token}")) == (
            454, "4.7.0 Too many sessions for this account")
    bob = session(srv, "bob")  # a failed login would have blocked 127.0.0.1 by now
    bob.close()
    held.pop().close()
    answers = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answers.append(third.cmd(f"AUTH PLAIN {token}")[0])
        if answers[-1] == 235:
            break
        time.sleep(0.1)
    assert answers[-1] == 235, answers
    assert third.send_message()[0] == 250
    for raw in held + [third]:
        raw.close()
    lines = rate_limited_lines(srv, "sessions")
    assert len(lines) == TRIES + len(answers) - 1, srv.log()
    assert all('user="alice"' in line and "AUTH refused: 454 4.7.0" in line for line in lines)
    assert ": 535," not in srv.log()


def test_zero_turns_the_session_limit_off(make_server):
    """docs/limits.md "Accounts and limits": --max-sessions-per-user 0: more sessions of one user
    than the default 20, all logged in."""
    srv = start(make_server, 1, "--max-sessions-per-user", "0")
    held = []
    try:
        for _ in range(21):
            held.append(session(srv))
        assert held[-1].cmd("MAIL FROM:<sender@example.org>")[0] == 250
    finally:
        for raw in held:
            raw.close()


def test_rate_limited_is_one_json_line_with_the_user_and_the_limit(make_server):
    """docs/logging.md "Logging": a per-user refusal is event rate_limited at WARNING, with the user,
    the limit and the reply."""
    srv = start(make_server, 1, "--max-messages-per-user", "1/1h", "--log-format", "json")
    assert send(srv) == 250
    raw = session(srv)
    assert raw.cmd("MAIL FROM:<sender@example.org>")[0] == 450
    raw.cmd("QUIT")
    raw.close()
    assert wait_until(lambda: "rate_limited" in srv.log())
    (line,) = [obj for obj in map(json.loads, srv.log().splitlines())
               if obj["event"] == "rate_limited"]
    assert (line["level"], line["user"], line["username"], line["limit"], line["command"],
            line["code"], line["enhanced"]) == ("warning", "alice", "alice", "messages",
                                                "MAIL", 450, "4.7.1")
