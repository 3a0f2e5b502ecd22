#!/usr/bin/env python3
"""SMTP submission load generator.

Drives full submission sessions (connect, EHLO, STARTTLS, EHLO, AUTH PLAIN,
then MAIL, RCPT, DATA of S octets per message, QUIT) against one server and
reports messages/s, session latency percentiles, failures by reply code and
its own CPU.

The load is split over several worker processes, each running gevent
greenlets, so the client never queues behind one interpreter's GIL: two cores
are enough to keep a single-process server busy.  Workers are plain
subprocesses of this file talking one JSON line at a time over stdin/stdout;
they are started, made ready (body built, TLS context loaded), and only then
told to go, so set-up cost never lands inside the measured window.

Used by bench/run.py; also usable by hand:

    python3 bench/loadgen.py --port 8025 --concurrency 50 --sessions 2000 --size 4096
"""

import argparse
import base64
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

USER = "bench"
PASSWORD = "bench-password"
LINE = 76  # body line length before CRLF, as a mail client would wrap


# --- the body ------------------------------------------------------------------

def make_body(size: int) -> bytes:
    """A message of `size` octets (at least its headers), CRLF lines, already
    dot-stuffed for the wire and followed by the terminator.

    One line in 64 starts with a dot so the servers' unstuffing has work.
    """
    out = bytearray(b"From: bench <bench@client.test>\r\n"
                    b"To: <rcpt@bench.test>\r\n"
                    b"Subject: load test\r\n"
                    b"Message-ID: <bench@client.test>\r\n"
                    b"\r\n")
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789 "
    filler = alphabet * (LINE // len(alphabet) + 2)
    n = 0
    while size - len(out) >= 3:
        width = min(LINE, size - len(out) - 2)
        line = filler[n % len(alphabet):][:width]
        if n % 64 == 63:
            line = b"." + line[1:]
        out += line + b"\r\n"
        n += 1
    if len(out) < size:  # one or two octets short: lengthen the last line
        out[-2:-2] = b"x" * (size - len(out))
    # RFC 5321 §4.5.2 transparency: what the server unstuffs is `size` octets.
    return bytes(out).replace(b"\r\n.", b"\r\n..") + b".\r\n"


# --- worker side (runs in its own process, under gevent) ----------------------------

class Failed(Exception):
    """A session ended early; args[0] is the failure key (e.g. 'AUTH 454')."""


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def reply(self, step: str) -> int:
        """Read one (possibly multi-line) reply; returns its code."""
        while True:
            end = self.buf.find(b"\r\n")
            while end < 0:
                data = self.sock.recv(65536)
                if not data:
                    raise Failed(f"{step} closed")
                self.buf += data
                end = self.buf.find(b"\r\n")
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if len(line) < 4 or line[3:4] != b"-":
                try:
                    return int(line[:3])
                except ValueError:
                    raise Failed(f"{step} garbage") from None

    def expect(self, step: str, code: int) -> None:
        got = self.reply(step)
        if got != code:
            raise Failed(f"{step} {got}")

    def cmd(self, step: str, line: bytes, code: int) -> None:
        self.sock.sendall(line)
        self.expect(step, code)


def _open_tls(cfg, ctx, gsocket) -> Conn:
    """Connect, EHLO, STARTTLS and EHLO again; the socket is left in TLS."""
    sock = gsocket.create_connection((cfg["host"], cfg["port"]), timeout=cfg["timeout"])
    try:
        if cfg.get("nodelay"):
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        conn = Conn(sock)
        conn.expect("greeting", 220)
        conn.cmd("EHLO", b"EHLO client.test\r\n", 250)
        conn.cmd("STARTTLS", b"STARTTLS\r\n", 220)
        conn.sock = ctx.wrap_socket(sock)
        conn.buf = b""
        conn.cmd("EHLO", b"EHLO client.test\r\n", 250)
        return conn
    except BaseException:
        sock.close()
        raise


def _session(cfg, ctx, body: bytes, gsocket) -> int:
    """One full submission session; returns the number of messages accepted."""
    conn = _open_tls(cfg, ctx, gsocket)
    try:
        token = base64.b64encode(f"\0{cfg['user']}\0{cfg['password']}".encode())
        conn.cmd("AUTH", b"AUTH PLAIN " + token + b"\r\n", 235)
        for _ in range(cfg["messages"]):
            mail = b"MAIL FROM:<bench@client.test> SIZE=%d\r\n" % cfg["size"]
            rcpt = b"RCPT TO:<rcpt@bench.test>\r\n"
            if cfg["pipelining"]:
                # RFC 2920: MAIL, RCPT and DATA may go in one write.
                conn.sock.sendall(mail + rcpt + b"DATA\r\n")
                conn.expect("MAIL", 250)
                conn.expect("RCPT", 250)
                conn.expect("DATA", 354)
            else:
                conn.cmd("MAIL", mail, 250)
                conn.cmd("RCPT", rcpt, 250)
                conn.cmd("DATA", b"DATA\r\n", 354)
            conn.sock.sendall(body)
            conn.expect("message", 250)
        conn.cmd("QUIT", b"QUIT\r\n", 221)
        return cfg["messages"]
    finally:
        conn.sock.close()


def _failure_key(e: BaseException) -> str:
    if isinstance(e, Failed):
        return e.args[0]
    return "error " + type(e).__name__


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _send(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main() -> int:
    """One worker process: read its config, get ready, wait for 'go', run, report."""
    import gevent
    from gevent import socket as gsocket
    from gevent import ssl as gssl

    cfg = json.loads(sys.stdin.readline())
    # Not verifying keeps the client's share of the CPU small; the server's
    # certificate is not what is being measured.
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = gssl.CERT_NONE
    body = make_body(cfg["size"]) if cfg["mode"] == "sessions" else b""
    _send({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return 1

    if cfg["mode"] == "idle":
        return _idle(cfg, ctx, gevent, gsocket)

    latencies: List[float] = []
    failures: Dict[str, int] = {}
    accepted = 0
    todo = [cfg["sessions"]]

    def runner():
        nonlocal accepted
        while todo[0] > 0:
            todo[0] -= 1
            t0 = time.monotonic()
            try:
                # Not `accepted += _session(...)`: that reads `accepted` before the
                # call yields to the other greenlets, and loses their counts.
                n = _session(cfg, ctx, body, gsocket)
                accepted += n
                latencies.append(time.monotonic() - t0)
            except (Failed, OSError, gevent.Timeout) as e:
                key = _failure_key(e)
                failures[key] = failures.get(key, 0) + 1

    cpu0 = _cpu()
    start = time.monotonic()
    greenlets = [gevent.spawn(runner) for _ in range(cfg["concurrency"])]
    done = gevent.joinall(greenlets, timeout=cfg["deadline"])
    if len(done) < len(greenlets):
        gevent.killall(greenlets, block=True, timeout=5)
        failures["deadline"] = failures.get("deadline", 0) + max(todo[0], 0) + (
            len(greenlets) - len(done))
    end = time.monotonic()
    _send({"start": start, "end": end, "cpu": _cpu() - cpu0, "latencies": latencies,
           "failures": failures, "accepted": accepted})
    return 0


def _idle(cfg, ctx, gevent, gsocket) -> int:
    """Open cfg['sessions'] connections to just after STARTTLS+EHLO and hold them."""
    from gevent.pool import Pool
    conns = []
    failures: Dict[str, int] = {}

    def one(_):
        try:
            conns.append(_open_tls(cfg, ctx, gsocket))
        except (Failed, OSError, gevent.Timeout) as e:
            key = _failure_key(e)
            failures[key] = failures.get(key, 0) + 1

    start = time.monotonic()
    pool = Pool(cfg["concurrency"])
    with gevent.Timeout(cfg["deadline"], False):
        pool.map(one, range(cfg["sessions"]))
    pool.kill(block=True, timeout=5)
    _send({"held": len(conns), "failures": failures, "seconds": time.monotonic() - start})
    # Held until the parent has measured the server; then closed politely.
    sys.stdin.readline()
    for conn in conns:
        try:
            conn.sock.settimeout(2)
            conn.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
    for conn in conns:
        try:
            conn.sock.close()
        except OSError:
            pass
    _send({"released": len(conns)})
    return 0


# --- parent side -----------------------------------------------------------------

class Worker:
    def __init__(self, cfg: dict):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.tell(json.dumps(cfg))

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def tell(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=max(timeout, 0.1))
        except queue.Empty:
            raise TimeoutError("load worker did not answer in time") from None
        if line is None:
            raise RuntimeError(f"load worker exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _split(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _start_workers(mode: str, host: str, port: int, concurrency: int, sessions: int,
                   processes: int, deadline: float, timeout: float, **extra) -> List[Worker]:
    processes = max(1, min(processes, concurrency, sessions))
    workers = []
    try:
        for c, n in zip(_split(concurrency, processes), _split(sessions, processes)):
            cfg = dict(mode=mode, host=host, port=port, concurrency=c, sessions=n,
                       deadline=deadline, timeout=timeout, user=USER, password=PASSWORD,
                       size=0, messages=1, pipelining=False)
            cfg.update(extra)
            workers.append(Worker(cfg))
        for w in workers:
            w.read(60)  # ready
    except BaseException:
        for w in workers:
            w.proc.kill()
            w.close()
        raise
    return workers


def percentile(sorted_values: List[float], p: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = math.ceil(p / 100.0 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def run_load(host: str, port: int, concurrency: int, sessions: int, size: int,
             messages: int = 1, processes: int = 2, pipelining: bool = False,
             deadline: float = 300.0, timeout: float = 60.0, nodelay: bool = False,
             user: str = USER, password: str = PASSWORD) -> dict:
    """Run `sessions` full sessions, `concurrency` at a time; returns the figures."""
    workers = _start_workers("sessions", host, port, concurrency, sessions, processes,
                             deadline, timeout, size=size, messages=messages,
                             pipelining=pipelining, nodelay=nodelay, user=user,
                             password=password)
    try:
        for w in workers:
            w.tell("go")
        results = [w.read(deadline + 30) for w in workers]
    finally:
        for w in workers:
            w.close()
    latencies = sorted(x for r in results for x in r["latencies"])
    failures: Dict[str, int] = {}
    for r in results:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    accepted = sum(r["accepted"] for r in results)
    return {
        "sessions": sessions, "concurrency": concurrency, "size": size,
        "messages_per_session": messages, "accepted": accepted,
        "ok_sessions": len(latencies), "failures": failures, "seconds": wall,
        "messages_per_s": accepted / wall if wall > 0 else 0.0,
        "p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "client_cpu": sum(r["cpu"] for r in results),
    }


class IdleHold:
    """Hold `count` connections open after STARTTLS; close them on release()."""

    def __init__(self, host: str, port: int, count: int, processes: int = 2,
                 concurrency: int = 50, deadline: float = 120.0, timeout: float = 30.0):
        self.workers = _start_workers("idle", host, port, concurrency, count, processes,
                                      deadline, timeout)
        self.held = 0
        self.failures: Dict[str, int] = {}
        try:
            for w in self.workers:
                w.tell("go")
            for w in self.workers:
                r = w.read(deadline + 30)
                self.held += r["held"]
                for k, v in r["failures"].items():
                    self.failures[k] = self.failures.get(k, 0) + v
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for w in self.workers:
            try:
                w.tell("release")
                w.read(30)
            except (OSError, TimeoutError, RuntimeError, ValueError):
                w.proc.kill()
        for w in self.workers:
            w.close()


def format_result(r: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.1f} ms"
    lines = [
        f"{r['accepted']} messages in {r['seconds']:.2f} s: {r['messages_per_s']:.1f} messages/s",
        f"session latency p50 {ms(r['p50'])}, p90 {ms(r['p90'])}, p99 {ms(r['p99'])}",
        f"client CPU {r['client_cpu']:.2f} s "
        f"({r['client_cpu'] * 1000 / max(r['accepted'], 1):.2f} ms/message)",
        "failures: " + (", ".join(f"{k}: {v}" for k, v in sorted(r["failures"].items()))
                        or "none"),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        return worker_main()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", "-c", type=int, default=50)
    p.add_argument("--sessions", "-n", type=int, default=2000)
    p.add_argument("--size", type=int, default=4096, help="message size in octets")
    p.add_argument("--messages", type=int, default=1, help="messages per connection")
    p.add_argument("--processes", type=int, default=2, help="client worker processes")
    p.add_argument("--pipelining", action="store_true",
                   help="send MAIL, RCPT and DATA in one write (RFC 2920)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds the whole load may take")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout")
    p.add_argument("--nodelay", action="store_true",
                   help="set TCP_NODELAY on the client sockets (off: Nagle, as most clients)")
    p.add_argument("--user", default=USER, help="AUTH PLAIN user name")
    p.add_argument("--password", default=PASSWORD, help="AUTH PLAIN password")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    a = p.parse_args(argv)
    r = run_load(a.host, a.port, a.concurrency, a.sessions, a.size, a.messages,
                 a.processes, a.pipelining, a.deadline, a.timeout, a.nodelay, a.user,
                 a.password)
    print(json.dumps(r, indent=1) if a.json else format_result(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
