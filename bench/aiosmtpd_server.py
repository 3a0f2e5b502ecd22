#!/usr/bin/env python3
"""The comparison server: the same job as ssmtpd, done the natural aiosmtpd way.

STARTTLS is required before AUTH and MAIL, AUTH PLAIN and LOGIN are decided by
the auth program, and each message is piped to the process program; both are
run with asyncio subprocesses and mapped to replies by the same exit-code
tables as ssmtpd (docs/auth-program.md "The auth program", docs/process-program.md "The process program"), with the same SSMTPD_* environment and a
Received: header on top, so the two servers do the same work per message.

Authentication: aiosmtpd 1.4's `authenticator=` callback is called
synchronously, so it cannot await a subprocess.  A handler may instead define
`async def auth_<MECHANISM>(self, server, args)`; aiosmtpd collects those from
the handler (overriding its built-in ones) and awaits them, and they may use
`server.challenge_auth()` for the 334 round trips.  That is the documented
extension point, and what is used here.

    python3 bench/aiosmtpd_server.py --port 8026 --hostname bench.test \\
        --ssl-cert cert.pem --ssl-key key.pem \\
        --auth bench/programs/auth.sh --process bench/programs/process.sh
"""

import argparse
import asyncio
import binascii
import email.utils
import logging
import os
import shlex
import signal
import ssl
import sys
import time
from base64 import b64decode

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

log = logging.getLogger("bench.aiosmtpd")

EX_TEMPFAIL = 75
EX_OSERR = 71
BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The same TLS policy as ssmtpd: 1.2 and newer, no renegotiation."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    return ctx


def last_line(out: bytes) -> str:
    for raw in reversed(out.splitlines()):
        text = "".join(chr(b) for b in raw if 32 <= b < 127).strip()
        if text:
            return text[:200]
    return ""


