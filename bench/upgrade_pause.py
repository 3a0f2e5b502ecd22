#!/usr/bin/env python3
"""What an upgrade in place costs the clients (docs/operations.md "Upgrading in place (SIGUSR2)").

A server runs from a copy of the package as version 0.0.1; clients connect
in a loop (greeting, EHLO, QUIT) from a few threads; halfway, version 0.0.2
is put in the copy's place and the server gets SIGUSR2.  Measured, for one
process and for --workers 2: how long the check and the hand-over take
(from the SIGUSR2 to the line after which new sessions are the new code's,
and to `upgraded from`), the time to the greeting of the connections made
within a second of the hand-over against all others, and how many
connections failed (there should be none).

    python3 bench/upgrade_pause.py                 # 3 rounds of each layout
    python3 bench/upgrade_pause.py --rounds 1 --clients 2
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: the server wrapper)

OLD, NEW = "0.0.1", "0.0.2"
LINE_TIME = r"^(\S+) INFO "


def install(site: str, version: str) -> None:
    """The package as `version` in site/ssmtpd, put there by renames as pip does."""
    staging = tempfile.mkdtemp(dir=site)
    shutil.copytree(os.path.join(ROOT, "ssmtpd"), os.path.join(staging, "ssmtpd"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = os.path.join(staging, "ssmtpd", "__init__.py")
    with open(init) as f:
        text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', f.read())
    with open(init, "w") as f:
        f.write(text)
    current = os.path.join(site, "ssmtpd")
    if os.path.exists(current):
        os.rename(current, os.path.join(staging, "replaced"))
    os.rename(os.path.join(staging, "ssmtpd"), current)


def when(log: str, pattern: str) -> float:
    match = re.search(LINE_TIME + pattern, log, re.M)
    if match is None:
        raise RuntimeError(f"no line {pattern!r} in the log:\n{log[-3000:]}")
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def clients(port: int, count: int, stop: threading.Event, out: list) -> list:
    def one():
        while not stop.is_set():
            began = time.time()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    f = s.makefile("rb")
                    greeting = f.readline()
                    greeted = time.time()
                    s.sendall(b"EHLO bench.test\r\n")
                    while not f.readline()[3:4] == b" ":
                        pass
                    s.sendall(b"QUIT\r\n")
                    f.readline()
                ok = greeting.startswith(b"220 ")
            except OSError:
                greeted, ok = time.time(), False
            out.append((began, greeted - began, ok))
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def one_round(workdir: str, cert: str, key: str, workers: int, opts) -> dict:
    site = tempfile.mkdtemp(prefix="site-", dir=workdir)
    install(site, OLD)
    srv = run.ServerUnderTest(f"ssmtpd-{workers}", workdir, cert, key, pythonpath=site,
                              kind="ssmtpd", workers=workers, extra=["--log-level", "info"])
    srv.start()
    stop, seen = threading.Event(), []
    threads = clients(srv.port, opts.clients, stop, seen)
    try:
        time.sleep(opts.seconds / 2)
        install(site, NEW)
        sent = time.time()
        os.kill(srv.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 120
        while f"upgraded from {OLD} to {NEW}" not in open(srv.log_path).read():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no upgrade:\n{srv.log_tail(40)}")
            time.sleep(0.05)
        time.sleep(opts.seconds / 2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        srv.stop()
    log = open(srv.log_path).read()
    handed_over = when(log, rf"upgrade: (?:a worker|\d+ workers) of ssmtpd {NEW}")
    upgraded = when(log, f"upgraded from {OLD} to {NEW}")
    near = [wait for began, wait, ok in seen if abs(began - handed_over) <= 1.0]
    far = [wait for began, wait, ok in seen if abs(began - handed_over) > 1.0]
    return {"to_hand_over": handed_over - sent, "to_upgraded": upgraded - sent,
            "near_max": max(near, default=0.0), "near_median": statistics.median(near or [0]),
            "far_median": statistics.median(far or [0]), "far_max": max(far, default=0.0),
            "connections": len(seen), "failed": sum(not ok for _, _, ok in seen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="of load in each round, the upgrade halfway")
    opts = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="ssmtpd-upgrade-")
    try:
        cert, key = run.make_cert(workdir)
        print("layout        SIGUSR2 to hand-over  to 'upgraded'  greeting near hand-over "
              "(median / max)  elsewhere (median / max)  connections  failed")
        for workers in (1, 2):
            results = [one_round(workdir, cert, key, workers, opts) for _ in range(opts.rounds)]

            def med(name):
                return statistics.median(r[name] for r in results)
            print(f"{'one process' if workers == 1 else '--workers 2':13} "
                  f"{med('to_hand_over'):8.2f} s             {med('to_upgraded'):6.2f} s      "
                  f"{med('near_median') * 1000:6.1f} / {med('near_max') * 1000:6.1f} ms"
                  f"                    {med('far_median') * 1000:5.1f} / "
                  f"{med('far_max') * 1000:6.1f} ms       "
                  f"{sum(r['connections'] for r in results):6d}  "
                  f"{sum(r['failed'] for r in results):6d}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
