"""SIGUSR2: going on with the code installed now, in the same process (docs/operations.md
"Upgrading in place (SIGUSR2)").

An upgrade has three steps, whatever the layout:

1. check(): the installed code is run as `python -m ssmtpd --version` and
   `--check-config` with the server's own arguments and environment, and is
   asked to read the running settings as a worker would.  If any of that
   fails, one ERROR line and nothing changes.
2. Workers of the new code take over the listening sockets: they are fresh
   interpreters, so they import what is installed now.  With --workers the
   master starts them as it does on SIGHUP, and the older ones drain.  With
   one process, that process becomes the master of one such worker for a
   while (succession.py) and drains its own sessions.
3. The master replaces its own image with execve(2): same PID (the one
   supervisord or systemd watches), same listening sockets, the workers
   still its children.  What it must not forget goes with it: the sockets,
   each worker's channel and what that worker holds, the counts of limits.py,
   and the settings and certificate the workers run (files changed since are
   a SIGHUP's business).  The descriptors are inherited; their numbers, and
   the few facts that fit, are in SSMTPD_UPGRADE; the rest is in a sealed
   memfd (handover.seal), as a worker's settings are.  Signals are held
   across the execve (hold_signals()).

The new master reads that (inherited()), adopts the workers, and logs
`upgraded from X to Y`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import gevent

from ssmtpd import events, handover

UPGRADE_ENV = "SSMTPD_UPGRADE"
# How long the installed code may take to say whether it would start.
CHECK_TIMEOUT = 60.0
# The counts may hold 100,000 addresses and every user's windows.
COUNTS_LIMIT = 1 << 28
COUNTS_NAME = "ssmtpd-upgrade-counts"
# How long the native threads of gevent's pool may take to end before an execve.
THREADS_END_WAIT = 2.0
# Signals that must wait while the new image starts: it has no handlers yet.
EXEC_BLOCKED = frozenset((signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2))
# Environment the server sets for its own children, not the installed code's business.
_OWN_ENV = ("SSMTPD_WORKER", UPGRADE_ENV, "PROMETHEUS_MULTIPROC_DIR")

# (argv, environment, stdin) -> (exit status, stdout, stderr)
Runner = Callable[[Sequence[str], dict, bytes], Tuple[int, str, str]]
# Run by the installed code with the running settings on stdin: whether it
# can take them over (handover.py's format may change between releases).
_TAKES_OVER = "import sys; from ssmtpd import handover; handover.decode(sys.stdin.buffer.read())"


class UpgradeError(Exception):
    """Why an upgrade cannot go on; str() is the reason for the ERROR line."""


def run_in_thread(argv: Sequence[str], env: dict, stdin: bytes = b"") -> Tuple[int, str, str]:
    """A master's runner: a native thread waits for exactly this child, so
    the master's own waitpid of its workers (arbiter.py) and this one never
    take each other's."""
    def run():
        try:
            done = subprocess.run(list(argv), env=env, input=stdin,
                                  capture_output=True, timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            return -1, "", f"no answer within {CHECK_TIMEOUT:.0f}s"
        except OSError as e:
            return -1, "", str(e)
        return (done.returncode, done.stdout.decode("utf-8", "replace"),
                done.stderr.decode("utf-8", "replace"))
    return gevent.get_hub().threadpool.apply(run)


def check(argv: Sequence[str], run: Runner, running: bytes) -> str:
    """The version of the installed code, once it has accepted the
    configuration as `--check-config` would, and the `running` settings
    (handover.encode()) it is to go on with; raises UpgradeError."""
    env = {name: value for name, value in os.environ.items() if name not in _OWN_ENV}
    python = [sys.executable, "-m", "ssmtpd"]
    status, out, err = run(python + ["--version"], env, b"")
    words = out.split()
    if status != 0 or len(words) != 2 or words[0] != "ssmtpd":
        raise UpgradeError(f"the installed code does not start: {_last_line(err or out)}")
    status, out, err = run(python + list(argv) + ["--check-config"], env, b"")
    if status != 0 or "configuration OK" not in out:
        raise UpgradeError(f"ssmtpd {words[1]} refuses the configuration: "
                           f"{_last_line(err or out)}")
    status, out, err = run([sys.executable, "-c", _TAKES_OVER], env, running)
    if status != 0:
        raise UpgradeError(f"ssmtpd {words[1]} cannot take over the running settings (a "
                           f"restart can): {_last_line(err or out)}")
    return words[1]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(it said nothing)"


@dataclass
class Worker:
    """One worker the new master adopts."""

    pid: int
    index: int
    channel: int  # descriptor of the master's end of its ledger channel
    serving: bool  # of the newest generation, told to accept clients
    drain_left: Optional[float] = None  # of an older one: seconds its drain may still take
    holdings: dict = field(default_factory=dict)  # ledger.Ledger.channel_holdings()
    ready: bool = True  # it said it can accept (to be told to, if not serving yet)


@dataclass
class Inherited:
    """What a master hands the image it replaces itself with."""

    version: str  # the code that handed over
    listeners: List[Tuple[int, bool]]  # (descriptor, implicit TLS)
    metrics_socket: Optional[int]
    metrics_dir: Optional[int]
    workers: List[Worker]
    counts: dict  # limits.Limits.snapshot()
    # The settings and certificate the newest workers run, as handover.encode()
    # gives them: the new master goes on with them, not with files that may
    # have changed since (a SIGHUP reads those).
    settings: bytes
    reload_wanted: bool = False  # a SIGHUP came during the upgrade
    upgrade_wanted: bool = False  # and a SIGUSR2

    def descriptors(self) -> List[int]:
        fds = [fd for fd, _ in self.listeners] + [w.channel for w in self.workers]
        return fds + [fd for fd in (self.metrics_socket, self.metrics_dir) if fd is not None]


def hold_signals() -> None:
    """Before the image is replaced: block the signals it must not lose, then
    let the loop hand those already caught to their handlers.  From then on
    one that comes waits, pending, for the image that follows (or for
    release_signals()).

    A mask is a thread's own: a native thread of gevent's pool (the check's
    runner, Redis calls of --state) would still take a signal, and its
    handler would run in a loop that never turns again.  So the pool ends
    first; one is made again if it is needed after all.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, EXEC_BLOCKED)
    hub = gevent.get_hub()
    pool = hub._threadpool  # gevent's attribute: reading `threadpool` would make one
    if pool is not None:
        pool.kill()
        del hub.threadpool
    deadline = time.monotonic() + THREADS_END_WAIT
    while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    # A caught signal runs its handler in a greenlet of its own: a few turns.
    for _ in range(3):
        gevent.sleep(0.01)


def release_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, EXEC_BLOCKED)


def replace_image(argv: Sequence[str], inherited: Inherited) -> UpgradeError:
    """execve(2) the installed code as the master, handing it `inherited`;
    signals are held (hold_signals()).

    Returns only if that failed: the error, with everything as it was.
    """
    description = asdict(inherited)
    bulk = {"counts": description.pop("counts"),
            "settings": description.pop("settings").decode("utf-8"),
            "holdings": [w.pop("holdings") for w in description["workers"]]}
    try:
        sealed = handover.seal(json.dumps(bulk).encode("ascii"), COUNTS_LIMIT, COUNTS_NAME)
    except (OSError, handover.HandoverError) as e:
        return UpgradeError(f"cannot hand over the counts: {e}")
    description["sealed"] = sealed
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the new master sets it from metrics_dir
    env[UPGRADE_ENV] = json.dumps(description)
    fds = inherited.descriptors() + [sealed]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        os.execve(sys.executable, [sys.executable, "-m", "ssmtpd", *argv], env)
    except OSError as e:
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(sealed)
        return UpgradeError(f"cannot start {sys.executable}: {e.strerror or e}")
    raise AssertionError("execve returned")  # pragma: no cover


def inherited() -> Optional[Inherited]:
    """In a master that an upgrade started: what the one before it handed
    over (removed from the environment, so no worker or program sees it);
    None in any other start.  Raises handover.HandoverError."""
    text = os.environ.pop(UPGRADE_ENV, None)
    if not text:
        return None
    try:
        description = json.loads(text)
        sealed = description.pop("sealed")
        try:
            bulk = json.loads(handover.read_sealed(sealed, COUNTS_LIMIT))
        finally:
            os.close(sealed)
        workers = [Worker(**w, holdings=held)
                   for w, held in zip(description.pop("workers"), bulk["holdings"])]
        listeners = [(int(fd), bool(tls)) for fd, tls in description.pop("listeners")]
        return Inherited(listeners=listeners, workers=workers, counts=bulk["counts"],
                         settings=bulk["settings"].encode("utf-8"), **description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise handover.HandoverError(
            f"{UPGRADE_ENV}: not what an upgrading master hands over ({e}); restart") from None


def upgraded(logger, before: str, after: str, what: str) -> None:
    """The line an upgrade ends with."""
    events.note(logger, events.INFO, events.UPGRADE, "upgraded from %s to %s: %s", before,
                after, what, version_before=before, version=after)


def refused(logger, why: str) -> None:
    events.note(logger, events.ERROR, events.UPGRADE,
                "upgrade refused, the running code stays: %s", why, reason=why)
