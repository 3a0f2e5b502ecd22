"""One client's SMTP dialogue as a state machine (docs/dialogue.md "The dialogue").

`Session.run()` owns the policy: it reads one bounded line under the idle
deadline, finds `smtp_<VERB>`, checks the verb's declared requirements, calls
it, counts errors, junk commands and failed logins, and writes the Reply.
Verbs only say what a command means.

What happened is said once, where the answer is known (docs/logging.md "Logging"):
every answer to MAIL, RCPT, DATA and AUTH is one line, the event a verb or a
need told with its reply, or else `refused` for an answer of 400 or more.
"""

import logging
import socket
import time
from typing import Callable, List, Optional, Tuple, Union

import gevent
from gevent import ssl

from ssmtpd import dotreader, events, login, metrics, replies, spool, syntax
from ssmtpd.config import Settings
from ssmtpd.delivery import Envelope, Programs, program_fields, received_header
from ssmtpd.events import DEBUG, ERROR, INFO, WARNING, Told
from ssmtpd.limits import Limits
from ssmtpd.log import SessionLog, clean, quote
from ssmtpd.metrics import Metrics, NoMetrics
from ssmtpd.replies import Reply, SmtpError
from ssmtpd.stream import ClientGone, ClientStream, Deadline, LineTooLong
from ssmtpd.tls import TLSHolder

# RFC 5321 §4.5.3.1.4: 512 octets with CRLF.  MAIL may grow by the allowances
# of the extensions we offer: SIZE +26 (RFC 1870), AUTH= +500 (RFC 4954 §5),
# SMTPUTF8 +10 (RFC 6531 §3.4).  An AUTH line is read up to the longest any
# mechanism allows; each mechanism's own limit is login.py's.
COMMAND_LIMIT = 512
MAIL_LIMIT = 512 + 26 + 500 + 10
READ_LIMIT = login.TOKEN_LINE_LIMIT + 2
LINE_LIMITS = {b"MAIL": MAIL_LIMIT}

