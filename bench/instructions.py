#!/usr/bin/env python3
"""User-space instructions per session, counted by valgrind's callgrind.

The timing loads of run.py move by about ±10% between runs on a shared
machine, more than most single changes; an instruction count does not move
(two runs of the same commit agree to 0.01%).  It leaves out the kernel (the
system calls and the TCP stack) and says nothing of how fast an instruction
runs, so it complements run.py, never replaces it: use it to decide between
two versions of ssmtpd's own code.

    python3 bench/instructions.py                      # 40 full sessions
    python3 bench/instructions.py --ssmtpd-path DIR    # a modified copy of the package
    python3 bench/instructions.py --commands 900       # commands on one session instead

Needs valgrind (Debian: valgrind).  The server runs under callgrind with
collection off; it is switched on (callgrind_control) only around the
measured sessions, after five unmeasured ones have warmed everything up.
"""

import argparse
import base64
import collections
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402

BODY = (b"Subject: x\r\n\r\n" + b"y" * 74 + b"\r\n") * 50  # 4 KiB, as in run.py
WARM_UP = 5
RCPT = b"RCPT TO:<c@d.test>\r\n"
RECIPIENTS = 90


class Client:
    """A blocking SMTP client, one line per round trip, like the load generator's."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.reply()

    def reply(self) -> bytes:
        while True:
            line = self.file.readline()
            if line[3:4] != b"-":
                if not line:
                    raise ConnectionError("server closed the connection")
                return line

    def cmd(self, data: bytes, expect: bytes) -> None:
        self.sock.sendall(data)
        line = self.reply()
        if not line.startswith(expect):
            raise RuntimeError(f"{data[:20]!r}: {line!r}")

    def login(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.cmd(b"EHLO c\r\n", b"250")
        self.cmd(b"STARTTLS\r\n", b"220")
        self.file.close()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=run.HOSTNAME)
        self.file = self.sock.makefile("rb")
        self.cmd(b"EHLO c\r\n", b"250")
        token = base64.b64encode(f"\0{run.loadgen.USER}\0{run.loadgen.PASSWORD}".encode())
        self.cmd(b"AUTH PLAIN " + token + b"\r\n", b"235")

    def message(self) -> None:
        self.cmd(b"MAIL FROM:<a@b.test>\r\n", b"250")
        self.cmd(RCPT, b"250")
        self.cmd(b"DATA\r\n", b"354")
        self.cmd(BODY + b".\r\n", b"250")

    def close(self) -> None:
        self.cmd(b"QUIT\r\n", b"221")
        self.file.close()
        self.sock.close()


def full_session(port: int) -> None:
    client = Client(port)
    client.login()
    client.message()
    client.close()


def commands(client: Client, count: int) -> None:
    """RCPTs; every RECIPIENTS commands an RSET and a new MAIL, under --max-recipients."""
    for i in range(count):
        if i % RECIPIENTS == RECIPIENTS - 2:
            client.cmd(b"RSET\r\n", b"250")
        elif i % RECIPIENTS == RECIPIENTS - 1:
            client.cmd(b"MAIL FROM:<a@b.test>\r\n", b"250")
        else:
            client.cmd(RCPT, b"250")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=40, help="measured full sessions")
    p.add_argument("--commands", type=int, default=0,
                   help="measure this many commands on one TLS session instead of full "
                        "sessions: RCPTs, with an RSET and a MAIL every 90")
    p.add_argument("--ssmtpd-path", default=run.ROOT,
                   help="directory holding the ssmtpd package to measure")
    return p.parse_args(argv)


def by_object(out_file: str) -> collections.Counter:
    """Instructions per shared object, from callgrind_annotate's per-function list."""
    text = subprocess.run(["callgrind_annotate", "--threshold=100", out_file],
                          capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) .*\[([^\]]+)\]$", line)
        if m:
            counts[os.path.basename(m.group(2))] += int(m.group(1).replace(",", ""))
    return counts


def main(argv=None) -> int:
    opts = parse(argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"instructions.py: {tool} not found (Debian: apt-get install valgrind)",
                  file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix="ssmtpd-instructions-")
    out_file = os.path.join(workdir, "callgrind.out")
    cert, key = run.make_cert(workdir)

    class UnderCallgrind(run.ServerUnderTest):
        def argv(self, port):
            return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={out_file}"] + super().argv(port)

    # A fixed hash seed: the same dict layouts, hence the same count, every run.
    os.environ["PYTHONHASHSEED"] = "0"
    run.START_TIMEOUT = 120.0  # the interpreter starts some 50x slower under valgrind
    srv = UnderCallgrind("ssmtpd", workdir, cert, key, pythonpath=opts.ssmtpd_path).start()
    try:
        if opts.commands:
            client = Client(srv.port)
            client.login()
            client.cmd(b"MAIL FROM:<a@b.test>\r\n", b"250")
            commands(client, WARM_UP)
            unit, count = "command", opts.commands
        else:
            for _ in range(WARM_UP):
                full_session(srv.port)
            unit, count = "session", opts.sessions
        time.sleep(0.5)  # let the warm-up sessions end inside the server
        subprocess.run(["callgrind_control", "-i", "on", str(srv.pid)],
                       capture_output=True, check=True)
        if opts.commands:
            commands(client, count)
        else:
            for _ in range(count):
                full_session(srv.port)
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-i", "off", str(srv.pid)],
                       capture_output=True, check=True)
        if opts.commands:
            client.close()
    finally:
        srv.stop()  # callgrind writes its file as the server exits
    counts = by_object(out_file)
    total = sum(counts.values())
    print(f"ssmtpd at {opts.ssmtpd_path}: {total / count:,.0f} user-space instructions "
          f"per {unit} ({count} measured)")
    for name, n in counts.most_common(8):
        print(f"  {n / count:>12,.0f}  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
