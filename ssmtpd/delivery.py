"""The two programs' contracts: environment, argv and the exit-code tables.

docs/auth-program.md "The auth program" and "The process program", as data.
"""

import dataclasses
import email.utils
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from gevent.lock import BoundedSemaphore

from ssmtpd import programs, replies
from ssmtpd.authcache import AuthCache
from ssmtpd.programs import Outcome
from ssmtpd.replies import Reply
from ssmtpd.sasl import TOKEN_MECHANISMS, Credentials

EX_TEMPFAIL = 75
EX_OSERR = 71

# docs/auth-program.md "The auth program", as data.  Exit 0 -> 235; tempfail / signal / timeout / no start
# (126 and 127 from a wrapper included) -> 454;
# any other exit -> 535.
AUTH_EXIT = {0: replies.AUTH_OK, EX_TEMPFAIL: replies.AUTH_TEMPFAIL}
AUTH_OTHER_EXIT = replies.BAD_CREDENTIALS
AUTH_ABNORMAL = replies.AUTH_TEMPFAIL

# docs/process-program.md "The process program", as data.  Exit 0 -> 250; 75, 71 / signal /
# timeout / no start (126 and 127 from a wrapper included) -> 451;
# any other exit -> 554.
PROCESS_EXIT = {0: replies.ACCEPTED, EX_TEMPFAIL: replies.PROCESS_TEMPFAIL,
                EX_OSERR: replies.PROCESS_TEMPFAIL}
PROCESS_OTHER_EXIT = replies.PROCESS_REJECTED
PROCESS_ABNORMAL = replies.PROCESS_TEMPFAIL

# Variables we set ourselves; an inherited copy is never passed through.
_OWN_VARIABLES = ("SSMTPD_USERNAME", "SSMTPD_PASSWORD", "SSMTPD_TOKEN", "SSMTPD_MECHANISM",
                  "SSMTPD_CLIENT_ADDR", "SSMTPD_MAIL_FROM", "SSMTPD_RCPT_TO", "SSMTPD_HELO",
                  "SSMTPD_TLS")


_UNSAFE_IN_HELO = re.compile(r'[\s<>()\[\]\\";@]')


@dataclass
class Envelope:
    """What the session knows about one message when its data is complete."""

    client_addr: str
    helo: str
    esmtp: bool  # EHLO rather than HELO
    tls: str  # protocol version, "" when plain
    username: Optional[str]
    mail_from: str
    rcpt_to: List[str] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        # RFC 3848 "with" keywords: S = TLS, A = authenticated; HELO is plain SMTP.
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.username is not None else "")


def program_fields(outcome: Outcome, duration: str) -> dict:
    """How a program run ended, for its AUTH or message line (docs/logging.md "Logging")."""
    fields = {"program_result": outcome.describe()}
    if outcome.status == programs.EXITED:
        fields["program_exit"] = outcome.code
    fields[duration] = round(outcome.seconds * 1000)
    return fields


def reply_for(outcome: Outcome, by_exit: Mapping[int, Reply], other: Reply,
              abnormal: Reply, use_text: bool) -> Reply:
    if outcome.status != programs.EXITED or outcome.not_started:
        reply = abnormal
    else:
        reply = by_exit.get(outcome.code, other)
    text = reply_text(outcome.last_line) if use_text else ""
    return reply.with_text(text) if text else reply


# A program may print a whole reply ("250 2.0.0 queued as 4711", as docs/process-program.md
# "The process program" suggests): the code is always ours, so what it printed of one is dropped,
# not repeated after ours.
_PRINTED_CODES = re.compile(r"^(?:\d{3}(?:[ -]|$))?\s*(?:[245]\.\d{1,3}\.\d{1,3}(?: |$))?\s*")


def reply_text(line: str) -> str:
    """The words of a program's last stdout line, without a reply or enhanced code."""
    return _PRINTED_CODES.sub("", line, count=1).strip()


def received_header(env: Envelope, hostname: str, session_id: str, now: float) -> bytes:
    """One Received: line (RFC 5321 §4.4), folded, with CRLF ends.

    No reverse DNS: a lookup per message would stall delivery on a slow
    resolver, and the address literal is what a reader trusts anyway.
    """
    addr = env.client_addr
    # The HELO name is the client's word: keep it from posing as another
    # clause, address literal or comment of the header.
    helo = _UNSAFE_IN_HELO.sub("?", env.helo)
    literal = f"[IPv6:{addr}]" if ":" in addr else f"[{addr}]"
    date = email.utils.formatdate(now, localtime=True)
    header = (f"Received: from {helo} ({literal})\r\n"
              f"\tby {hostname} (ssmtpd) with {env.protocol} id {session_id};\r\n"
              f"\t{date}\r\n")
    return header.encode("utf-8")


