"""One AUTH command, from its mechanism to its answer (docs/dialogue.md "The dialogue",
"OAuth 2 tokens"; RFC 4954 §4).

The session's AUTH verb hands its argument here.  This module chooses the
mechanism among those offered, holds each mechanism's line limit, reads the
credentials through the session's 334 challenges, runs the auth program and,
for a rejected token, sends the error challenge of RFC 7628 §3.2.2.  The
session lends what it owns: its settings, programs, limits, metrics and
client address, and `challenge()` (a 334 and the response), `login_failed()`,
`rate_limited()`, `stderr_logger()`, `log_if_not_started()`.
"""

from typing import Union

from ssmtpd import events, metrics, programs, replies, sasl
from ssmtpd.delivery import program_fields
from ssmtpd.events import INFO, WARNING, Told
from ssmtpd.limits import SESSIONS
from ssmtpd.replies import Reply, SmtpError

# RFC 4954 §4: an AUTH line or response of PLAIN or LOGIN may carry 12288
# octets.  A token mechanism's may carry 16384 (docs/auth-program.md "OAuth 2 tokens"):
# bearer tokens of several KiB are usual (a JWT with its claims).  Both
# without the line end.
PASSWORD_LINE_LIMIT = 12288
TOKEN_LINE_LIMIT = 16384


def line_limit(mechanism: str) -> int:
    return TOKEN_LINE_LIMIT if mechanism in sasl.TOKEN_MECHANISMS else PASSWORD_LINE_LIMIT


def command_limit(line: bytes) -> int:
    """The longest the AUTH command `line` (without its line end) may be: its
    mechanism's limit, judged before anything else like any line's length."""
    words = line.split(None, 2)
    mechanism = words[1].upper() if len(words) > 1 else b""
    return line_limit(mechanism.decode("ascii", "replace"))


def authenticate(session, arg: str) -> Union[Reply, Told]:
    """The answer to `AUTH <arg>`: a Told of the login, or a refusal."""
    mechanism, _, initial = arg.strip().partition(" ")
    mechanism = mechanism.upper()
    initial = initial.strip()
    limit = line_limit(mechanism)  # the command's own was checked with command_limit()
    # RFC 4954 §4: a mechanism the server does not offer gets 504.
    if mechanism not in session.settings.auth_mechanisms:
        return replies.UNKNOWN_MECHANISM
    creds = _credentials(session, mechanism, initial, limit)
    ran, cached = None, False
    if creds.foreign_authzid:
        reply, result = replies.BAD_CREDENTIALS, {"authzid": creds.authzid}
    else:
        session.running_program = True
        try:
            reply, outcome = session.programs.authenticate(
                creds, mechanism, session.client_addr, session.stderr_logger("auth"))
        finally:
            session.running_program = False
        session.log_if_not_started("auth", session.programs.auth, outcome)
        cached = outcome.cached  # docs/auth-program.md "The auth cache": no program ran
        result = {**program_fields(outcome, "duration_ms"), "cached": cached}
        ran = outcome.seconds if outcome.status != programs.NO_SLOT and not cached else None
    # Asked only once the program said yes: the answer tells only someone
    # who holds the password that the account is busy, and a stranger
    # cannot fill an account's slots (docs/limits.md "Accounts and limits").
    if reply.code == 235 and not session.limits.user_session_opened(creds.username):
        session.metrics.auth("tempfail", ran, cached)
        return session.rate_limited("AUTH", "", replies.TOO_MANY_USER_SESSIONS,
                                    SESSIONS, creds.username, result)
    session.metrics.auth(metrics.AUTH_RESULTS.get(reply.code, "tempfail"), ran, cached)
    # One line per attempt with the address and the quoted name: a failure
    # is a warning, the line fail2ban reads (conf/fail2ban/); a temporary
    # failure is a refusal like any other, not a failed login.
    fields = {"command": "AUTH", "mechanism": mechanism, "username": creds.username,
              "code": reply.code, "enhanced": reply.enhanced, **result}
    if reply.code == 235:
        fields["user"] = creds.username
        return Told(reply, INFO, events.AUTH, fields)
    if reply.code == 535:
        told = Told(reply, WARNING, events.AUTH_FAILED, fields)
        session.login_failed(told)
        if mechanism in sasl.TOKEN_MECHANISMS:
            _error_challenge(session, limit)
        return told
    fields["reason"] = reply.text
    return Told(reply, INFO, events.AUTH_REFUSED, fields)


def _credentials(session, mechanism: str, initial: str, limit: int) -> sasl.Credentials:
    """Decode what the client sends for `mechanism`: the initial response,
    or the response to an empty challenge (RFC 4954 §4)."""
    def response(prompt: str = "") -> bytes:
        return sasl.decode_response(session.challenge(prompt, limit))

    first = sasl.decode_response(initial) if initial else None
    if mechanism == "LOGIN":
        username = first if first is not None else response(sasl.LOGIN_USERNAME_PROMPT)
        return sasl.login(username, response(sasl.LOGIN_PASSWORD_PROMPT))
    message = first if first is not None else response()
    decode = {"PLAIN": sasl.plain, "OAUTHBEARER": sasl.oauthbearer,
              "XOAUTH2": sasl.xoauth2}[mechanism]
    return decode(message)


def _error_challenge(session, limit: int) -> None:
    """RFC 7628 §3.2.2: a rejected token gets a 334 with the error status,
    and the 535 only after the client's reply, whatever it is (`AQ==`, an
    empty line, even `*`).  The failure is written and counted already."""
    try:
        session.challenge(sasl.token_error_challenge(), limit)
    except SmtpError:
        pass  # an over-long reply is as good as any: the answer is 535
