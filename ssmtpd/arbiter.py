"""The master of --workers N: it binds, starts workers, replaces them, passes signals on.

The master serves no client itself (docs/scaling.md "Scaling").  It binds the ports
(so 587 and 465 need root only here), then starts N workers with
posix_spawn: each is a fresh `python -m ssmtpd` with the same arguments and
environment, plus SSMTPD_WORKER naming the descriptors it inherits: the
listening sockets, which every worker accepts on (the kernel hands each new
connection to one of them), its channel to the master's ledger of
per-address counts (ledger.py), and the socket its settings and certificate
come through (handover.py).  A fresh interpreter, rather than a fork of
this one, shares no event loop, greenlet or lock with the master.

Signals are queued by their handlers and acted on in the master's loop:
SIGTERM/SIGINT are passed to every worker, which drains as a single server
does, and the master exits 0 once all have.  SIGHUP reads the configuration
again (reload.py) and starts a new generation of workers with it on the same
sockets; the older one drains (docs/operations.md "Reloading (SIGHUP)").  A worker
that dies is replaced; one that dies soon after starting is replaced after a
growing pause, so a worker that cannot start does not spin.
"""

import collections
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Tuple

import gevent
from gevent.event import Event

from ssmtpd import __version__, events, handover, ledger, log, metrics, reload, upgrade
from ssmtpd.limits import Limits
from ssmtpd.server import (SHUTDOWN_GRACE, STARTING_BLOCKED, ListenError, bind_listeners,
                           serve_metrics)

WORKER_ENV = "SSMTPD_WORKER"
# A worker that lived shorter than this is taken to have crashed at start.
MIN_LIFETIME = 10.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
# The master wakes up at least this often to reap and respawn.
TICK = 0.25
# How long a reload waits for an older worker to say it stopped accepting
# before the new ones begin anyway (a worker too busy to answer).
ASK_WAIT = 10.0
# A new generation not ready this long after a reload began is stuck: the
# next SIGHUP replaces it rather than wait for it.
READY_WAIT = 60.0


@dataclass
class WorkerSpec:
    """What one worker inherits, encoded into SSMTPD_WORKER."""

    index: int
    listeners: List[Tuple[int, bool]]  # (descriptor, implicit TLS)
    ledger: int
    handover: int  # a socket: the sealed memfd of handover.py comes through it

    def encode(self) -> str:
        return ";".join([f"index={self.index}", f"ledger={self.ledger}",
                         f"handover={self.handover}",
                         "listen=" + ",".join(f"{fd}:{int(tls)}"
                                              for fd, tls in self.listeners)])

    @classmethod
    def decode(cls, text: str) -> "WorkerSpec":
        """Raises handover.HandoverError: a master of another version of ssmtpd
        (an upgrade installed under a running one) names other descriptors."""
        try:
            fields_ = dict(part.split("=", 1) for part in text.split(";"))
            listeners = [(int(fd), tls == "1") for fd, tls in
                         (item.split(":") for item in fields_["listen"].split(","))]
            return cls(int(fields_["index"]), listeners, int(fields_["ledger"]),
                       int(fields_["handover"]))
        except (KeyError, ValueError):
            raise handover.HandoverError(
                f"{WORKER_ENV} is not what this version's master sets: restart the "
                "master") from None

    def inherited(self):
        """(settings, (certificate PEM, key PEM)) as the master holds them; raises
        handover.HandoverError.  Only once this process is non-dumpable."""
        return handover.receive(self.handover)


def worker_spec_from_env() -> Optional[WorkerSpec]:
    """This process's WorkerSpec if the master started it; removed from the
    environment so that no program inherits it."""
    text = os.environ.pop(WORKER_ENV, None)
    return WorkerSpec.decode(text) if text else None


@dataclass
class _Slot:
    """One of the N places a worker fills."""

    index: int
    pid: Optional[int] = None
    started: float = 0.0
    backoff: float = 0.0
    due: float = 0.0  # when to start the next worker here
    ready: bool = False  # its worker can accept clients
    retired_at: Optional[float] = None  # of an older generation: when told to drain
    accepts_no_more: bool = False  # and it said it stopped accepting
    told_to_accept: bool = False
    drain_limit: float = 0.0  # by the settings it was started with

    def restart_later(self, crashed: bool) -> None:
        """At once after a worker that lived; after a doubling pause after one
        that died young or could not start, so a broken worker cannot spin."""
        self.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, 2 * self.backoff)) if crashed else 0.0
        self.due = time.monotonic() + self.backoff


