"""SIGUSR2 with one process: a worker of the new code takes over, then this
process becomes its master (docs/operations.md "Upgrading in place (SIGUSR2)").

The one process holds its sessions in its own memory, so it cannot replace
its image while they run.  It starts one worker of the installed code on the
same listening sockets, as a master of --workers would (arbiter.spawn_worker),
and serves that worker's channel from its own counts, so that the limits stay
whole.  Once the worker is ready, this process stops accepting and the worker
begins; this process's sessions drain (--graceful-timeout), and then it
replaces its image with the new code as the master of that one worker
(upgrade.replace_image).  From then on the server is a master and one
worker, and a later SIGUSR2 or SIGHUP takes the master's way.

Why not fork, keeping the sessions in a child while this process re-executes
at once: a program a session is running is this process's child, and a
forked copy cannot wait for it; the counts would split in two.
"""

import os
import signal
from typing import Callable, Optional

import gevent
from gevent.event import AsyncResult, Event

from ssmtpd import __version__, arbiter, events, handover, ledger, metrics, programs, upgrade

# How long the new worker may take to be ready before the upgrade is given up.
READY_WAIT = arbiter.READY_WAIT


def run_watched(argv, env, stdin: bytes = b""):
    """The one process's runner for upgrade.check: waited for as programs are."""
    said = []
    reading, writing = os.pipe()
    try:
        os.write(writing, stdin)  # a few KiB: the pipe holds them
        os.close(writing)
        writing = None
        with open(reading, "rb", closefd=False) as given:
            outcome = programs.run(argv, env, upgrade.CHECK_TIMEOUT, stdin=given,
                                   on_stderr=said.append)
    finally:
        os.close(reading)
        if writing is not None:
            os.close(writing)
    status = outcome.code if outcome.status == programs.EXITED else -1
    return status, outcome.last_line, "\n".join(said) or outcome.describe()


