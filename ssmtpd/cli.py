"""Entry point: settings, logging, TLS, server; every start-up error is one line + exit 2."""

import os
import sys
from typing import Optional, Sequence

from ssmtpd import config, log
from ssmtpd.delivery import Programs
from ssmtpd.server import ListenError, Server
from ssmtpd.tls import TLSError, TLSHolder

EXIT_CONFIG = 2


def _fail(message: str) -> int:
    print(f"ssmtpd: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _descriptor_hygiene() -> None:
    """Programs are started with posix_spawn, which closes nothing itself.

    Descriptors we inherited (a supervisor's, a shell's) must not leak into
    them, and 0-2 must be open so that no pipe of ours is created as one.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: fd
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, already closed


def main(argv: Optional[Sequence[str]] = None) -> int:
    _descriptor_hygiene()
    try:
        settings = config.parse(argv)
    except config.ConfigError as e:
        return _fail(str(e))
    logger = log.setup(settings.log_level)
    try:
        tls = TLSHolder(settings.hostname, settings.ssl_cert, settings.ssl_key)
    except TLSError as e:
        return _fail(f"--ssl-cert: {e}")
    if tls.self_signed:
        logger.warning("no --ssl-cert/--ssl-key: using a self-signed certificate for %s; "
                       "clients will not be able to verify it", settings.hostname)
    if not settings.require_auth:
        logger.warning("--no-require-auth: anyone who connects may submit mail")
    programs = Programs(settings.auth, settings.process, settings.auth_timeout,
                        settings.process_timeout, dict(os.environ), settings.max_auth_programs)
    server = Server(settings, tls, programs, logger)
    try:
        server.start()
    except ListenError as e:
        return _fail(str(e))
    return server.serve_forever()
