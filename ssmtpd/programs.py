"""Running an external program without blocking other clients.

docs/auth-program.md "The auth program" and "The process program".

`run()` is the only place that spawns, waits, times out and kills.  The child
gets its own process group, so a timeout or a leftover grandchild is ended by
killing the group, and it never runs through a shell.
"""

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import gevent
from gevent.event import AsyncResult, Event

# A program's environment: names and values as str or, already encoded, as bytes.
Environment = Mapping[Union[str, bytes], Union[str, bytes]]

# How much of a program's stdout we keep: only its last line matters.
STDOUT_TAIL = 8192
# How much stderr one run may put into the log before the rest is dropped;
# each line is charged for its log prefix too, so blank lines cannot flood it.
STDERR_LOG_LIMIT = 64 * 1024
LOG_LINE_OVERHEAD = 100
# After the program exits, how long leftover readers/writers may take.
DRAIN_GRACE = 2.0

EXITED = "exited"
SIGNALLED = "signalled"
TIMED_OUT = "timed-out"
NOT_STARTED = "not-started"
NO_SLOT = "no-slot"
# What a shell or wrapper exits with when the command it runs cannot start
# (126: found but not executable, 127: not found): the program did not start
# all the same, a temporary failure (docs/process-program.md "The process program").
CANNOT_EXEC_EXITS = (126, 127)


@dataclass(frozen=True)
class Outcome:
    status: str
    code: Optional[int] = None  # exit status, or signal number when signalled
    last_line: str = ""  # last non-empty printable stdout line, at most 200 chars
    seconds: float = 0.0
    error: str = ""  # why it could not start
    # The auth cache's answer, as the program gave it earlier: no run now
    # (docs/auth-program.md "The auth cache").
    cached: bool = False

    @property
    def not_started(self) -> bool:
        return self.status == NOT_STARTED or \
            (self.status == EXITED and self.code in CANNOT_EXEC_EXITS)

    def describe(self) -> str:
        if self.status == EXITED:
            return f"exit {self.code}"
        if self.status == SIGNALLED:
            return f"killed by signal {self.code}"
        if self.status == TIMED_OUT:
            return "timed out, killed"
        if self.status == NO_SLOT:
            return "not run: no free slot within the timeout"
        return f"could not start: {self.error}"


def last_line(tail: bytes) -> str:
    """The reply text a program may choose: printable ASCII, cut at 200."""
    for raw in reversed(tail.splitlines()):
        text = "".join(chr(b) for b in raw if 32 <= b < 127).strip()
        if text:
            return text[:200]
    return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.EPERM):
            raise


def kill_orphan(pid: int) -> bool:
    """Kill what is left of a run whose runner died: `pid` and its process
    group, if `pid` is still the leader of a session of its own, as a
    program is (not a process that took its number since); True if killed."""
    try:
        if os.getsid(pid) != pid:
            return False
    except OSError:
        return False
    _kill_group(pid)
    return True


def run(argv: Sequence[str], env: Environment, timeout: float,
        stdin=None, on_stderr: Callable[[str], None] = lambda line: None,
        capture_stdout: bool = True, started: Optional[float] = None,
        tracker=None) -> Outcome:
    """Run argv to completion within `timeout` seconds.

    `stdin` is None (empty) or a file with a real descriptor, handed to the
    child as it is.  Without `capture_stdout` the program's stdout is
    /dev/null and Outcome.last_line stays empty.  Outcome.seconds counts from
    `started` (a time.monotonic() value, by default now), so a caller that
    waited for a slot first can count that wait in.  A `tracker` is told
    each run's pid when it starts (`program_started`) and once it is gone
    (`program_ended`): with --workers, the master, which kills what a dead
    worker leaves running.
    """
    if started is None:
        started = time.monotonic()
    loop = gevent.get_hub().loop
    loop.install_sigchld()
    child_ends = []  # our copies of the child's pipe ends, closed once it has them
    ours = []  # our ends: _Output closes them, or we do if it never got them
    try:
        if stdin is None:
            stdin_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            child_ends.append(stdin_fd)
        else:
            stdin_fd = stdin.fileno()
        if capture_stdout:
            out_r, out_w = os.pipe()
            ours.append(out_r)
        else:
            out_r, out_w = None, os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        child_ends.append(out_w)
        err_r, err_w = os.pipe()
        ours.append(err_r)
        child_ends.append(err_w)
        pid = _spawn(argv, env, stdin_fd, out_w, err_w)
        # Watched before the hub runs again, so the exit status cannot be
        # reaped by the loop before anyone listens for it.
        exited = AsyncResult()
        watcher = loop.child(pid, False)
        watcher.start(lambda: exited.set(watcher.rstatus))
        if tracker is not None:
            tracker.program_started(pid)
    except (OSError, ValueError) as e:
        # No such program, out of descriptors or processes; ValueError: a NUL
        # in an argument or variable, which exec cannot take.
        for fd in ours:
            os.close(fd)
        return Outcome(NOT_STARTED, error=getattr(e, "strerror", None) or str(e),
                       seconds=time.monotonic() - started)
    finally:
        for fd in child_ends:
            os.close(fd)

    timed_out = False
    output = None
    try:
        output = _Output(loop, out_r, err_r, on_stderr)
        status = exited.get(timeout=timeout)
    except gevent.Timeout:
        timed_out = True
    finally:
        # Whatever happened, nothing of the program may outlive this call:
        # grandchildren that kept our pipes open included.
        _kill_group(pid)
        try:
            if not exited.ready():
                status = exited.get()
        finally:
            watcher.stop()
            if tracker is not None:
                tracker.program_ended(pid)
            if output is not None:
                output.finish(DRAIN_GRACE)
            else:
                for fd in ours:
                    os.close(fd)

    seconds = time.monotonic() - started
    if timed_out:
        return Outcome(TIMED_OUT, seconds=seconds)
    line = last_line(bytes(output.tail))
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return Outcome(SIGNALLED, -code, line, seconds)
    return Outcome(EXITED, code, line, seconds)


