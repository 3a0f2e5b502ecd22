"""The per-address counts of a server with --workers: kept by the master, asked by workers.

`--max-connections`, `--max-connections-per-ip` and the failed-login count
hold for the server as a whole (docs/scaling.md "Scaling"), so exactly one process may
keep them: the master holds the one `limits.Limits`, and each worker talks to
it over its own SOCK_SEQPACKET socket pair (message boundaries for free, and
EOF tells either side the other is gone).

Messages are one line of ASCII each:

    worker -> master   A <id> <key>   take a connection slot; answered
                       R <key>        release a slot
                       F <id> <key>   record a failed login; answered
                       U <id> <m> <r> <user>  room for m messages, r recipients?
                       T <id> <r> <user>      check and take a message with r
                                      recipients; answered "ok <ticket>" or
                                      the limit without room
                       G <ticket> <user>      give a message back
                       L <id> <user>  take a session slot of the user; answered
                       O <user>       release one
                       X <id> -       may a failing --state be logged
                                      now?  answered "1" or "0"
                       Y              this worker is ready to accept clients
                       Z              this worker accepts no more (after D)
    master -> worker   <id> <answer>  "ok" or a refusal reason; after F, the
                                      seconds the key is now blocked for
                       P <0|1>        the server is (not) under pressure
                       K <key> <s>    the key may not AUTH for <s> more seconds
                       G              accept clients (after Y)
                       C              SIGHUP: empty the auth cache
                       D              retire: accept no more, let the sessions
                                      finish (a reload started new workers)

A connection costs one round trip to the master and one message back:
about 100 µs of wall time, 85 µs of the worker's CPU and 65 µs of the
master's (bench/ledger_cost.py), against about 3 ms of server CPU per
message.  Whether a client may try AUTH is asked at every login, so the
master tells every worker of each blocked key instead of being asked: a
worker answers that from its own table.  A failure is answered, so the
worker that saw it knows of the block it caused before its client's next
command.  docs/scaling.md "Scaling" says what else was weighed and why this won.

A user travels as a keyed digest of the name as given (docs/limits.md
"Accounts and limits"): a name may be longer than a message, and hold any character;
the master never needs the name itself, only to tell names apart.
"""

import collections
import itertools
import socket
import time
from typing import Callable, Dict, Optional, Set, Tuple

import gevent
from gevent.event import AsyncResult

from ssmtpd import programs
from ssmtpd.limits import (MAX_TRACKED_ADDRESSES, MESSAGES, RECIPIENTS, SESSIONS, UNANSWERED,
                           Limits, UserKey, address_key, user_key)

MESSAGE_MAX = 512
# Messages the master handles from one worker before it lets the others run.
YIELD_EVERY = 64
# A master that does not answer within this long is treated as gone.
ASK_TIMEOUT = 10.0
REFUSED_MASTER_GONE = "master-gone"