class ProgramHandler:
    """aiosmtpd handler that delegates AUTH and DATA to external programs."""

    # No attribute may start with "auth_": aiosmtpd would offer it as a mechanism.
    def __init__(self, login_program, process_program, hostname, login_timeout,
                 process_timeout):
        self.login_program = login_program
        self.process_program = process_program
        self.hostname = hostname
        self.login_timeout = login_timeout
        self.process_timeout = process_timeout

    async def _run(self, argv, env, timeout, stdin_parts=()):
        """Run a program; returns (exit status or None when abnormal, stdout)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, start_new_session=True,
                stdin=asyncio.subprocess.PIPE if stdin_parts else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            log.warning("%s: cannot start: %s", argv[0], e)
            return None, b""

        async def feed():
            try:
                for part in stdin_parts:
                    proc.stdin.write(part)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the program chose not to read it all; its exit decides
            finally:
                proc.stdin.close()

        async def talk():
            jobs = [proc.stdout.read(), proc.stderr.read()]
            if stdin_parts:
                jobs.append(feed())
            out, err = (await asyncio.gather(*jobs))[:2]
            await proc.wait()
            return out, err

        try:
            out, err = await asyncio.wait_for(talk(), timeout)
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            log.warning("%s: timed out, killed", argv[0])
            return None, b""
        for line in err.decode("utf-8", "replace").splitlines():
            log.warning("%s stderr: %s", argv[0], line[:1000])
        return (proc.returncode if proc.returncode >= 0 else None), out

    # --- AUTH: aiosmtpd awaits handler methods named auth_<MECHANISM> -----------

    async def auth_PLAIN(self, server, args):
        if len(args) == 1:
            blob = await server.challenge_auth("")
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(blob, bytes):  # the client cancelled; already answered
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return AuthResult(success=False, handled=False, message=BAD_CREDENTIALS)
        return await self._check(server, "PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, server, args):
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(server, "LOGIN", login, password)

    async def _check(self, server, mechanism, login: bytes, password: bytes):
        user = login.decode("utf-8", "replace")
        env = dict(os.environ, SSMTPD_USERNAME=user,
                   SSMTPD_PASSWORD=password.decode("utf-8", "replace"),
                   SSMTPD_MECHANISM=mechanism,
                   SSMTPD_CLIENT_ADDR=server.session.peer[0])
        status, _ = await self._run(self.login_program, env, self.login_timeout)
        if status == 0:
            return AuthResult(success=True, auth_data=LoginPassword(login, password))
        # handled=False: aiosmtpd is to send the message (its default is handled=True).
        if status is None or status == EX_TEMPFAIL:
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 Temporary authentication failure")
        return AuthResult(success=False, handled=False, message=BAD_CREDENTIALS)

    # --- DATA -----------------------------------------------------------------

    async def handle_DATA(self, server, session, envelope):
        login = getattr(session.auth_data, "login", None)
        user = login.decode("utf-8", "replace") if login else ""
        helo = session.host_name or ""
        tls = session.ssl.get("ssl_object").version() if session.ssl else ""
        peer = session.peer[0]
        literal = f"[IPv6:{peer}]" if ":" in peer else f"[{peer}]"
        received = (f"Received: from {helo} ({literal})\r\n"
                    f"\tby {self.hostname} (aiosmtpd) with ESMTP"
                    f"{'S' if tls else ''}{'A' if user else ''};\r\n"
                    f"\t{email.utils.formatdate(time.time(), localtime=True)}\r\n")
        env = dict(os.environ, SSMTPD_USERNAME=user, SSMTPD_MAIL_FROM=envelope.mail_from,
                   SSMTPD_RCPT_TO="\n".join(envelope.rcpt_tos), SSMTPD_CLIENT_ADDR=peer,
                   SSMTPD_HELO=helo, SSMTPD_TLS=tls)
        status, out = await self._run(
            self.process_program + [user], env, self.process_timeout,
            (received.encode("utf-8"), envelope.original_content))
        if status == 0:
            reply = "250 2.0.0"
            default = "Ok: message accepted"
        elif status is None or status in (EX_TEMPFAIL, EX_OSERR):
            reply, default = "451 4.3.0", "Try again later"
        else:
            reply, default = "554 5.3.0", "Message rejected"
        return f"{reply} {last_line(out) or default}"


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    handler = ProgramHandler(shlex.split(args.auth), shlex.split(args.process),
                             args.hostname, args.auth_timeout, args.process_timeout)
    ctx = tls_context(args.ssl_cert, args.ssl_key)

    def factory():
        return SMTP(handler, hostname=args.hostname, ident="aiosmtpd bench",
                    tls_context=ctx, require_starttls=True, auth_required=True,
                    auth_require_tls=True, data_size_limit=args.max_message_size,
                    enable_SMTPUTF8=True, timeout=args.timeout, loop=loop)

    server = await loop.create_server(factory, host=args.bind, port=args.port,
                                      backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.warning("listening on %s port %d", args.bind, args.port)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="aiosmtpd comparison server for the benchmark")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8026)
    p.add_argument("--hostname", default="bench.test")
    p.add_argument("--ssl-cert", required=True)
    p.add_argument("--ssl-key", required=True)
    p.add_argument("--auth", required=True)
    p.add_argument("--process", required=True)
    p.add_argument("--auth-timeout", type=float, default=30)
    p.add_argument("--process-timeout", type=float, default=300)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--max-message-size", type=int, default=26214400)
    p.add_argument("--child-watcher", choices=("pidfd", "threaded"), default="pidfd",
                   help="how asyncio learns that a program exited (pidfd is the "
                        "default from Python 3.12 on where the kernel has it)")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd 1.4 itself sets the deprecated Session.login_data on every
    # successful AUTH, and warns about it each time; an operator would mute that.
    logging.getLogger("mail.log").addFilter(
        lambda record: "login_data is deprecated" not in record.getMessage())
    if args.child_watcher == "pidfd" and hasattr(os, "pidfd_open") and sys.version_info < (3, 12):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
            asyncio.get_child_watcher()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