class _Output:
    """A program's stdout tail and stderr lines, read by event-loop callbacks.

    No greenlet per pipe: the loop calls `_readable` when a pipe has data or
    is closed, which costs a fraction of a greenlet's start and switches, and
    a program run is on the path of every message.  Both pipes are drained
    to their end whatever we keep, so the program never blocks on a full pipe.
    """

    def __init__(self, loop, out_fd: Optional[int], err_fd: int,
                 on_stderr: Callable[[str], None]):
        self.tail = bytearray()
        self._on_stderr = on_stderr
        self._logged = 0
        self._partial = b""
        self._drained = Event()
        self._watchers = {}
        for fd, take in ((out_fd, self._take_stdout), (err_fd, self._take_stderr)):
            if fd is not None:
                os.set_blocking(fd, False)
                watcher = loop.io(fd, 1)  # 1: readable
                self._watchers[fd] = watcher
                watcher.start(self._readable, fd, take)

    def _readable(self, fd: int, take) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        try:
            take(data)
        except Exception:  # noqa: BLE001
            # This runs in the event loop: an error would print a traceback
            # and stop the draining, and the program would block on a full pipe.
            pass

    def _close(self, fd: int) -> None:
        self._watchers.pop(fd).close()
        os.close(fd)
        if not self._watchers:
            self._flush_stderr()
            self._drained.set()

    def finish(self, grace: float) -> None:
        """Wait up to `grace` for both ends, then close whatever is still open."""
        try:
            if self._watchers:
                self._drained.wait(grace)
        finally:
            for fd in list(self._watchers):
                self._close(fd)

    def _take_stdout(self, data: bytes) -> None:
        tail = self.tail
        tail += data
        if len(tail) > STDOUT_TAIL:
            del tail[:-STDOUT_TAIL]

    def _take_stderr(self, data: bytes) -> None:
        if self._logged >= STDERR_LOG_LIMIT:
            return  # keep draining so the program never blocks on a full pipe
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[:STDERR_LOG_LIMIT]
        for raw in lines:
            if not raw.strip():
                continue
            self._logged += len(raw) + LOG_LINE_OVERHEAD
            self._on_stderr(raw.decode("utf-8", "replace"))
            if self._logged >= STDERR_LOG_LIMIT:
                self._on_stderr("[further stderr output dropped]")
                return

    def _flush_stderr(self) -> None:
        if self._partial.strip() and self._logged < STDERR_LOG_LIMIT:
            self._on_stderr(self._partial.decode("utf-8", "replace"))
        self._partial = b""


# Python ignores SIGPIPE and SIGXFSZ for itself; a program must start with the
# defaults (as subprocess's restore_signals does), and with nothing blocked.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT,
                    signal.SIGHUP)


def _spawn(argv: Sequence[str], env: Environment, stdin_fd: int, out_fd: int,
           err_fd: int) -> int:
    """posix_spawn in a new session: vfork-speed, whatever the size of the server.

    gevent.subprocess forks the whole interpreter and runs Python in the child
    before exec; at ~50 MiB of server that cost 5-10x more CPU per message
    (bench/spawn_cost.py).  Every descriptor of ours is close-on-exec (PEP 446;
    inherited ones are marked at start-up), so the child gets exactly 0, 1, 2.
    """
    actions = [(os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, out_fd, 1),
               (os.POSIX_SPAWN_DUP2, err_fd, 2)]
    return os.posix_spawnp(argv[0], list(argv), env, file_actions=actions,
                           setsid=True, setsigmask=(), setsigdef=_DEFAULT_SIGNALS)