def channel_pair():
    """(master end, worker end) of one worker's channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Ledger:
    """The master's side: one Limits, served to every worker's channel."""

    def __init__(self, limits: Limits, on_ready: Callable[[int], None] = lambda worker: None,
                 on_retired: Callable[[int], None] = lambda worker: None):
        self.limits = limits
        self._channels: Dict[int, "_Channel"] = {}
        self._pressure = False
        self._on_ready = on_ready  # a worker is ready to accept clients
        self._on_retired = on_retired  # a retiring worker accepts no more

    def attach(self, worker_id: int, sock) -> None:
        """Serve a new worker's channel (a plain socket; wrapped for gevent here)."""
        from gevent import socket as gsocket
        channel = _Channel(gsocket.socket(fileno=sock.detach()), worker_id)
        self._channels[worker_id] = channel
        channel.send(f"P {int(self._pressure)}")
        channel.reader = gevent.spawn(self._serve, channel)

    def adopt(self, worker_id: int, sock, held: dict) -> None:
        """Serve the channel of a worker started before an upgrade; `held` is
        what channel_holdings() gave for it there."""
        self.attach(worker_id, sock)
        channel = self._channels[worker_id]
        channel.held.update(held["held"])
        channel.user_sessions.update(held["user_sessions"])
        channel.programs.update(held["programs"])

    def channel_holdings(self, worker_id: int) -> dict:
        """What the worker's channel holds, as plain data (adopt())."""
        channel = self._channels[worker_id]
        return {"held": dict(channel.held), "user_sessions": dict(channel.user_sessions),
                "programs": sorted(channel.programs)}

    def channel_fd(self, worker_id: int) -> int:
        return self._channels[worker_id].sock.fileno()

    def forget_logins(self) -> None:
        """SIGHUP: every worker empties its auth cache."""
        self._tell_every_worker("C")

    def go(self, worker_id: int) -> None:
        """Tell a ready worker to accept clients."""
        self._send_to(worker_id, "G")

    def retire(self, worker_id: int) -> None:
        """Tell a worker to accept no more and drain gently."""
        self._send_to(worker_id, "D")

    def _send_to(self, worker_id: int, notice: str) -> None:
        channel = self._channels.get(worker_id)
        if channel is not None:
            channel.send(notice)

    def _tell_blocked(self, channel: "_Channel") -> None:
        """A new worker learns the keys blocked before it started."""
        # Counted per key looked at, blocked or not: the table may hold
        # 100,000 addresses, and the master must not stall on them.
        for looked_at, (key, left) in enumerate(self.limits.block_times(), 1):
            if left > 0:
                channel.send(_blocked_notice(key, left))
            if looked_at % YIELD_EVERY == 0:
                gevent.sleep(0)

    def detach(self, worker_id: int) -> int:
        """A worker is gone: whatever slots it held are free again, and the
        programs it was running are killed (its clients got no answer, and
        will send again: a message delivered anyway would be delivered twice).
        How many programs were killed."""
        channel = self._channels.pop(worker_id, None)
        if channel is None:
            return 0
        channel.reader.kill(block=False)
        channel.sock.close()
        for key, count in channel.held.items():
            for _ in range(count):
                self.limits.release(key)
        for user, count in channel.user_sessions.items():
            for _ in range(count):
                self.limits.user_session_closed(UserKey(user))
        self._broadcast_pressure()
        return sum(programs.kill_orphan(pid) for pid in channel.programs)

    def _serve(self, channel: "_Channel") -> None:
        self._tell_blocked(channel)
        for handled in itertools.count(1):
            # A read that finds a message waiting does not yield: a busy
            # worker must not keep the master from the others and its signals.
            if handled % YIELD_EVERY == 0:
                gevent.sleep(0)
            try:
                data = channel.sock.recv(MESSAGE_MAX)
            except OSError:
                return
            if not data:
                return
            op, _, rest = data.decode("ascii", "replace").partition(" ")
            if op == "A":
                ident, _, key = rest.partition(" ")
                reason = self.limits.admit(key)
                if reason is None:
                    channel.held[key] += 1
                channel.send(f"{ident} {reason or 'ok'}")
                self._broadcast_pressure()
            elif op == "R" and channel.held[rest] > 0:
                channel.held[rest] -= 1
                if not channel.held[rest]:
                    del channel.held[rest]
                self.limits.release(rest)
                self._broadcast_pressure()
            elif op == "S" and rest.isdigit():
                channel.programs.add(int(rest))
            elif op == "E" and rest.isdigit():
                channel.programs.discard(int(rest))
            elif op == "Y":
                self._on_ready(channel.worker_id)
            elif op == "Z":
                self._on_retired(channel.worker_id)
            elif op == "X":
                ident, _, _ = rest.partition(" ")
                channel.send(f"{ident} {int(self.limits.state_failure_to_tell())}")
            elif op == "F":
                ident, _, key = rest.partition(" ")
                left = self.limits.login_failed(key)
                channel.send(f"{ident} {left:.3f}")
                if left > 0:
                    self._tell_every_worker(_blocked_notice(key, left))
            else:
                self._serve_user(channel, op, rest)

    def _serve_user(self, channel: "_Channel", op: str, rest: str) -> None:
        """The per-user operations (docs/limits.md "Accounts and limits")."""
        limits = self.limits
        if op == "U":
            ident, messages, recipients, user = _split(rest, 4)
            user = UserKey(user)
            if recipients.isdigit() and messages.isdigit():
                refused = limits.sending_refused(user, int(messages), int(recipients))
                channel.send(f"{ident} {refused or 'ok'}")
        elif op == "T":
            ident, recipients, user = _split(rest, 3)
            user = UserKey(user)
            if recipients.isdigit():
                refused, ticket = limits.take_message(user, int(recipients))
                channel.send(f"{ident} {refused or 'ok ' + ticket}")
        elif op == "G":
            count, stamp, user = _split(rest, 3)
            limits.give_back_message(UserKey(user), f"{count} {stamp}")
        elif op == "L":
            ident, user = _split(rest, 2)
            opened = limits.user_session_opened(UserKey(user))
            if opened:
                channel.user_sessions[user] += 1
            channel.send(f"{ident} {'ok' if opened else SESSIONS}")
        elif op == "O" and channel.user_sessions[rest] > 0:
            channel.user_sessions[rest] -= 1
            if not channel.user_sessions[rest]:
                del channel.user_sessions[rest]
            limits.user_session_closed(UserKey(rest))

    def _broadcast_pressure(self) -> None:
        pressure = self.limits.under_pressure
        if pressure != self._pressure:
            self._pressure = pressure
            self._tell_every_worker(f"P {int(pressure)}")

    def _tell_every_worker(self, notice: str) -> None:
        for channel in list(self._channels.values()):
            channel.send(notice, wait=False)