MAX_AUTH_FAILURES = 3
MAX_ERRORS = 10
# Replies that mean "the client is talking nonsense"; enough of them ends the session.
ERROR_CODES = frozenset((500, 501, 502, 503, 504, 555))
# Commands that do nothing; past MAX_JUNK of them since the last accepted
# message, each counts as an error (Postfix smtpd_junk_command_limit), so a
# client that only idles loudly is ended by the error limit.
JUNK_VERBS = frozenset(("NOOP", "RSET", "VRFY", "HELP"))
MAX_JUNK = 100
# A web browser or proxy lured into talking to us (cross-protocol attacks):
# close without echoing anything back.
HTTP_VERBS = frozenset((b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"))
# Each answer to these is one line (docs/logging.md "Logging"); other verbs' refusals
# are the client's own business, seen at DEBUG.
TOLD_VERBS = frozenset(("MAIL", "RCPT", "DATA", "AUTH"))
# What a load balancer's health check may send before it QUITs or closes
# (docs/logging.md "Logging"): one of these, once.
HELLO_VERBS = (b"HELO", b"EHLO")


class Shutdown(Exception):
    """The server is stopping; raised into a session waiting for input."""


class IdleTimeout(Exception):
    """The client was silent or slow past --timeout / --data-timeout."""


class _Close(Exception):
    """End the session without a further reply."""


# --- verb requirements, declared once per verb ------------------------------

class Need:
    def __init__(self, test: Callable[["Session"], bool], reply: Reply,
                 event: events.Event = events.REFUSED, level: int = INFO, reason: str = "",
                 record: Optional[Callable[["Session"], None]] = None):
        self.test = test
        self.reply = reply
        # How a refusal by this need is logged (docs/logging.md "Logging"): the
        # reason defaults to the reply's text.
        self.event = event
        self.level = level
        self.reason = reason or reply.text
        self.record = record  # and how it is counted in the metrics

    def refusal(self, session: "Session", verb: str, arg: str) -> Optional[Told]:
        """None when the need holds, else the refusal to tell."""
        if self.test(session):
            return None
        if self.record:
            self.record(session)
        return session._refusal(verb, arg, self.reply, self.event, self.level, self.reason)


class SendingRoom(Need):
    """The user's sending limits have room for `messages` more messages and
    for the transaction's recipients and `recipients` more (docs/limits.md
    "Accounts and limits").  Only a look: the message is taken at the end of DATA."""

    def __init__(self, messages: int, recipients: int):
        super().__init__(lambda s: True, replies.RATE_LIMITED, events.RATE_LIMITED, WARNING)
        self.messages = messages
        self.recipients = recipients

    def refusal(self, session: "Session", verb: str, arg: str) -> Optional[Told]:
        user = session.user
        if user is None:
            return None
        limit = session.limits.sending_refused(user, self.messages,
                                               len(session.rcpt_to) + self.recipients)
        if limit is None:
            return None
        return session.rate_limited(verb, arg, self.reply, limit, user)


HELO_DONE = Need(lambda s: s.helo is not None, replies.NO_HELO)
TLS_UP = Need(lambda s: s.tls_version or not s.settings.require_tls, replies.MUST_STARTTLS)
AUTHENTICATED = Need(lambda s: s.user is not None or not s.settings.require_auth,
                     replies.AUTH_REQUIRED)
AUTH_ENABLED = Need(lambda s: s.programs.auth is not None, replies.AUTH_NOT_ENABLED)
NOT_AUTHENTICATED = Need(lambda s: s.user is None, replies.ALREADY_AUTHENTICATED)
IN_MAIL = Need(lambda s: s.mail_from is not None, replies.NEED_MAIL)
HAS_RCPT = Need(lambda s: bool(s.rcpt_to), replies.NEED_RCPT)
NO_TLS_YET = Need(lambda s: not s.tls_version, replies.TLS_ACTIVE)
# docs/limits.md "Limits and abuse": checked before the auth program would run.
LOGINS_ALLOWED = Need(lambda s: not s.limits.login_blocked(s.address_key),
                      replies.TOO_MANY_FAILED_LOGINS, events.AUTH_THROTTLED, WARNING,
                      "too many failed logins from this address",
                      record=lambda s: s.metrics.auth(metrics.THROTTLED))
# A warning, not the INFO of other refusals: the cause is the server's own.
SPOOL_HAS_ROOM = Need(lambda s: spool.has_room(s.settings.spool_dir,
                                               2 * s.settings.max_message_size),
                      replies.INSUFFICIENT_STORAGE, level=WARNING,
                      reason="spool directory nearly full")


def outside_mail(reply: Reply) -> Need:
    return Need(lambda s: s.mail_from is None, reply)


def requires(*needs: Need):
    """Declare what must hold before a verb runs; checked in order by the loop."""
    def mark(method):
        method.needs = needs
        return method
    return mark


class Session:
    def __init__(self, sock, address: Tuple, settings: Settings, tls: TLSHolder,
                 programs: Programs, limits: Limits, metrics: Union[Metrics, NoMetrics],
                 log: SessionLog, session_id: str, implicit_tls: bool = False):
        self.settings = settings
        self.tls = tls
        self.programs = programs
        self.limits = limits
        self.metrics = metrics
        self.log = log
        self.session_id = session_id
        self.client_addr = address[0]
        self.address_key = limits.key(self.client_addr)
        self.implicit_tls = implicit_tls
        self.stream = ClientStream(sock)
        # No socket timeout: every read and send runs under one of the
        # session's deadlines below, so a gevent wait never needs a timer of its own.
        sock.settimeout(None)
        self._deadlines = {}
        self._debug = log.isEnabledFor(logging.DEBUG)  # asked once: a test per command adds up
        self.tls_version = ""
        self.errors = 0
        self.junk = 0
        self.auth_failures = 0
        self._hello_screened = False  # the one HELO/EHLO a health check may send
        self.stopping = False
        self._waiting = False
        self.receiving_data = False  # between 354 and the final dot
        # A running program is never interrupted: its client gets its answer
        # (docs/operations.md "Signals"); nor is the session's own closing.
        self.running_program = False
        self._closing = False
        # When the session began waiting for its next line (None: not waiting
        # for one); the server's pressure sweep reads it (docs/limits.md "Limits and abuse").
        self.waiting_for_line_since: Optional[float] = None
        self._greenlet = None
        # The user whose session slot this session holds (docs/limits.md "Accounts and limits").
        self._session_of: Optional[str] = None
        self._reset_session()

    # --- state -------------------------------------------------------------

    def _reset_session(self) -> None:
        """Back to just after the greeting (RFC 3207 §4.2)."""
        self._end_login()
        self.helo: Optional[str] = None
        self.esmtp = False
        self.user: Optional[str] = None
        self.log.set_user(None)
        self._reset_transaction()

    def _end_login(self) -> None:
        if self._session_of is not None:
            self.limits.user_session_closed(self._session_of)
            self._session_of = None

    def _reset_transaction(self) -> None:
        self.mail_from: Optional[str] = None
        self.rcpt_to: List[str] = []

    # --- ending a session from outside: only while it waits for input ------

    def interrupt(self, now: bool = False) -> None:
        """Ask the session to end: at once if it waits for the client (with
        `now`, whatever it does but run a program), else after its reply."""
        self.stopping = True
        gevent.get_hub().loop.run_callback(
            self._throw_if, self._interruptible if now else self._idle, Shutdown)

    def _idle(self) -> bool:
        """Waiting for the client's next command: a client sending its
        message may finish it (docs/operations.md "Signals")."""
        return self._waiting and not self.receiving_data

    def _interruptible(self) -> bool:
        return not self.running_program and not self._closing

    def expire_if_stranger(self, busy_timeout: float) -> None:
        """The server is under pressure: end this session if it has not logged
        in and has waited over `busy_timeout` for its next line (docs/limits.md "Limits and abuse")."""
        def stranger_waited_too_long():
            since = self.waiting_for_line_since
            return self.user is None and since is not None \
                and time.monotonic() - since >= busy_timeout
        gevent.get_hub().loop.run_callback(self._throw_if, stranger_waited_too_long,
                                           IdleTimeout)

    def _throw_if(self, condition: Callable[[], bool], exception) -> None:
        # Runs in the hub, so the session cannot move between the test and the
        # throw: one that is running a program is never interrupted (docs/operations.md "Signals").
        g = self._greenlet
        if g is not None and not g.dead and condition():
            g.throw(exception())

    def _wait_for_client(self, seconds: float, call, phase: bool = False):
        """call(), where the session may be interrupted and times out after `seconds`."""
        # A wait that begins after the server asked the session to end (the
        # token error challenge after a failed login's pause, say) is not begun.
        if self.stopping and not self.receiving_data:
            raise Shutdown()
        self._waiting = True
        try:
            with self._deadline(seconds, phase):
                return call()
        finally:
            self._waiting = False

    def _deadline(self, seconds: float, phase: bool = False) -> Deadline:
        """IdleTimeout after `seconds` in the `with` block (docs/limits.md "Limits and abuse").

        A `phase` deadline (--data-timeout) is a timer of its own: each wait
        inside the phase holds another one, and sharing a timer between the
        two would restart the phase's at every wait.
        """
        key = (seconds, phase)
        deadline = self._deadlines.get(key)
        if deadline is None:
            deadline = self._deadlines[key] = Deadline(seconds, IdleTimeout)
        return deadline

    def _wait_for_line(self, call):
        """Wait for the client's next line or handshake: --timeout, or
        --busy-timeout for a stranger while the server is nearly full."""
        timeout = self.settings.timeout
        if self.user is None and self.limits.under_pressure:
            timeout = min(timeout, self.settings.busy_timeout)
        self.waiting_for_line_since = time.monotonic()
        try:
            return self._wait_for_client(timeout, call)
        finally:
            self.waiting_for_line_since = None

    # --- the loop -----------------------------------------------------------

    def run(self) -> None:
        self._greenlet = gevent.getcurrent()
        started = time.monotonic()
        # Until the client does something a load balancer's health check does
        # not, its lines wait: a health check's are written at DEBUG
        # (docs/logging.md "Logging").
        self.log.hold()
        if self.implicit_tls:
            self.log.say(INFO, events.CONNECTED, implicit_tls=True)
        else:
            self.log.say(INFO, events.CONNECTED)
        reason = "closed"
        clean_end = False
        waited_enough = False
        closing_code = None
        gone = False
        try:
            if self.implicit_tls:
                self._handshake(first_byte=True)
            self._send(replies.greeting(self.settings.hostname))
            while not self.stopping:
                closing_code = self._answer(self._one_command())
                if closing_code:
                    reason = f"closed after {closing_code}"
                    clean_end = True
                    break
            else:
                raise Shutdown()
        except Shutdown:
            reason = "server shutting down"
            clean_end = True
            self._send(replies.SHUTTING_DOWN)
        except (IdleTimeout, socket.timeout):
            reason = "timed out"
            waited_enough = True
            self._send(replies.IDLE_TIMEOUT)
        except _Close as e:
            reason = str(e)
        except ClientGone as e:
            reason = f"client gone: {e}"
            gone = True
        except ssl.SSLError as e:
            reason = f"TLS error: {e}"
        except Exception as e:
            # A bug must cost one session, not the server, and must not print a
            # traceback where a client's input could have been (debug shows it).
            reason = f"internal error: {type(e).__name__}: {clean(str(e))}"
            self.log.say(ERROR, events.INTERNAL_ERROR, exc_info=self._debug,
                         error_type=type(e).__name__, reason=str(e))
            self._send(replies.INTERNAL_ERROR)
        finally:
            self._closing = True
            self._end_login()
            self._close(clean_end, waited_enough)
            # A health check closes, or QUITs, before it has done anything
            # else; one that times out is not one (docs/logging.md "Logging").
            health_check = self.log.holding and (gone or closing_code == 221)
            self.log.release(health_check)
            ended = {"reason": reason, "duration_ms": _ms(time.monotonic() - started)}
            if health_check:
                ended["health_check"] = True
            self.log.say(DEBUG if health_check else INFO, events.DISCONNECTED, **ended)

    def _one_command(self) -> Optional[Reply]:
        try:
            raw = self._wait_for_line(self._next_line)
        except LineTooLong:
            self.log.release()
            return self._counted(replies.LINE_TOO_LONG)
        if self.log.holding:
            self._screen(raw)
        verb, reply = self._dispatch(raw)
        if reply is None:  # STARTTLS answered before its handshake
            return None
        if reply.code == 535 and self.auth_failures >= MAX_AUTH_FAILURES:
            # Counted (login_failed) when the AUTH exchange knew it had failed.
            self._send(reply)
            return replies.TOO_MANY_AUTH_FAILURES
        elif verb == "DATA" and reply.code == 250:
            self.junk = 0
        elif verb in JUNK_VERBS:
            self.junk += 1
        return self._counted(reply, self.junk > MAX_JUNK and verb in JUNK_VERBS)

    def _screen(self, raw: bytes) -> None:
        """A health check QUITs, after at most one HELO or EHLO; any other
        line makes this a client's session, whose lines are written from now
        on (docs/logging.md "Logging")."""
        verb = raw.partition(b" ")[0].rstrip(b"\r\n").upper()
        if verb == b"QUIT":
            return
        if verb in HELLO_VERBS and not self._hello_screened:
            self._hello_screened = True
            return
        self.log.release()

    def _answer(self, reply: Optional[Reply]) -> Optional[int]:
        """Queue the reply; its code if it ends the session.  The reply is
        not kept while the session waits for the next command: an EHLO reply
        is some 400 octets per idle client."""
        if reply is None:  # STARTTLS answered before its handshake
            return None
        self._send(reply)
        return reply.code if reply.closes else None

    def _counted(self, reply: Reply, junk: bool = False) -> Reply:
        if reply.code in ERROR_CODES or junk:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                self._send(reply)
                return replies.TOO_MANY_ERRORS
        return reply

    def _dispatch(self, raw: bytes) -> Tuple[str, Optional[Reply]]:
        """(the verb if known, else "", and the reply)."""
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        verb_bytes = line.partition(b" ")[0].upper()
        if verb_bytes in HTTP_VERBS:
            raise _Close(f"closed: HTTP request {quote(line, 60)}")
        # Octets, so a non-ASCII letter that str.upper() folds into ASCII
        # ("quıt") is no verb.
        known = _VERBS.get(verb_bytes)
        if verb_bytes == b"AUTH":
            too_long = len(line) > login.command_limit(line)
        else:
            too_long = len(raw) > LINE_LIMITS.get(verb_bytes, COMMAND_LIMIT)
        if too_long:
            return "", self._tell(known[0] if known else "", "", replies.LINE_TOO_LONG)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return "", self._tell(known[0] if known else "", "", replies.BAD_UTF8)
        if known is None:
            # An unknown line may be a credential sent out of turn: never log it.
            self.log.say(DEBUG, events.UNKNOWN_COMMAND, octets=len(raw))
            return "", replies.NOT_IMPLEMENTED
        verb, method = known
        arg = text[len(verb) + 1:]  # the verb is ASCII: as many characters as octets
        if self._debug:
            if verb == "AUTH":
                self.log.say(DEBUG, events.COMMAND, command=verb)
            else:
                self.log.say(DEBUG, events.COMMAND, command=verb, line=text)
        for need in method.needs:
            refused = need.refusal(self, verb, arg)
            if refused is not None:
                return verb, self._tell(verb, arg, refused)
        try:
            answer = method(self, arg)
        except SmtpError as e:
            answer = e.reply
        return verb, self._tell(verb, arg, answer)

    def _tell(self, verb: str, arg: str, answer: Union[Reply, Told, None]) -> Optional[Reply]:
        """Log the answer to a command, once: the event its verb or need told,
        or `refused` for an answer of 400 and up to MAIL, RCPT, DATA or AUTH
        (docs/logging.md "Logging"); returns the reply."""
        if type(answer) is Told:
            if not answer.said:
                self.log.say(answer.level, answer.event, **answer.fields)
            if answer.event is events.AUTH:
                # Lines name the user from the one after the login's own.
                self.log.set_user(self.user)
            return answer.reply
        if answer is not None and answer.code >= 400 and verb in TOLD_VERBS:
            told = self._refusal(verb, arg, answer)
            self.log.say(told.level, told.event, **told.fields)
        return answer

    def rate_limited(self, verb: str, arg: str, reply: Reply, limit: str, user: str,
                     fields: Optional[dict] = None) -> Told:
        """A refusal by a per-user limit: its own event, naming the user
        and the limit (docs/limits.md "Accounts and limits")."""
        self.metrics.rate_limited(limit)
        told = self._refusal(verb, arg, reply, events.RATE_LIMITED, WARNING)
        told.fields.update(fields or {}, limit=limit, username=user)
        told.fields.update(command=verb, code=reply.code, enhanced=reply.enhanced,
                           reason=reply.text)
        return told

    @staticmethod
    def _refusal(verb: str, arg: str, reply: Reply, event: events.Event = events.REFUSED,
                 level: int = INFO, reason: str = "") -> Told:
        fields = {"command": verb, "code": reply.code, "enhanced": reply.enhanced,
                  "reason": reason or reply.text}
        # An envelope address is what "why did this bounce?" asks about; an
        # AUTH argument is a credential, and DATA has none.
        if arg and verb in ("MAIL", "RCPT"):
            fields["argument"] = arg
        return Told(reply, level, event, fields)

    # --- I/O helpers ---------------------------------------------------------

    def _next_line(self) -> bytes:
        return self.stream.readline(READ_LIMIT)

    def _read_data(self) -> bytes:
        return self._wait_for_line(self.stream.recv_some)

    def _send(self, reply: Reply) -> None:
        self.stream.write(reply.encode())

    def _close(self, clean_end: bool, waited_enough: bool) -> None:
        # What is queued (the last reply, or the 421 an ending queued), then
        # over TLS a close_notify after a clean end; a client that stops
        # reading holds us 5 s at most, and none after it has timed out:
        # --timeout is all the wait a client gets (docs/dialogue.md "The dialogue").
        try:
            with self._deadline(5):
                self.stream.close(notify=clean_end, wait=not waited_enough)
        except (IdleTimeout, ClientGone, OSError):
            pass

    def _handshake(self, first_byte: bool = False) -> None:
        """Wrap the socket in TLS under the --timeout deadline.

        With `first_byte` (the implicit-TLS port), the client's first byte is
        waited for first, under the same deadline, so that one that closes
        before sending any (a health check) is told apart from a failed
        handshake (docs/logging.md "Logging").
        """
        context = self.tls.context  # taken now: a SIGHUP reload affects new sessions only
        sock = self.stream.sock
        wrapped = []

        def handshake():
            if first_byte:
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except ConnectionError as e:
                    raise ClientGone(str(e)) from None
                if not data:
                    raise ClientGone("connection closed by client")
            wrapped.append(context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False))
            wrapped[0].do_handshake()

        try:
            self._wait_for_line(handshake)
        except BaseException as e:
            if wrapped:
                wrapped[0].close()  # wrap_socket took over the descriptor
            if isinstance(e, (ssl.SSLError, OSError)) and not isinstance(e, socket.timeout):
                raise _Close(f"TLS handshake failed: {clean(str(e))}") from None
            raise
        tls_sock = wrapped[0]
        self.stream = self.stream.over(tls_sock)
        self.tls_version = tls_sock.version() or ""
        cipher = tls_sock.cipher()
        self.log.say(INFO, events.TLS, tls_version=self.tls_version,
                     cipher=cipher[0] if cipher else "")

    def log_if_not_started(self, program: str, argv, outcome) -> None:
        # Every login or message fails the same way until someone looks: say
        # so at error level, with the path (docs/monitoring.md "Monitoring").
        if outcome.not_started:
            self.log.say(ERROR, events.PROGRAM_ERROR, program=program, path=argv[0],
                         reason=outcome.error
                         or f"{outcome.describe()}, a command it runs did not start")

    def stderr_logger(self, program: str):
        def log_line(line: str) -> None:
            self.log.say(INFO, events.PROGRAM_OUTPUT, program=program, stderr=line)
        return log_line

    # --- verbs ---------------------------------------------------------------

    @requires()
    def smtp_EHLO(self, arg: str) -> Reply:
        self.helo = syntax.helo_name(arg)
        self.esmtp = True
        self._reset_transaction()  # RFC 5321 §4.1.4: EHLO implies RSET
        keywords = ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                    f"SIZE {self.settings.max_message_size}"]
        if not self.tls_version:
            keywords.append("STARTTLS")
        if self.programs.auth and (self.tls_version or not self.settings.require_tls):
            # RFC 4954 §4: exactly the mechanisms AUTH accepts.
            keywords.append("AUTH " + " ".join(self.settings.auth_mechanisms))
        return replies.ehlo(self.settings.hostname, clean(self.helo, 64), keywords)

    @requires()
    def smtp_HELO(self, arg: str) -> Reply:
        self.helo = syntax.helo_name(arg)
        self.esmtp = False
        self._reset_transaction()
        return replies.helo(self.settings.hostname)

    @requires(HELO_DONE, NO_TLS_YET, outside_mail(replies.TLS_IN_TRANSACTION))
    def smtp_STARTTLS(self, arg: str) -> Optional[Reply]:
        if arg.strip():
            return replies.SYNTAX
        self._send(replies.READY_TLS)
        with self._deadline(self.settings.timeout):
            self.stream.flush()
        # Anything pipelined after STARTTLS was sent in the clear and could be
        # an attacker's injection (CVE-2011-0411): drop it, never execute it.
        dropped = self.stream.discard_buffer()
        if dropped:
            self.log.say(WARNING, events.STARTTLS_DISCARDED, octets=dropped)
        self._handshake()
        self._reset_session()
        return None

    @requires(AUTH_ENABLED, HELO_DONE, outside_mail(replies.AUTH_IN_TRANSACTION),
              NOT_AUTHENTICATED, TLS_UP, LOGINS_ALLOWED)
    def smtp_AUTH(self, arg: str) -> Union[Reply, Told]:
        answer = login.authenticate(self, arg)
        if type(answer) is Told and answer.event is events.AUTH:
            self.user = self._session_of = answer.fields["user"]
        return answer

    def challenge(self, prompt: str, limit: int) -> str:
        """Send a 334 and read one response line of at most `limit` octets
        without its line end (RFC 4954 §4)."""
        self.stream.write(f"334 {prompt}\r\n".encode("ascii"))
        try:
            raw = self._wait_for_line(self._next_line)
        except LineTooLong:
            raise SmtpError(replies.LINE_TOO_LONG) from None
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if len(line) > limit:
            raise SmtpError(replies.LINE_TOO_LONG)
        return line.decode("ascii", "replace").strip()

    def login_failed(self, told: Told) -> None:
        """A failed login (535), as soon as the AUTH exchange knows it: its
        line written, the failure counted and the pause taken, before
        anything more is said to the client.  A token's error challenge
        comes after this, so a client that hangs up there, or a stop during
        the pause, cannot take the failure back (docs/auth-program.md "OAuth 2 tokens")."""
        self.log.say(told.level, told.event, **told.fields)  # the line fail2ban reads
        told.said = True
        self.auth_failures += 1
        # Counted per address too: a reconnect must not reset it (docs/limits.md "Limits and abuse").
        self.limits.login_failed(self.address_key)
        # A pause before answering makes password guessing slow (docs/dialogue.md "The dialogue").
        gevent.sleep(self.settings.auth_failure_delay)

    @requires(HELO_DONE, TLS_UP, AUTHENTICATED, outside_mail(replies.NESTED_MAIL),
              SPOOL_HAS_ROOM, SendingRoom(messages=1, recipients=1))
    def smtp_MAIL(self, arg: str) -> Union[Reply, Told]:
        address, params = syntax.parse_path(arg, "FROM", replies.BAD_SENDER)
        for name, value in params.items():
            if name == "SIZE":
                if not value.isdigit():
                    return replies.SYNTAX
                if int(value) > self.settings.max_message_size:
                    return replies.TOO_BIG
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.SYNTAX
            elif name not in ("SMTPUTF8", "AUTH"):  # AUTH=<> is parsed and ignored
                return replies.UNKNOWN_PARAMETER
        self.mail_from = address
        self.rcpt_to = []
        return Told(replies.SENDER_OK, INFO, events.MAIL, {"mail_from": address})

    # The recipients this transaction holds are not taken until DATA.
    @requires(IN_MAIL, SendingRoom(messages=0, recipients=1))
    def smtp_RCPT(self, arg: str) -> Union[Reply, Told]:
        address, params = syntax.parse_path(arg, "TO", replies.BAD_RECIPIENT, need_domain=True)
        if not address:
            return replies.BAD_RECIPIENT
        if params:
            return replies.UNKNOWN_PARAMETER
        if len(self.rcpt_to) >= self.settings.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        self.rcpt_to.append(address)
        return Told(replies.RECIPIENT_OK, INFO, events.RCPT, {"rcpt_to": address})

    @requires(IN_MAIL, HAS_RCPT)
    def smtp_DATA(self, arg: str) -> Union[Reply, Told]:
        if arg.strip():
            return replies.SYNTAX
        started = time.monotonic()
        envelope = Envelope(self.client_addr, self.helo, self.esmtp, self.tls_version,
                            self.user, self.mail_from, list(self.rcpt_to))
        # Whatever the outcome, this transaction is over (RFC 5321 §4.1.1.4).
        self._reset_transaction()
        self._send(replies.START_DATA)
        with self._deadline(self.settings.timeout):
            self.stream.flush()
        message_spool = spool.Spool(self.settings.spool_dir)
        try:
            if self.settings.received_header:
                message_spool.write(received_header(envelope, self.settings.hostname,
                                                    self.session_id, time.time()))
            # The whole phase within --data-timeout, and each read within
            # --timeout like a command line: RFC 5321 §4.5.3.2 times DATA
            # blocks too, and a stranger stalled in DATA is a stranger.
            self.receiving_data = True
            try:
                result = self._wait_for_client(
                    self.settings.data_timeout,
                    lambda: dotreader.read_message(self.stream, self.settings.max_message_size,
                                                   message_spool, self._read_data),
                    phase=True)
            finally:
                self.receiving_data = False
            if result.status == dotreader.TOO_BIG:
                self.metrics.message(replies.TOO_BIG.code, result.size)
                return _message(replies.TOO_BIG, INFO, events.MESSAGE_TOO_BIG, envelope,
                                result.size, started, reason="over the size limit")
            if result.status == dotreader.BARE_LINE_ENDING:
                self.metrics.message(replies.BARE_LINE_ENDING.code, result.size)
                return _message(replies.BARE_LINE_ENDING, WARNING,
                                events.MESSAGE_BARE_LINE_ENDING, envelope, result.size,
                                started, reason="bare CR or LF")
            try:
                message = message_spool.reader()
            except OSError as e:
                self.metrics.message(replies.SPOOL_FAILED.code, result.size)
                return _message(replies.SPOOL_FAILED, ERROR, events.MESSAGE_NOT_SPOOLED,
                                envelope, result.size, started,
                                reason=f"cannot spool it: {e.strerror or e}")
            # Checked and taken in one step, as late as can be, so that
            # concurrent sessions never pass a limit together; given back
            # unless accepted (docs/limits.md "Accounts and limits").
            taken = ""
            if self.user is not None:
                limit, taken = self.limits.take_message(self.user, len(envelope.rcpt_to))
                if limit is not None:
                    self.metrics.message(replies.RATE_LIMITED.code, result.size)
                    told = _message(replies.RATE_LIMITED, WARNING, events.RATE_LIMITED,
                                    envelope, result.size, started)
                    return self.rate_limited("DATA", "", replies.RATE_LIMITED, limit,
                                              self.user, told.fields)
            self.running_program = True
            reply = None
            try:
                reply, outcome = self.programs.deliver(envelope, message,
                                                       self.stderr_logger("process"))
            finally:
                self.running_program = False
                if taken and (reply is None or reply.code != 250):
                    self.limits.give_back_message(self.user, taken)
            self.log_if_not_started("process", self.programs.process, outcome)
        finally:
            message_spool.close()
        self.metrics.message(reply.code, result.size, outcome.seconds)
        return _message(reply, INFO, events.MESSAGE, envelope, result.size, started,
                        **program_fields(outcome, "program_ms"))

    @requires()
    def smtp_RSET(self, arg: str) -> Reply:
        if arg.strip():
            return replies.SYNTAX
        self._reset_transaction()
        return replies.RESET_OK

    @requires()
    def smtp_NOOP(self, arg: str) -> Reply:
        return replies.OK

    @requires()
    def smtp_QUIT(self, arg: str) -> Reply:
        return replies.BYE

    @requires()
    def smtp_VRFY(self, arg: str) -> Reply:
        if not arg.strip():
            return replies.SYNTAX
        return replies.VRFY_ANSWER

    @requires()
    def smtp_HELP(self, arg: str) -> Reply:
        return replies.HELP


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _message(reply: Reply, level: int, event: events.Event, envelope: Envelope, size: int,
             started: float, **fields) -> Told:
    """The reply after the final dot, told as the `message` event whatever its code."""
    told = {"mail_from": envelope.mail_from, "rcpts": len(envelope.rcpt_to), "size": size,
            "code": reply.code, "enhanced": reply.enhanced, **fields,
            "duration_ms": _ms(time.monotonic() - started)}
    return Told(reply, level, event, told)


# Each verb's method by its upper-cased octets: one lookup per command.
_VERBS = {name[5:].encode("ascii"): (name[5:], method)
          for name, method in vars(Session).items() if name.startswith("smtp_")}