class Programs:
    """Runs the configured auth and process programs with a fixed base environment."""

    def __init__(self, auth: Optional[Sequence[str]], process: Sequence[str],
                 auth_timeout: float, process_timeout: float, base_env: Mapping[str, str],
                 max_auth_programs: int = 16, tracker=None,
                 auth_cache: Optional[AuthCache] = None):
        self.auth = tuple(auth) if auth else None
        # Only when it is on: a lookup costs an HMAC per login.
        self.auth_cache = auth_cache if auth_cache is not None and auth_cache.enabled else None
        self.tracker = tracker  # told of every run (programs.run)
        self.process = tuple(process)
        self.auth_timeout = auth_timeout
        self.process_timeout = process_timeout
        # Encoded once here, not by os.posix_spawn at every program start: it
        # takes bytes as they are, and a shell's environment can hold fifty
        # variables (docs/performance.md "Performance").  The few set per run stay str.
        self.base_env = {os.fsencode(k): os.fsencode(v) for k, v in base_env.items()
                         if k not in _OWN_VARIABLES}
        # An auth program may be expensive by design (scrypt: ~130 ms of CPU
        # and 16 MiB each); many logins at once must queue, not pile up.
        self._auth_slots = BoundedSemaphore(max_auth_programs)

    def authenticate(self, creds: Credentials, mechanism: str, client_addr: str,
                     on_stderr: Callable[[str], None]) -> Tuple[Reply, Outcome]:
        """Run the auth program, or take the auth cache's answer (Outcome.cached);
        waiting for a free slot counts against --auth-timeout."""
        started = time.monotonic()
        cache = self.auth_cache
        key = cache.key(mechanism, creds.username, creds.secret) if cache is not None else None
        if key is not None:
            generation = cache.generation
            hit = cache.get(key)
            if hit is not None:
                reply, outcome = hit
                return reply, dataclasses.replace(outcome, cached=True,
                                                  seconds=time.monotonic() - started)
        env = dict(self.base_env)
        secret = "SSMTPD_TOKEN" if mechanism in TOKEN_MECHANISMS else "SSMTPD_PASSWORD"
        env.update({"SSMTPD_USERNAME": creds.username, secret: creds.secret,
                    "SSMTPD_MECHANISM": mechanism, "SSMTPD_CLIENT_ADDR": client_addr})
        if not self._auth_slots.acquire(timeout=self.auth_timeout):
            outcome = Outcome(programs.NO_SLOT, seconds=time.monotonic() - started)
        else:
            try:
                left = self.auth_timeout - (time.monotonic() - started)
                outcome = programs.run(self.auth, env, left, on_stderr=on_stderr,
                                       capture_stdout=False, started=started,
                                       tracker=self.tracker)
            finally:
                self._auth_slots.release()
        reply = reply_for(outcome, AUTH_EXIT, AUTH_OTHER_EXIT, AUTH_ABNORMAL, False)
        if key is not None:
            cache.put(key, reply, outcome, generation)
        return reply, outcome

    def forget_logins(self) -> Optional[int]:
        """SIGHUP: every answer is asked of the program again (docs/operations.md "Signals");
        how many were held, or None without a cache."""
        if self.auth_cache is None:
            return None
        held = self.auth_cache.size
        self.auth_cache.clear()
        return held

    def deliver(self, envelope: Envelope, message,
                on_stderr: Callable[[str], None]) -> Tuple[Reply, Outcome]:
        env = dict(self.base_env)
        env.update(SSMTPD_USERNAME=envelope.username or "",
                   SSMTPD_MAIL_FROM=envelope.mail_from,
                   SSMTPD_RCPT_TO="\n".join(envelope.rcpt_to),
                   SSMTPD_CLIENT_ADDR=envelope.client_addr,
                   SSMTPD_HELO=envelope.helo,
                   SSMTPD_TLS=envelope.tls)
        argv = self.process + (envelope.username or "",)
        outcome = programs.run(argv, env, self.process_timeout, stdin=message,
                               on_stderr=on_stderr, tracker=self.tracker)
        return reply_for(outcome, PROCESS_EXIT, PROCESS_OTHER_EXIT, PROCESS_ABNORMAL, True), outcome