def _split(text: str, parts: int):
    """`parts` words, the last one all that is left; missing ones empty."""
    words = text.split(" ", parts - 1)
    return words + [""] * (parts - len(words))


def _blocked_notice(key: str, seconds: float) -> str:
    # Seconds left rather than a time: the two processes need no common clock.
    return f"K {key} {seconds:.3f}"


class _Channel:
    def __init__(self, sock, worker_id: int):
        self.sock = sock
        self.worker_id = worker_id
        self.held = collections.Counter()  # slots this worker holds, per key
        self.user_sessions = collections.Counter()  # its sessions, per user key
        self.programs: Set[int] = set()  # pids of the programs it runs now
        self.reader: Optional[gevent.Greenlet] = None

    def send(self, text: str, wait: bool = True) -> None:
        """An answer waits for room (only this worker's reader waits); a notice
        (pressure, a blocked address) to a stuck worker is dropped rather than
        stall the master."""
        try:
            self.sock.send(text.encode("ascii"), 0 if wait else socket.MSG_DONTWAIT)
        except OSError:
            pass  # the worker is gone or stuck; reaping detaches a dead one


class RemoteLimits:
    """A worker's side: the methods of limits.Limits, answered by the master,
    or for login_blocked from what the master has told."""

    def __init__(self, sock, ipv6_prefix_length: int, on_master_gone: Callable[[], None],
                 on_go: Callable[[], None] = lambda: None,
                 on_retire: Callable[[], None] = lambda: None,
                 on_forget: Callable[[], None] = lambda: None):
        from gevent import socket as gsocket
        self._sock = gsocket.socket(fileno=sock.detach())
        self.ipv6_prefix_length = ipv6_prefix_length
        self.under_pressure = False
        self._ids = itertools.count(1)
        self._answers: Dict[str, AsyncResult] = {}
        # Blocked keys as the master told them: key -> time.monotonic() it ends.
        self._blocked: Dict[str, float] = {}
        self._on_master_gone = on_master_gone
        self._on_go = on_go
        self._on_retire = on_retire
        self._on_forget = on_forget
        self._gone = False
        self._reader = gevent.spawn(self._read)

    def key(self, ip: str) -> str:
        return address_key(ip, self.ipv6_prefix_length)

    def admit(self, key: str) -> Optional[str]:
        answer = self._ask("A", key)
        return None if answer == "ok" else answer

    def release(self, key: str) -> None:
        self._tell(f"R {key}")

    def login_blocked(self, key: str) -> bool:
        # Without a master there is no count to trust: refuse, the client retries.
        if self._gone:
            return True
        ends = self._blocked.get(key)
        if ends is None:
            return False
        if ends > time.monotonic():
            return True
        del self._blocked[key]
        return False

    def ready(self) -> None:
        """Tell the master this worker can accept clients (it says when: G)."""
        self._tell("Y")

    def retired(self) -> None:
        """Tell the master this worker accepts no more clients (after D)."""
        self._tell("Z")

    def program_started(self, pid: int) -> None:
        self._tell(f"S {pid}")

    def program_ended(self, pid: int) -> None:
        self._tell(f"E {pid}")

    def login_failed(self, key: str) -> None:
        # Asked, not told: the session's next AUTH may come at once.
        self._note_blocked(key, self._ask("F", key))

    # A master that does not answer in time is slow, not a reason to refuse
    # mail: the message goes ahead (counted by the master when it gets to it).

    def sending_refused(self, user: str, messages: int, recipients: int) -> Optional[str]:
        answer = self._ask("U", f"{messages} {recipients} {user_key(user)}")
        return answer if answer in (MESSAGES, RECIPIENTS) else None

    def take_message(self, user: str, recipients: int) -> Tuple[Optional[str], str]:
        answer = self._ask("T", f"{recipients} {user_key(user)}")
        if answer in (MESSAGES, RECIPIENTS):
            return answer, ""
        return None, answer[3:] if answer.startswith("ok ") else ""

    def give_back_message(self, user: str, ticket: str) -> None:
        if ticket:
            self._tell(f"G {ticket} {user_key(user)}")

    def user_session_opened(self, user: str) -> bool:
        return self._ask("L", user_key(user)) != SESSIONS

    def user_session_closed(self, user: str) -> None:
        self._tell(f"O {user_key(user)}")

    def state_failure_to_tell(self) -> bool:
        # An unanswered question is a no: one line too few beats one per worker.
        return self._ask("X", "-") == "1"

    def _note_blocked(self, key: str, seconds: str) -> None:
        """The master said `key` is blocked for `seconds` more (text; "0" or
        a master-gone answer note nothing)."""
        try:
            left = float(seconds)
        except ValueError:
            return
        if not left > 0:
            return
        ends = time.monotonic() + left
        blocked = self._blocked
        # Re-inserted, so the table stays in the order blocks were last told,
        # and past the master's own bound the oldest goes first.
        ends = max(ends, blocked.pop(key, 0.0))
        if len(blocked) >= MAX_TRACKED_ADDRESSES:
            del blocked[next(iter(blocked))]
        blocked[key] = ends

    def _ask(self, op: str, key: str) -> str:
        if self._gone:
            return REFUSED_MASTER_GONE
        ident = str(next(self._ids))
        answer = self._answers[ident] = AsyncResult()
        late = False
        try:
            self._sock.send(f"{op} {ident} {key}".encode("ascii"))
            return answer.get(timeout=ASK_TIMEOUT)
        except OSError:
            self._lost()
            return REFUSED_MASTER_GONE
        except gevent.Timeout:
            # A slow master is not a dead one (that is EOF, which _read sees):
            # this one question is given up and the worker goes on.  An
            # admission the master makes later is given back at once, since
            # its client was refused.
            if op == "A":
                late = True
                answer.rawlink(lambda result: self._answered_late(ident, key, result.value))
            return UNANSWERED
        finally:
            if not late:
                self._answers.pop(ident, None)

    def _answered_late(self, ident: str, key: str, answer: str) -> None:
        self._answers.pop(ident, None)
        if answer == "ok":
            self.release(key)

    def _tell(self, text: str) -> None:
        if self._gone:
            return
        try:
            self._sock.send(text.encode("ascii"))
        except OSError:
            self._lost()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MESSAGE_MAX)
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            head, _, value = data.decode("ascii", "replace").partition(" ")
            if head == "P":
                self.under_pressure = value == "1"
            elif head == "K":
                key, _, seconds = value.rpartition(" ")
                self._note_blocked(key, seconds)
            elif head == "G":
                self._on_go()
            elif head == "D":
                self._on_retire()
            elif head == "C":
                self._on_forget()
            else:
                answer = self._answers.get(head)
                if answer is not None:
                    answer.set(value)

    def _lost(self) -> None:
        if self._gone:
            return
        self._gone = True
        for answer in self._answers.values():
            answer.set(REFUSED_MASTER_GONE)
        self._on_master_gone()
