#!/usr/bin/env python3
"""The worker count as a dimension: ssmtpd --workers 1 against --workers N.

The same throughput load as bench/run.py (C=50 sessions of one 4 KiB message
each, STARTTLS + AUTH PLAIN, the same /bin/sh programs), against a fresh
server per round, alternating 1 N / N 1.  Server CPU is the master's and every
worker's own time, read from /proc while they run; the programs' CPU is
reported apart (each worker reaps its own).

    python3 bench/workers.py                 # --workers 1 vs 2, 3 rounds
    python3 bench/workers.py --workers 4 --rounds 5

Writes bench/WORKERS.md (see --out) and prints it.
"""

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
import run  # noqa: E402


def family(pid: int) -> List[int]:
    """The server process and its children (the workers; a single server has none
    that live long)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and "ssmtpd" in _cmdline(int(entry)):
                pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def cpu(pids: List[int]):
    """(own, reaped children) CPU seconds, summed over `pids`."""
    own = kids = 0.0
    for pid in pids:
        try:
            a, b = run.proc_cpu(pid)
        except OSError:
            continue
        own += a
        kids += b
    return own, kids


def measure(srv, opts) -> Dict:
    pids = family(srv.pid)
    own0, kids0 = cpu(pids)
    r = loadgen.run_load("127.0.0.1", srv.port, opts.concurrency, opts.sessions, opts.size,
                         processes=opts.processes, deadline=opts.deadline,
                         timeout=opts.socket_timeout)
    time.sleep(0.3)  # let the last programs be reaped
    own1, kids1 = cpu(pids)
    n = max(r["accepted"], 1)
    r["server_ms_per_msg"] = (own1 - own0) * 1000 / n
    r["programs_ms_per_msg"] = (kids1 - kids0) * 1000 / n
    r["client_ms_per_msg"] = r["client_cpu"] * 1000 / n
    r["processes"] = len(pids)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="the N to compare with 1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--processes", type=int, default=2, help="load generator processes")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--deadline", type=float, default=240.0)
    p.add_argument("--out", default=os.path.join(HERE, "WORKERS.md"))
    opts = p.parse_args(argv)
    opts.socket_timeout = 60.0
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    counts = [1, opts.workers]
    results: Dict[int, List[Dict]] = {c: [] for c in counts}
    workdir = tempfile.mkdtemp(prefix="ssmtpd-bench-")
    try:
        cert, key = run.make_cert(workdir)
        for i in range(opts.rounds):
            for count in (counts if i % 2 == 0 else counts[::-1]):
                srv = run.ServerUnderTest("ssmtpd", workdir, cert, key,
                                          ["--workers", str(count)]).start()
                try:
                    # Until every worker serves: the port opens before they do.
                    time.sleep(1.0 if count > 1 else 0)
                    run.warm_up(srv, opts)
                    r = measure(srv, opts)
                finally:
                    srv.stop()
                results[count].append(r)
                print(f"round {i + 1}: --workers {count}: {r['messages_per_s']:.0f} msg/s, "
                      f"server {r['server_ms_per_msg']:.2f} ms/msg, failures {r['failures']}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(count, key):
        return statistics.median(r[key] for r in results[count])

    lines = [
        "# --workers: throughput on this machine",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {opts.rounds} round(s), "
        f"{(time.monotonic() - t0) / 60:.1f} min",
        f"- machine: {run.machine()}",
        f"- command: `python3 bench/workers.py --workers {opts.workers}`",
        f"- load: C={opts.concurrency}, {opts.sessions} sessions of one {opts.size} B message, "
        f"STARTTLS + AUTH PLAIN, {opts.processes} load generator processes",
        "",
        "Medians over the rounds.  Server CPU = the master's and every worker's own "
        "utime+stime; programs = the auth and process programs the workers reaped.",
        "",
        "| workers | messages/s | server CPU ms/msg | programs ms/msg | client ms/msg |",
        "|---|---|---|---|---|",
    ]
    for count in counts:
        lines.append(f"| {count} | {med(count, 'messages_per_s'):.0f} | "
                     f"{med(count, 'server_ms_per_msg'):.2f} | "
                     f"{med(count, 'programs_ms_per_msg'):.2f} | "
                     f"{med(count, 'client_ms_per_msg'):.2f} |")
    ratio = statistics.median(b["messages_per_s"] / a["messages_per_s"]
                              for a, b in zip(results[1], results[opts.workers]))
    lines += ["", f"messages/s with --workers {opts.workers} over --workers 1: "
              f"{ratio:.2f}× (median of the paired rounds)", ""]
    run.publish("\n".join(lines), opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