class Arbiter:
    """Supervises settings.workers workers; `tls` is the master's TLSHolder (it
    has checked the certificate, or holds the self-signed one to share)."""

    def __init__(self, settings, tls, logger, argv: List[str],
                 adjust: Callable = lambda settings: settings):
        self.settings = settings
        self.tls = tls
        self.log = logger
        self.argv = list(argv)
        self._adjust = adjust  # what the machine imposes on settings read again
        self.stopping = False
        self.listeners: List[Tuple[object, bool]] = []
        self.ledger = ledger.Ledger(Limits(settings), on_ready=self._ready,
                                    on_retired=self._accepts_no_more)
        self._slots = [_Slot(i + 1) for i in range(settings.workers)]
        # Workers of earlier configurations: serving until the new ones
        # accept (retired_at None), then draining.
        self._older: List[_Slot] = []
        self._reloading = False
        self._reload_began = 0.0
        self._reload_wanted = False  # a SIGHUP came during a reload: one more after it
        self._handing_over = False  # the reload's older workers are told to stop accepting
        self._before = None  # while reloading: the settings of the workers serving
        self._before_tls = None  # and their certificate
        self._signals: Deque[int] = collections.deque()
        self._wake = Event()
        self._state: Optional[int] = None
        self._metrics_dir: Optional[metrics.Directory] = None
        self._metrics_server = None
        # SIGUSR2 (upgrade.py): checking the installed code, then a reload
        # whose workers run it, then this process goes on with it.
        self._checking = False
        self._upgrade_wanted = False  # a SIGUSR2 came while one was under way
        self._upgrade_to: Optional[str] = None  # the version checked

    def run(self, on_bound: Callable[[], None],
            inherited: Optional[upgrade.Inherited] = None) -> int:
        """Bind, start the workers and supervise them until SIGTERM/SIGINT; the exit status.

        `on_bound()` runs once the ports are bound, before any worker starts
        (where root and the capability to bind are given up).  Raises
        server.ListenError, or what on_bound raises, before any worker starts.
        After an upgrade, `inherited` is what the master before this image
        handed over: its sockets and workers are taken over instead.
        """
        # No SIGCHLD: libev's default loop owns that signal; dead workers are
        # found by polling waitpid every TICK instead.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            gevent.signal_handler(signum, self._queue, signum)
        # Blocked while an upgrade replaced the image; now they have handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, upgrade.EXEC_BLOCKED)
        if inherited is not None:
            self._adopt(inherited)
            on_bound()
        else:
            self.listeners = bind_listeners(self.settings)
            self._metrics_dir = self._serve_metrics()
            on_bound()
            self._say_listening()
        self._state = handover.seal(handover.encode(self.settings, self.tls.pem))
        return self._supervise()

    def _say_listening(self) -> None:
        """The start-up line of each port, with the version."""
        for sock, implicit in self.listeners:
            host, port = sock.getsockname()[:2]
            events.note(self.log, events.INFO, events.LISTENING,
                        "ssmtpd %s master %d: listening on %s port %d (%s), %d workers",
                        __version__, os.getpid(),
                        host, port, "implicit TLS" if implicit else "STARTTLS",
                        self.settings.workers, address=host, port=port,
                        tls_mode="implicit" if implicit else "starttls")

    def _supervise(self) -> int:
        stop_deadline = None
        killed = False
        while True:
            self._reap()
            self._handle_signals()
            if self.stopping:
                if not self._live():
                    break
                if stop_deadline is None:
                    # By each worker's own settings: an older one may have longer.
                    stop_deadline = time.monotonic() + max(
                        [self._drain_limit()] + [slot.drain_limit for slot in self._live()])
                elif time.monotonic() > stop_deadline and not killed:
                    self._kill_all(signal.SIGKILL, "did not stop in time")
                    killed = True
            else:
                self._start_due_workers()
                self._retire_older()
                if self._reload_wanted and not self._upgrading() \
                        and (not self._reloading or self._stuck()):
                    self._reload_wanted = False
                    self._reload()
                if self._upgrade_to is not None and self._reloading \
                        and not self._handing_over and self._stuck():
                    self._abandon_upgrade()
                if self._upgrade_wanted and not (self._reloading or self._checking
                                                 or self._upgrade_to):
                    self._upgrade_wanted = False
                    self._checking = True
                    gevent.spawn(self._check_upgrade)
            self._wake.wait(TICK)
            self._wake.clear()
        events.note(self.log, events.INFO, events.STOPPED, "master %d: all workers stopped",
                    os.getpid())
        if self._metrics_dir is not None:
            self._metrics_dir.remove()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return 0

    # --- signals, acted on in the loop, never in the handler ---------------------

    def _queue(self, signum) -> None:
        self._signals.append(signum)
        self._wake.set()

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGHUP and not self.stopping:
                self.ledger.forget_logins()  # at once, even if the reload must wait
            if signum == signal.SIGHUP and (self._upgrading()
                                            or self._reloading and not self._stuck()):
                # One reload at a time, and none during an upgrade; those asked
                # for meanwhile are one more after it (each would read the same
                # files).  An upgrade hands it on to the master it starts.
                self._reload_wanted = True
                continue
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = True
                events.note(self.log, events.INFO, events.SHUTDOWN,
                            "master %d: %s: stopping %d workers", os.getpid(),
                            signal.Signals(signum).name, len(self._live()))
                for sock, _ in self.listeners:
                    sock.close()  # the workers' copies keep serving until they drain
                self._kill_all(signal.SIGTERM)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                # Passed on as a second SIGTERM: each worker closes every
                # session that is not running a program.
                events.note(self.log, events.WARNING, events.SHUTDOWN,
                            "master %d: %s again: %d workers still draining; each closes its "
                            "sessions that are not running a program",
                            os.getpid(), signal.Signals(signum).name, len(self._live()))
                self._kill_all(signal.SIGTERM)
            elif signum == signal.SIGHUP and not self.stopping:
                self._reload()
            elif signum == signal.SIGUSR2 and not self.stopping:
                # Begun in the loop once no reload or upgrade is under way.
                self._upgrade_wanted = True

    # --- reload: a new generation of workers, then the old one drains -------------

    def _reload(self) -> bool:
        got = reload.read_again(self.argv, self.settings, self.tls, self.log,
                                workers_may_change=True, adjust=self._adjust)
        if got is None:
            return False
        try:
            state = handover.seal(handover.encode(got[0], got[1].pem))
        except OSError as e:
            events.note(self.log, events.ERROR, events.RELOAD,
                        "reload refused, the running configuration stays: cannot hand it "
                        "to workers: %s", e.strerror or e, reason=str(e))
            return False
        if self._before is None:  # of the generation serving now
            self._before, self._before_tls = self.settings, self.tls
        self.settings, self.tls = got
        log.setup(self.settings.log_level, format=self.settings.log_format)
        os.close(self._state)
        self._state = state
        # A generation that never came up (its workers keep dying at start)
        # is dropped for this one; the one serving keeps serving until then.
        pending = [slot for slot in self._slots if slot.pid is not None]
        if self._reloading:
            for slot in pending:
                slot.retired_at = time.monotonic()
                self.ledger.retire(slot.pid)
        self._older.extend(pending)
        self._slots = [_Slot(i + 1) for i in range(self.settings.workers)]
        self._reloading = True
        self._reload_began = time.monotonic()
        events.note(self.log, events.INFO, events.RELOAD,
                    "reload: starting %d workers with the configuration read now; the %d "
                    "running serve until they accept", len(self._slots),
                    sum(slot.retired_at is None for slot in self._older))
        return True

    def _ready(self, pid: int) -> None:
        for slot in self._slots:
            if slot.pid == pid:
                slot.ready = True
                # A first start, a worker replaced, or one replaced during a
                # reload's hand-over (the older workers already told to stop).
                if not self._reloading or self._handing_over:
                    self._tell_to_accept(slot)
                self._wake.set()

    def _tell_to_accept(self, slot: _Slot) -> None:
        if not slot.told_to_accept:
            slot.told_to_accept = True
            self.ledger.go(slot.pid)

    def _accepts_no_more(self, pid: int) -> None:
        for slot in self._older:
            if slot.pid == pid:
                slot.accepts_no_more = True
                self._wake.set()

    def _stuck(self) -> bool:
        """A reload whose new workers die at start, or are not ready in time:
        another may replace it."""
        return (any(slot.backoff > 0 for slot in self._slots)
                or time.monotonic() - self._reload_began > READY_WAIT)

    def _retire_older(self) -> None:
        """A reload's hand-over: once every new worker is ready, the older ones
        stop accepting; once they have, the new ones begin.  Clients that
        connect in between wait in the listening socket's queue, so each
        session runs wholly on one configuration, and the reload's line
        divides them.  An older worker that does not end within the drain
        limit is killed."""
        now = time.monotonic()
        if self._reloading and not self._handing_over \
                and all(slot.pid is not None and slot.ready for slot in self._slots):
            self._handing_over = True
            for slot in self._older:
                if slot.retired_at is None and slot.pid is not None:
                    slot.retired_at = now
                    self.ledger.retire(slot.pid)
        if self._handing_over:
            # A new worker that dies meanwhile does not hold the others back:
            # its replacement is told to accept once it is ready (_ready).
            told = [slot for slot in self._older if slot.retired_at is not None
                    and slot.pid is not None]
            if all(slot.accepts_no_more or now - slot.retired_at > ASK_WAIT for slot in told):
                self._reloading = self._handing_over = False
                # The server-wide limits change with the line, as the workers do.
                self.ledger.limits.reconfigure(self.settings)
                if self._upgrade_to is None:
                    reload.applied(self.log, f"{len(self._slots)} workers accept with the "
                                             f"configuration read now; {len(told)} older ones "
                                             "drain", self._before, self.settings)
                else:
                    events.note(self.log, events.INFO, events.UPGRADE,
                                "upgrade: %d workers of ssmtpd %s accept, %d older ones "
                                "drain; the master goes on with ssmtpd %s", len(self._slots),
                                self._upgrade_to, len(told), self._upgrade_to)
                self._before = self._before_tls = None
                for slot in self._slots:
                    if slot.pid is not None and slot.ready:
                        self._tell_to_accept(slot)
                if self._upgrade_to is not None:
                    self._go_on_with_new_code()
        for slot in self._older:
            if slot.pid is not None and slot.retired_at is not None \
                    and now - slot.retired_at > slot.drain_limit:
                self._signal(slot, signal.SIGKILL,
                             "of an earlier configuration did not stop in time")
                slot.retired_at = float("inf")  # killed once

    # --- upgrade: the reload above with workers of the installed code, then exec --

    def _upgrading(self) -> bool:
        return self._checking or self._upgrade_to is not None

    def _check_upgrade(self) -> None:
        events.note(self.log, events.INFO, events.UPGRADE,
                    "SIGUSR2: checking the installed code with the configuration")
        try:
            self._upgrade_to = upgrade.check(self.argv, upgrade.run_in_thread,
                                             handover.encode(self.settings, self.tls.pem))
        except upgrade.UpgradeError as e:
            upgrade.refused(self.log, str(e))
            return
        finally:
            self._checking = False
            self._wake.set()
        if self.stopping or not self._reload():
            self._upgrade_to = None

    def _abandon_upgrade(self) -> None:
        """The workers of the new code die at start or are not ready in time:
        they go, and the generation that still accepts stays, on its settings."""
        upgrade.refused(self.log, f"the workers of ssmtpd {self._upgrade_to} did not become "
                                  f"ready (they died at start, or took more than "
                                  f"{READY_WAIT:.0f}s)")
        now = time.monotonic()
        new = self._slots
        self._slots = [slot for slot in self._older if slot.retired_at is None]
        self._older = [slot for slot in self._older if slot.retired_at is not None]
        for slot in new:
            if slot.pid is not None:
                slot.retired_at = now
                self._older.append(slot)
                self._signal(slot, signal.SIGTERM)  # it never accepted
        self._fill_slots(self._before.workers)
        self.settings, self.tls = self._before, self._before_tls
        self._before = self._before_tls = None
        log.setup(self.settings.log_level, format=self.settings.log_format)
        try:
            state = handover.seal(handover.encode(self.settings, self.tls.pem))
            os.close(self._state)
            self._state = state
        except OSError:
            pass  # the new settings' state serves a replacement worker instead
        self._reloading = False
        self._upgrade_to = None

    def _fill_slots(self, count: int) -> None:
        """Empty places for the indices 1..count no worker holds: started when due."""
        taken = {slot.index for slot in self._slots}
        self._slots += [_Slot(index) for index in range(1, count + 1) if index not in taken]

    def _go_on_with_new_code(self) -> None:
        """The workers of the new code accept: this process becomes it too."""
        upgrade.hold_signals()
        if any(signum in (signal.SIGTERM, signal.SIGINT) for signum in self._signals):
            upgrade.release_signals()
            events.note(self.log, events.INFO, events.UPGRADE,
                        "upgrade: a stop came first; the master stays ssmtpd %s and stops",
                        __version__)
            self._upgrade_to = None
            return
        # Queued meanwhile: the new image acts on them.
        for signum in self._signals:
            self._reload_wanted |= signum == signal.SIGHUP
            self._upgrade_wanted |= signum == signal.SIGUSR2
        self._signals.clear()
        now = time.monotonic()
        workers = []
        for slot in self._live():
            older = slot in self._older
            workers.append(upgrade.Worker(
                slot.pid, slot.index, self.ledger.channel_fd(slot.pid),
                serving=not older and slot.told_to_accept,
                drain_left=max(0.0, slot.drain_limit - (now - slot.retired_at))
                if older and slot.retired_at is not None else None,
                holdings=self.ledger.channel_holdings(slot.pid), ready=slot.ready))
        inherited = upgrade.Inherited(
            __version__, [(sock.fileno(), implicit) for sock, implicit in self.listeners],
            None if self._metrics_server is None else self._metrics_server.socket.fileno(),
            None if self._metrics_dir is None else self._metrics_dir.fd,
            workers, self.ledger.limits.snapshot(),
            handover.encode(self.settings, self.tls.pem),
            reload_wanted=self._reload_wanted, upgrade_wanted=self._upgrade_wanted)
        error = upgrade.replace_image(self.argv, inherited)
        upgrade.release_signals()
        upgrade.refused(self.log, f"the workers run ssmtpd {self._upgrade_to}, the master "
                                  f"stays: {error}")
        self._upgrade_to = None

    def _adopt(self, inherited: upgrade.Inherited) -> None:
        """After an upgrade: take over what the master before this image had."""
        from gevent import socket as gsocket
        self.listeners = [(gsocket.socket(fileno=fd), implicit)
                          for fd, implicit in inherited.listeners]
        if inherited.metrics_dir is not None:
            self._metrics_dir = metrics.Directory.adopt(inherited.metrics_dir)
        if inherited.metrics_socket is not None and self.settings.metrics_bind:
            self._metrics_server = serve_metrics(
                self.settings, sock=gsocket.socket(fileno=inherited.metrics_socket))
        self.ledger.limits.restore(inherited.counts)
        now = time.monotonic()
        self._slots = []
        for worker in inherited.workers:
            slot = _Slot(worker.index, worker.pid, started=now - MIN_LIFETIME,
                         ready=worker.ready, told_to_accept=worker.serving,
                         drain_limit=self._drain_limit())
            if worker.drain_left is not None:
                slot.retired_at, slot.drain_limit = now, worker.drain_left
                slot.accepts_no_more = True
                self._older.append(slot)
            else:
                self._slots.append(slot)
            self.ledger.adopt(worker.pid, socket.socket(fileno=worker.channel), worker.holdings)
        for slot in self._slots:
            if slot.ready:  # it said so to the process before this image
                self._tell_to_accept(slot)
        self._fill_slots(self.settings.workers)
        # A configuration changed since the workers started: a reload fits them to it.
        self._reload_wanted = inherited.reload_wanted or len(self._slots) != self.settings.workers
        self._upgrade_wanted = inherited.upgrade_wanted
        serving = sum(slot.pid is not None for slot in self._slots)
        self._say_listening()
        upgrade.upgraded(self.log, inherited.version, __version__,
                         f"master {os.getpid()} took over {serving} serving workers and "
                         f"{len(self._older)} draining")

    def _kill_all(self, signum, why: str = "") -> None:
        for slot in self._live():
            self._signal(slot, signum, why)

    def _signal(self, slot: _Slot, signum, why: str = "") -> None:
        """Send `signum` to the worker of `slot`; with `why`, an ERROR line says so."""
        if why:
            events.note(self.log, events.ERROR, events.WORKER,
                        "worker %d (pid %d) %s; sending %s", slot.index, slot.pid, why,
                        signal.Signals(signum).name, worker=slot.index, pid=slot.pid)
        try:
            os.kill(slot.pid, signum)
        except ProcessLookupError:
            pass

    def _drain_limit(self) -> float:
        s = self.settings
        return (s.graceful_timeout + s.process_timeout + s.auth_timeout + s.auth_failure_delay
                + 2 * SHUTDOWN_GRACE)

    # --- workers -----------------------------------------------------------------

    def _live(self) -> List[_Slot]:
        return [slot for slot in self._slots + self._older if slot.pid is not None]

    def _reap(self) -> None:
        # Each worker by its pid: a check of an upgrade (upgrade.check) waits
        # for its own child, which must not be taken from it here.
        for slot in self._live():
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = slot.pid, None  # not ours to wait for: gone all the same
            if pid == 0:
                continue
            orphans = self.ledger.detach(pid)
            if orphans:
                events.note(self.log, events.ERROR, events.WORKER,
                            "worker %d (pid %d) died while running %d programs: killed them "
                            "(their clients got no answer and will send again)",
                            slot.index, pid, orphans, worker=slot.index, pid=pid)
            if self.settings.metrics_bind:
                metrics.worker_died(pid)
            slot.pid = None
            if slot in self._older:
                self._older.remove(slot)
                events.note(self.log, events.INFO, events.WORKER,
                            "worker %d (pid %d) of an earlier configuration stopped: %s",
                            slot.index, pid, _describe(status), worker=slot.index, pid=pid)
                continue
            if self.stopping:
                events.note(self.log, events.INFO, events.WORKER,
                            "worker %d (pid %d) stopped: %s", slot.index, pid,
                            _describe(status), worker=slot.index, pid=pid)
                continue
            slot.ready = slot.told_to_accept = False
            lived = time.monotonic() - slot.started
            slot.restart_later(crashed=lived < MIN_LIFETIME)
            events.note(self.log, events.ERROR, events.WORKER,
                        "worker %d (pid %d) %s after %.1fs; starting another in %.0fs",
                        slot.index, pid, _describe(status), lived, slot.backoff,
                        worker=slot.index, pid=pid)

    def _start_due_workers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.pid is None and slot.due <= now:
                self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        try:
            # Queued now, taken by the worker once it is non-dumpable.
            handed = handover.offered(self._state)
        except OSError as e:
            self._retry_later(slot, f"cannot hand it its settings: {e.strerror or e}")
            return
        try:
            slot.pid, master_end = spawn_worker(
                slot.index, self.listeners, handed, self.argv,
                None if self._metrics_dir is None else self._metrics_dir.fd)
        except OSError as e:
            self._retry_later(slot, e.strerror or str(e))
            return
        finally:
            handed.close()
        slot.started = time.monotonic()
        slot.drain_limit = self._drain_limit()
        self.ledger.attach(slot.pid, master_end)
        events.note(self.log, events.INFO, events.WORKER, "worker %d (pid %d) started",
                    slot.index, slot.pid, worker=slot.index, pid=slot.pid)

    def _retry_later(self, slot: _Slot, why: str) -> None:
        slot.restart_later(crashed=True)
        events.note(self.log, events.ERROR, events.WORKER,
                    "worker %d: cannot start: %s; trying again in %.0fs", slot.index, why,
                    slot.backoff, worker=slot.index)

    def _serve_metrics(self) -> Optional[metrics.Directory]:
        """With --metrics-bind: the directory the workers write their metrics to,
        named in their environment, and the master serving the sum."""
        if not self.settings.metrics_bind:
            return None
        directory = metrics.Directory(self.settings.identity)  # before root is given up
        try:
            self._metrics_server = serve_metrics(self.settings)
        except ListenError:
            for sock, _ in self.listeners:
                sock.close()
            directory.remove()
            raise
        return directory


