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


def main(argv: Optional[Sequence[str]] = None) -> int:
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
                        settings.process_timeout, dict(os.environ))
    server = Server(settings, tls, programs, logger)
    try:
        server.start()
    except ListenError as e:
        return _fail(str(e))
    return server.serve_forever()
