#!/usr/bin/env python3
"""What --state costs: server CPU per message with the counts in the process
and with them in a local Redis (docs/limits.md "Accounts and limits").

Both servers run the per-user limits (set far above the load, so nothing is
refused): the difference is only where the windowed counts live.  Each round
starts both servers fresh, warms them up and sends the throughput load of
bench/run.py (C=50, one 4 KiB message a session), the order swapped every
round; redis-server is started once, on a loopback port, with its own
configuration (Debian's package; its service is not used).

    python3 bench/state_cost.py                # 3 rounds of 1,500 sessions
    python3 bench/state_cost.py --rounds 1 --sessions 300

Prints the median server CPU per message for each, the added cost, and
Redis's own CPU per message (not part of the server's figure).
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: the server wrapper and the loads)

LOCAL, SHARED = "counts in the process", "counts in Redis (--state)"
# High enough that the load is never refused, so every check still runs.
LIMITS = ["--max-messages-per-user", "10000000/1h", "--max-recipients-per-user", "10000000/1h"]


def start_redis(workdir: str):
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = run.free_port()
    conf = os.path.join(workdir, "redis.conf")
    with open(conf, "w") as f:
        f.write(f"bind 127.0.0.1\nport {port}\ndir {workdir}\nsave \"\"\nappendonly no\n"
                "daemonize no\nlogfile \"\"\n")
    proc = subprocess.Popen([binary, conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + run.START_TIMEOUT
    while True:
        try:
            with run.socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.05)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=50)
    opts = run.parse(["--sessions", str(0), "--warmup", "50"])  # run.py's defaults
    mine = p.parse_args(argv)
    opts.sessions, opts.concurrency = mine.sessions, mine.concurrency
    run.raise_fd_limit(4096)
    workdir = tempfile.mkdtemp(prefix="ssmtpd-state-bench-")
    redis, url = start_redis(workdir)
    figures = {LOCAL: [], SHARED: []}
    redis_ms = []
    try:
        cert, key = run.make_cert(workdir)
        extra = {LOCAL: LIMITS, SHARED: LIMITS + ["--state", url]}
        for round_no in range(mine.rounds):
            order = [LOCAL, SHARED] if round_no % 2 == 0 else [SHARED, LOCAL]
            for name in order:
                srv = run.ServerUnderTest(name, workdir, cert, key, extra[name], kind="ssmtpd")
                srv.start()
                try:
                    run.warm_up(srv, opts)
                    redis0 = sum(run.proc_cpu(redis.pid))
                    r = run.load_throughput(srv, opts)
                    redis1 = sum(run.proc_cpu(redis.pid))
                finally:
                    srv.stop()
                if r["failures"] or "server_ms_per_msg" not in r:
                    print(f"round {round_no + 1}, {name}: failures {r['failures']}",
                          file=sys.stderr)
                    continue
                figures[name].append(r["server_ms_per_msg"])
                if name == SHARED:
                    redis_ms.append((redis1 - redis0) * 1000 / max(r["accepted"], 1))
                print(f"round {round_no + 1}: {name}: {r['server_ms_per_msg']:.2f} ms "
                      f"server CPU per message, {r['accepted']} accepted", flush=True)
    finally:
        redis.send_signal(signal.SIGTERM)
        redis.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    if not figures[LOCAL] or not figures[SHARED]:
        print("no figures: every round failed", file=sys.stderr)
        return 1
    local, shared = (statistics.median(figures[n]) for n in (LOCAL, SHARED))
    print(f"\nC={opts.concurrency}, {opts.sessions} sessions of one {opts.size}-octet "
          f"message, median of {mine.rounds} rounds:")
    print(f"  {LOCAL}: {local:.2f} ms server CPU per message")
    print(f"  {SHARED}: {shared:.2f} ms (+{shared - local:.2f} ms, "
          f"x{shared / local:.2f}); Redis itself {statistics.median(redis_ms):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