class Succession:
    """The upgrade of one process; `read_again()` gives (settings, tls) for
    the worker, or None (the reload's refusal is logged)."""

    def __init__(self, server, argv, logger, read_again: Callable[[], Optional[tuple]]):
        self.server = server
        self.argv = list(argv)
        self.log = logger
        self._read_again = read_again
        self.under_way = False
        self.reload_wanted = False  # a SIGHUP came meanwhile: the master reloads after
        self.upgrade_wanted = False  # and a SIGUSR2: it upgrades again
        self.pid: Optional[int] = None  # the worker's, once started
        self.handed_over = False  # it accepts, this process drains
        self._told = False  # the worker was told to accept
        self._finishing = False
        self._ledger: Optional[ledger.Ledger] = None
        self._ready = Event()
        self._exited = AsyncResult()
        self._watcher = None
        self._metrics_dir: Optional[metrics.Directory] = None
        self._settings = None
        self._tls = None

    def begin(self) -> None:
        """SIGUSR2: check the installed code, start its worker, hand over."""
        if self.server.stopping:
            events.note(self.log, events.WARNING, events.UPGRADE,
                        "SIGUSR2 ignored: the server is stopping")
            return
        if self.under_way:
            # Queued: the master this process becomes checks again.
            self.upgrade_wanted = True
            events.note(self.log, events.INFO, events.UPGRADE,
                        "SIGUSR2: another upgrade follows the one under way")
            return
        self.under_way = True
        self.server.successor = self
        events.note(self.log, events.INFO, events.UPGRADE,
                    "SIGUSR2: checking the installed code with the configuration")
        try:
            got = self._read_again()
            if got is None:
                raise upgrade.UpgradeError("the configuration read again is refused")
            self._settings, self._tls = got
            version = upgrade.check(self.argv, run_watched, self._running())
            if self.server.stopping:
                raise upgrade.UpgradeError("the server is stopping")
            self._start_worker()
            ready = gevent.wait([self._ready, self._exited], timeout=READY_WAIT, count=1)
            if self.server.stopping:
                raise upgrade.UpgradeError("the server is stopping")
            if not self._ready.is_set():
                raise upgrade.UpgradeError(
                    f"its worker (pid {self.pid}) "
                    + (f"{self._exited.get()} before it was ready" if ready
                       else f"was not ready within {READY_WAIT:.0f}s"))
        except (upgrade.UpgradeError, OSError, handover.HandoverError) as e:
            upgrade.refused(self.log, str(e))
            self._give_up()
            return
        self.handed_over = True
        self.server.hand_over(
            self._go,
            f"upgrade: a worker of ssmtpd {version} (pid {self.pid}) accepts; the "
            f"{{}} sessions here drain, then this process goes on with ssmtpd {version} "
            f"as its master")
        gevent.spawn(self._keep_worker)

    def _running(self) -> bytes:
        return handover.encode(self._settings, self._tls.pem)

    def _go(self) -> None:
        self._told = True
        self._ledger.go(self.pid)

    def _start_worker(self) -> None:
        state = handover.seal(self._running())
        try:
            handed = handover.offered(state)
        finally:
            os.close(state)
        try:
            if self._settings.metrics_bind and self._metrics_dir is None:
                # Not named in this process's environment: its own metrics stay its own.
                self._metrics_dir = metrics.Directory(export=False)
            if self._ledger is None:
                self._ledger = ledger.Ledger(self.server.local_limits,
                                             on_ready=lambda pid: self._ready.set())
            self.pid, master_end = arbiter.spawn_worker(
                1, self.server.listening_sockets(), handed, self.argv,
                None if self._metrics_dir is None else self._metrics_dir.fd)
        finally:
            handed.close()
        # Watched before the hub runs again, so that its end cannot be missed.
        loop = gevent.get_hub().loop
        loop.install_sigchld()
        self._ready.clear()
        self._told = False
        exited = self._exited = AsyncResult()
        watcher = self._watcher = loop.child(self.pid)
        watcher.start(lambda: exited.set(_described(watcher.rstatus)))
        self._ledger.attach(self.pid, master_end)
        events.note(self.log, events.INFO, events.WORKER, "worker 1 (pid %d) started",
                    self.pid, worker=1, pid=self.pid)

    def _keep_worker(self) -> None:
        """While this process drains, the worker is the one that accepts: one
        that dies is replaced, as a master replaces its workers."""
        while True:
            how = self._exited.get()
            if self._done():
                return
            events.note(self.log, events.ERROR, events.WORKER,
                        "worker 1 (pid %d) %s; starting another in %.0fs", self.pid, how,
                        arbiter.FIRST_BACKOFF, worker=1, pid=self.pid)
            self._forget_worker()
            while True:
                gevent.sleep(arbiter.FIRST_BACKOFF)
                if self._done():
                    return
                try:
                    self._start_worker()
                    break
                except (OSError, handover.HandoverError) as e:
                    events.note(self.log, events.ERROR, events.WORKER,
                                "worker 1: cannot start: %s", e, worker=1)
            gevent.wait([self._ready, self._exited], timeout=READY_WAIT, count=1)
            if self._ready.is_set() and not self._done():
                self._go()

    def _done(self) -> bool:
        return self.server.stopping or self._finishing

    def sighup(self) -> None:
        """A SIGHUP during the upgrade: the worker forgets its logins now; the
        configuration is read again once the upgrade is done."""
        self.reload_wanted = True
        if self._ledger is not None:
            self._ledger.forget_logins()

    def server_stopping(self) -> None:
        """SIGTERM or SIGINT (again): once the worker accepts, it stops too, at once."""
        if self.handed_over and self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _give_up(self) -> None:
        self.under_way = False
        self.server.successor = None
        if self.pid is not None:
            self._stop_worker(signal.SIGKILL)
        if self._metrics_dir is not None:
            self._metrics_dir.remove()
            self._metrics_dir = None
        # What was queued behind the upgrade is not lost with it.
        if self.reload_wanted and not self.server.stopping:
            self.reload_wanted = False
            gevent.spawn(self.server.reload)
        if self.upgrade_wanted and not self.server.stopping:
            self.upgrade_wanted = False
            gevent.spawn(self.begin)

    def _stop_worker(self, signum) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass
        self._exited.get()  # the worker drains within its own limits
        self._forget_worker()

    def _forget_worker(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._ledger is not None and self.pid is not None:
            self._ledger.detach(self.pid)
        self.pid = None

    def finish(self) -> int:
        """This process's sessions are done: go on as the master of the worker,
        or after SIGTERM, stop it with this process.  The exit status, if the
        master's image could not be started."""
        self._finishing = True
        if self.server.stopping:
            if self.pid is not None:  # told to stop by server_stopping()
                self._exited.get()
                self._forget_worker()
            if self._metrics_dir is not None:
                self._metrics_dir.remove()
            return 0
        server = self.server
        metrics_server = server.metrics_server
        workers = []
        if self.pid is not None:
            workers.append(upgrade.Worker(
                self.pid, 1, self._ledger.channel_fd(self.pid), serving=self._told,
                holdings=self._ledger.channel_holdings(self.pid), ready=self._ready.is_set()))
        inherited = upgrade.Inherited(
            __version__, [(sock.fileno(), implicit)
                          for sock, implicit in server.listening_sockets()],
            None if metrics_server is None else metrics_server.socket.fileno(),
            None if self._metrics_dir is None else self._metrics_dir.fd,
            workers, server.local_limits.snapshot(), self._running(),
            reload_wanted=self.reload_wanted, upgrade_wanted=self.upgrade_wanted)
        error = upgrade.replace_image(self.argv, inherited)
        # Nothing here serves any more: the worker stops, and so does this
        # process, for its supervisor to start the server again.
        upgrade.refused(self.log, f"this process cannot go on as the worker's master: {error}")
        upgrade.release_signals()
        if self.pid is not None:
            self._stop_worker(signal.SIGTERM)
        return 1


def _described(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
