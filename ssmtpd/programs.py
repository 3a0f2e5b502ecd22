"""Running an external program through gevent.subprocess (SPEC §3, §4).

`run()` is the only place that spawns, waits, times out and kills.  The child
gets its own process group, so a timeout or a leftover grandchild is ended by
killing the group, and it never runs through a shell.
"""

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import gevent
from gevent import subprocess

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


@dataclass(frozen=True)
class Outcome:
    status: str
    code: Optional[int] = None  # exit status, or signal number when signalled
    last_line: str = ""  # last non-empty printable stdout line, at most 200 chars
    seconds: float = 0.0
    error: str = ""  # why it could not start

    def describe(self) -> str:
        if self.status == EXITED:
            return f"exit {self.code}"
        if self.status == SIGNALLED:
            return f"killed by signal {self.code}"
        if self.status == TIMED_OUT:
            return "timed out, killed"
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


def run(argv: Sequence[str], env: Mapping[str, str], timeout: float,
        stdin=None, on_stderr: Callable[[str], None] = lambda line: None) -> Outcome:
    """Run argv to completion within `timeout` seconds.

    `stdin` is None (empty), an object with a real fileno() (handed to the
    child as is) or a readable file object (copied through a pipe).
    """
    started = time.monotonic()
    if stdin is None:
        stdin_arg = subprocess.DEVNULL
    elif _has_fileno(stdin):
        stdin_arg = stdin
    else:
        stdin_arg = subprocess.PIPE
    try:
        proc = subprocess.Popen(
            list(argv), stdin=stdin_arg, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env), close_fds=True, start_new_session=True)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return Outcome(NOT_STARTED, error=getattr(e, "strerror", None) or str(e),
                       seconds=time.monotonic() - started)

    tail = bytearray()
    helpers = [gevent.spawn(_read_tail, proc.stdout, tail),
               gevent.spawn(_read_stderr, proc.stderr, on_stderr)]
    if stdin_arg is subprocess.PIPE:
        helpers.append(gevent.spawn(_feed, proc.stdin, stdin))

    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # Whatever happened, nothing of the program may outlive this call:
        # grandchildren that kept our pipes open included.
        _kill_group(proc.pid)
        if timed_out or proc.returncode is None:
            proc.wait()
        gevent.joinall(helpers, timeout=DRAIN_GRACE)
        gevent.killall(helpers, block=True, timeout=DRAIN_GRACE)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    seconds = time.monotonic() - started
    if timed_out:
        return Outcome(TIMED_OUT, seconds=seconds)
    line = last_line(bytes(tail))
    if proc.returncode < 0:
        return Outcome(SIGNALLED, -proc.returncode, line, seconds)
    return Outcome(EXITED, proc.returncode, line, seconds)


def _has_fileno(f) -> bool:
    try:
        f.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _read_tail(pipe, tail: bytearray) -> None:
    while True:
        chunk = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
        if not chunk:
            return
        tail += chunk
        if len(tail) > STDOUT_TAIL:
            del tail[:-STDOUT_TAIL]


def _read_stderr(pipe, on_stderr) -> None:
    logged = 0
    partial = b""
    while True:
        chunk = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
        if not chunk:
            break
        if logged >= STDERR_LOG_LIMIT:
            continue  # keep draining so the program never blocks on a full pipe
        data = partial + chunk
        lines = data.split(b"\n")
        partial = lines.pop()[:STDERR_LOG_LIMIT]
        for raw in lines:
            if not raw.strip():
                continue
            logged += len(raw) + LOG_LINE_OVERHEAD
            on_stderr(raw.decode("utf-8", "replace"))
            if logged >= STDERR_LOG_LIMIT:
                on_stderr("[further stderr output dropped]")
                break
    if partial.strip() and logged < STDERR_LOG_LIMIT:
        on_stderr(partial.decode("utf-8", "replace"))


def _feed(pipe, source) -> None:
    try:
        while True:
            chunk = source.read(65536)
            if not chunk:
                break
            pipe.write(chunk)
    except (BrokenPipeError, ConnectionError, OSError):
        pass  # the program chose not to read it all; its exit code decides
    finally:
        try:
            pipe.close()
        except OSError:
            pass
