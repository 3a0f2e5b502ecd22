#!/usr/bin/env python3
"""What it costs a gevent process to start a short program, by method.

ssmtpd runs two programs per message, so how a child is started is on the hot
path.  This starts the same program many times from one gevent process made
to look like a busy server (the ssmtpd modules imported, `--ballast` MiB of
live Python objects on the heap, `--greenlets` idle greenlets), and reports per
start: wall time, the parent's own CPU, and the children's CPU (which includes
whatever a forked child does before it reaches exec).

Methods:
  gevent-popen    gevent.subprocess.Popen: os.fork() of the whole interpreter,
                  then Python code in the child up to exec (what ssmtpd uses)
  os-fork         os.fork() + os.execve() with nothing else in the child
  stdlib-popen    subprocess.Popen from the standard library (_posixsubprocess,
                  vfork where possible), waited for by a gevent child watcher
  posix-spawn     os.posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK)), waited
                  for by a gevent child watcher

Each method pipes stdout and stderr back and reads them to EOF, as a server
must.  Run:  python3 bench/spawn_cost.py [--count 300] [--ballast 64]
"""

import argparse
import os
import subprocess as std_subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import gevent  # noqa: E402
from gevent import os as gos  # noqa: E402
from gevent import subprocess as gsubprocess  # noqa: E402
from gevent.event import AsyncResult  # noqa: E402

DEFAULT_PROGRAM = os.path.join(HERE, "programs", "auth.sh")


def _read_all(fd: int) -> bytes:
    """Read a pipe to EOF without blocking the hub."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        data = gos.nb_read(fd, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


def _watch(pid: int) -> AsyncResult:
    """A gevent child watcher for pid; must be started before the hub runs again."""
    result = AsyncResult()
    watcher = gevent.get_hub().loop.child(pid, False)

    def done():
        watcher.stop()
        result.set(watcher.rstatus)
    watcher.start(done)
    return result


def run_gevent_popen(argv, env):
    p = gsubprocess.Popen(argv, stdin=gsubprocess.DEVNULL, stdout=gsubprocess.PIPE,
                          stderr=gsubprocess.PIPE, env=env, close_fds=True,
                          start_new_session=True)
    p.communicate()
    return p.returncode


def run_os_fork(argv, env):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    gevent.get_hub().loop.install_sigchld()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    status = _watch(pid)
    os.close(out_w)
    os.close(err_w)
    readers = [gevent.spawn(_read_all, out_r), gevent.spawn(_read_all, err_r)]
    rc = status.get()
    gevent.joinall(readers)
    return os.waitstatus_to_exitcode(rc)


def run_stdlib_popen(argv, env):
    gevent.get_hub().loop.install_sigchld()
    p = std_subprocess.Popen(argv, stdin=std_subprocess.DEVNULL, stdout=std_subprocess.PIPE,
                             stderr=std_subprocess.PIPE, env=env, close_fds=True,
                             start_new_session=True)
    status = _watch(p.pid)
    out_fd, err_fd = os.dup(p.stdout.fileno()), os.dup(p.stderr.fileno())
    p.stdout.close()
    p.stderr.close()
    readers = [gevent.spawn(_read_all, out_fd), gevent.spawn(_read_all, err_fd)]
    rc = status.get()
    p.returncode = os.waitstatus_to_exitcode(rc)  # the watcher reaped it
    gevent.joinall(readers)
    return p.returncode


def run_posix_spawn(argv, env):
    gevent.get_hub().loop.install_sigchld()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    # Every fd Python opens is close-on-exec (PEP 446), so nothing else leaks.
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    status = _watch(pid)
    os.close(out_w)
    os.close(err_w)
    readers = [gevent.spawn(_read_all, out_r), gevent.spawn(_read_all, err_r)]
    rc = status.get()
    gevent.joinall(readers)
    return os.waitstatus_to_exitcode(rc)


METHODS = {"gevent-popen": run_gevent_popen, "os-fork": run_os_fork,
           "stdlib-popen": run_stdlib_popen, "posix-spawn": run_posix_spawn}


def measure(method, argv, env, count, concurrency):
    todo = [count]

    def loop():
        while todo[0] > 0:
            todo[0] -= 1
            rc = method(argv, env)
            if rc != 0:
                raise RuntimeError(f"program exited {rc}")

    t0 = os.times()
    w0 = time.monotonic()
    gevent.joinall([gevent.spawn(loop) for _ in range(concurrency)], raise_error=True)
    wall = time.monotonic() - w0
    t1 = os.times()
    return {"wall_ms": wall * 1000 / count,
            "parent_ms": ((t1.user - t0.user) + (t1.system - t0.system)) * 1000 / count,
            "children_ms": ((t1.children_user - t0.children_user)
                            + (t1.children_system - t0.children_system)) * 1000 / count}


def make_ballast(mib: int):
    """Live objects like a server's: many small dicts, strings and bytes."""
    ballast = []
    size = 0
    i = 0
    while size < mib * 1024 * 1024:
        ballast.append({"id": i, "name": f"session-{i}", "buf": bytes(200), "lines": [i] * 8})
        size += 600
        i += 1
    return ballast


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=300, help="starts per method")
    p.add_argument("--concurrency", type=int, default=1,
                   help="greenlets starting programs at once")
    p.add_argument("--ballast", type=int, default=64, help="MiB of live Python objects")
    p.add_argument("--greenlets", type=int, default=1000, help="idle greenlets")
    p.add_argument("--program", default=DEFAULT_PROGRAM)
    p.add_argument("--methods", default=",".join(METHODS))
    a = p.parse_args(argv)

    import ssmtpd.server  # noqa: F401  (the server's modules, as in production)
    ballast = make_ballast(a.ballast)
    parked = [gevent.spawn(gevent.sleep, 3600) for _ in range(a.greenlets)]
    gevent.sleep(0)
    env = dict(os.environ, SSMTPD_USERNAME="bench", SSMTPD_PASSWORD="bench-password",
               SSMTPD_MECHANISM="PLAIN", SSMTPD_CLIENT_ADDR="127.0.0.1")
    argv_ = [a.program]
    print(f"process RSS {rss_mib():.0f} MiB ({len(ballast)} ballast objects, "
          f"{len(parked)} greenlets), program {a.program}, {a.count} starts per method, "
          f"concurrency {a.concurrency}")
    print(f"{'method':14} {'wall ms/start':>14} {'parent CPU ms':>14} {'children CPU ms':>16}")
    for name in a.methods.split(","):
        method = METHODS[name]
        measure(method, argv_, env, 10, 1)  # warm-up
        r = measure(method, argv_, env, a.count, a.concurrency)
        print(f"{name:14} {r['wall_ms']:14.3f} {r['parent_ms']:14.3f} {r['children_ms']:16.3f}")
    gevent.killall(parked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
