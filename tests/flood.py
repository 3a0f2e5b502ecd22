"""A client that floods one server as fast as the socket takes it, for the fairness tests.

    python3 flood.py commands PORT SECONDS LINE   # LINE + CRLF, over and over
    python3 flood.py data PORT SECONDS SIZE       # MAIL, RCPT, DATA of SIZE octets, over and over

Runs in its own process so that the test's measuring client does not share its
interpreter.  Prints "flooding" once its first block is in the server's socket,
reconnects whenever the server closes, stops after SECONDS or at SIGTERM, and
then prints one JSON line: {"connections": n, "sent": octets}.
"""

import json
import signal
import socket
import sys
import threading
import time

BLOCK = 256 * 1024


def drain(sock, stop: threading.Event) -> None:
    """Read and drop replies so the server never blocks on a full send buffer.

    `sock` is a dup() of the sending socket: a timeout is a property of the
    socket object, and the sender must keep its own."""
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except socket.timeout:
            continue
        except OSError:
            return


def connect(port: int):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(4096)  # the greeting
    return sock


class Stop(Exception):
    """SIGTERM: the test has measured what it needed."""


def on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one Stop, raised once
    raise Stop()


# What the final JSON line reports; kept up to date, as SIGTERM may come at any point.
totals = {"connections": 0, "sent": 0}


def session(port: int, deadline: float, payload) -> None:
    """One connection: sends until the deadline or the server closes."""
    sock = connect(port)
    totals["connections"] += 1
    stop = threading.Event()
    reading = sock.dup()
    reader = threading.Thread(target=drain, args=(reading, stop), daemon=True)
    reader.start()
    try:
        for block in payload():
            if time.monotonic() >= deadline:
                break
            sock.sendall(block)
            totals["sent"] += len(block)
            if totals["sent"] >= BLOCK and not totals.get("started"):
                totals["started"] = True
                print("flooding", flush=True)
    except OSError:
        pass
    finally:
        stop.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        reader.join(2)
        reading.close()


def main() -> None:
    mode, port, seconds, arg = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    deadline = time.monotonic() + seconds
    if mode == "commands":
        line = arg.encode() + b"\r\n"
        block = line * (BLOCK // len(line))

        def payload():
            yield b"EHLO flood.test\r\n"
            while True:
                yield block
    else:
        size = int(arg)
        chunk = (b"x" * 998 + b"\r\n") * (BLOCK // 1000)

        def payload():
            yield b"EHLO flood.test\r\n"
            while True:
                yield b"MAIL FROM:<flood@example.org>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n"
                left = size
                while left > 0:
                    yield chunk
                    left -= len(chunk)
                yield b".\r\nRSET\r\n"

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        # A NOOP flooder is cut after 110 commands and reconnects: up to a
        # thousand connections a second.
        for _ in range(1000000):
            if time.monotonic() >= deadline:
                break
            try:
                session(port, deadline, payload)
            except OSError:
                time.sleep(0.01)
    except Stop:
        pass
    print(json.dumps({"connections": totals["connections"], "sent": totals["sent"]}),
          flush=True)


if __name__ == "__main__":
    main()