def spawn_worker(index: int, listeners, handed, argv: List[str],
                 metrics_fd: Optional[int] = None):
    """Start a worker: (its pid, the master's end of its ledger channel).

    `handed` is the worker's end of a handover channel (handover.offered());
    the caller closes it.  Raises OSError.
    """
    master_end, worker_end = ledger.channel_pair()
    try:
        spec = WorkerSpec(index, [(sock.fileno(), implicit) for sock, implicit in listeners],
                          worker_end.fileno(), handed.fileno())
        inherited = [fd for fd, _ in spec.listeners] + [spec.ledger, spec.handover]
        if metrics_fd is not None:
            inherited.append(metrics_fd)
        env = dict(os.environ)
        env[WORKER_ENV] = spec.encode()
        if metrics_fd is not None:
            env[metrics.MULTIPROC_ENV] = f"/proc/self/fd/{metrics_fd}"
        # Inheritable only for the instant of the spawn: nothing else of ours
        # (and no program a worker starts) may keep these descriptors.
        for fd in inherited:
            os.set_inheritable(fd, True)
        try:
            # SIGHUP, SIGTERM, SIGINT and SIGUSR2 stay blocked until the worker
            # has its handlers (it unblocks them then).
            pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "ssmtpd", *argv], env,
                                 setsigmask=STARTING_BLOCKED)
        finally:
            for fd in inherited:
                os.set_inheritable(fd, False)
    except OSError:
        master_end.close()
        raise
    finally:
        worker_end.close()
    return pid, master_end


def _describe(status: Optional[int]) -> str:
    if status is None:
        return "ended (its exit status was not ours to read)"
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
