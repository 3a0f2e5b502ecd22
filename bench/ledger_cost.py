#!/usr/bin/env python3
"""What one connection slot costs a worker when the master keeps the counts.

With --workers, a worker asks the master's ledger for a slot at each new
connection (one round trip over a SOCK_SEQPACKET pair) and tells it when the
connection ends.  This runs a real master-side Ledger in another process and
times N admit + release pairs from this one, as a worker does:

    python3 bench/ledger_cost.py [N]

It prints the wall time per round trip and the CPU both processes spent per
connection; compare with the ~2.7 ms of server CPU a message costs on the
2-core test machine (docs/performance.md "Performance").
"""

import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MASTER = r"""
import socket, sys, types, gevent
from ssmtpd.ledger import Ledger
from ssmtpd.limits import Limits
settings = types.SimpleNamespace(ipv6_prefix_length=64, max_connections=10**9,
    max_connections_per_ip=10**9, max_auth_failures_per_ip=10, auth_failure_window=600,
    max_connection_rate_per_ip=(), max_messages_per_user=(), max_recipients_per_user=(),
    max_sessions_per_user=0)
ledger = Ledger(Limits(settings))
ledger.attach(1, socket.socket(fileno=int(sys.argv[1])))
gevent.wait()
"""


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    from ssmtpd import ledger
    master_end, worker_end = ledger.channel_pair()
    master = subprocess.Popen([sys.executable, "-c", MASTER, str(master_end.fileno())],
                              pass_fds=(master_end.fileno(),), env=dict(os.environ,
                                                                       PYTHONPATH=ROOT))
    master_end.close()
    limits = ledger.RemoteLimits(worker_end, 64, lambda: None)
    for _ in range(200):  # warm up: the master is importing
        limits.release(limits.key("192.0.2.1")) if limits.admit("192.0.2.1") is None else None
    with open(f"/proc/{master.pid}/stat") as f:
        before_master = f.read().rpartition(")")[2].split()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for i in range(count):
        key = f"192.0.2.{i % 250}"
        assert limits.admit(key) is None
        limits.release(key)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    with open(f"/proc/{master.pid}/stat") as f:
        after_master = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    master_cpu = sum(int(after_master[i]) - int(before_master[i]) for i in (11, 12)) / tick
    worker_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    master.kill()
    master.wait()
    print(f"{count} connections: {wall / count * 1e6:.1f} µs wall per slot round trip, "
          f"CPU per connection: worker {worker_cpu / count * 1e6:.1f} µs, "
          f"master {master_cpu / count * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
