"""Entry point: settings, logging, TLS, server; every start-up error is one line + exit 2."""

import dataclasses
import gc
import getpass
import os
import resource
import shlex
import socket
import sys
from typing import Optional, Sequence

import gevent
from gevent import socket as gsocket

from ssmtpd import (arbiter, config, events, handover, ledger, log, metrics, privileges,
                    reload, state, trial, upgrade)
from ssmtpd.authcache import AuthCache
from ssmtpd.delivery import Programs
from ssmtpd.sasl import TOKEN_MECHANISMS
from ssmtpd.server import ListenError, Server, fit_descriptor_limit
from ssmtpd.succession import Succession
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
    try:
        # Before the key, a worker's state or a client's message is in memory.
        privileges.forbid_dumps()
    except privileges.PrivilegeError as e:
        return _fail(str(e))
    _descriptor_hygiene()
    pem = None
    try:
        # A master that an upgrade started (upgrade.py) takes over, binds nothing.
        inherited = upgrade.inherited()
        worker = arbiter.worker_spec_from_env()
        if worker is not None:
            settings, pem = worker.inherited()
            # Its master gave up the capability to bind before starting it; a
            # Python given it by setcap(8) would give it to the worker again.
            privileges.give_up_capabilities()
        elif inherited is not None:
            # What the newest workers run; files changed since are a SIGHUP's.
            settings, pem = handover.decode(inherited.settings)
        else:
            settings = config.parse(argv)
    except (config.ConfigError, handover.HandoverError, privileges.PrivilegeError) as e:
        return _fail(str(e))
    logger = log.setup(settings.log_level, format=settings.log_format)
    if settings.try_auth is not None or settings.try_process is not None:
        return _try(settings)
    try:
        tls = TLSHolder(settings.hostname, settings.ssl_cert, settings.ssl_key, pem)
    except TLSError as e:
        return _fail(f"--ssl-cert: {e}")
    if settings.check_config:
        # Which file a bare program name found is what tells two installations apart.
        for option, program in (("--auth", settings.auth), ("--process", settings.process)):
            if program is not None:
                print(f"ssmtpd: {option} runs {shlex.join(program)}")
        if settings.state:
            # Reported, not an error: the server would count locally until
            # Redis answers (docs/limits.md "Accounts and limits").
            print(f"ssmtpd: --state {state.safe_url(settings.state)} "
                  f"{state.check(settings.state, settings.state_timeout)}")
        print("ssmtpd: configuration OK")
        return 0
    if worker is not None:
        return _serve(settings, logger, tls, worker)
    settings = _fit_descriptor_limit(settings, logger)
    bound = lambda: _after_binding(settings, tls, logger)  # noqa: E731
    argv = sys.argv[1:] if argv is None else list(argv)
    if settings.workers > 1 or inherited is not None:
        master = arbiter.Arbiter(settings, tls, logger, argv,
                                 adjust=lambda s: _fit_descriptor_limit(s, logger))
        if inherited is not None:
            # Root and the capability to bind were given up before the upgrade.
            bound = privileges.give_up_capabilities
        try:
            return master.run(bound, inherited)
        except (ListenError, config.ConfigError, privileges.PrivilegeError) as e:
            return _fail(str(e))
    return _serve(settings, logger, tls, on_bound=bound, argv=argv)


def _try(settings) -> int:
    """--try-auth, --try-process: one run of a program, as the server's own
    would be after start-up gave up root (docs/auth-program.md "The auth program")."""
    secret = b""
    if settings.try_auth is not None:
        noun = "token" if settings.try_mechanism in TOKEN_MECHANISMS else "password"
        secret = trial.read_secret(
            sys.stdin.buffer, lambda: getpass.getpass(f"{noun} for {settings.try_auth}: "))
    # The event loop the program is watched from, made before the switch as
    # the server's is: it imports modules that --user may not be able to read.
    gevent.get_hub()
    try:
        if privileges.drop(settings.identity):
            config.recheck_as_user(settings)
        privileges.give_up_capabilities()
    except (config.ConfigError, privileges.PrivilegeError) as e:
        return _fail(str(e))
    programs = _programs(settings, dict(os.environ))
    sys.stdout.flush()
    if settings.try_auth is not None:
        return trial.try_auth(programs, settings.try_auth, settings.try_mechanism, secret,
                              sys.stdout)
    return trial.try_process(programs, settings.try_process, sys.stdin.buffer, sys.stdout,
                             hostname=settings.hostname,
                             max_message_size=settings.max_message_size,
                             spool_dir=settings.spool_dir,
                             with_received=settings.received_header)


def _fit_descriptor_limit(settings, logger):
    """Settings whose --max-connections the open file limit can hold: past it,
    accepting would fail before the busy timeout of three quarters full
    ever began (docs/limits.md "Limits and abuse")."""
    fits = fit_descriptor_limit(settings.max_connections)
    if fits >= settings.max_connections:
        return settings
    events.note(logger, events.WARNING, events.CONFIG,
                "--max-connections %d lowered to %d: the open file limit (%d) allows no more; "
                "raise it (ulimit -n, LimitNOFILE=) for more", settings.max_connections, fits,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return dataclasses.replace(settings, max_connections=fits)


def _after_binding(settings, tls, logger) -> None:
    """Once the ports are bound: give up root and the capability to bind, then
    warn about what deserves it.

    Raises ConfigError or PrivilegeError naming the option.
    """
    identity = settings.identity
    dropped = privileges.drop(identity)
    # Nothing binds again (a reload does not), and no program or worker may
    # inherit the capability to.
    privileges.give_up_capabilities()
    if dropped:
        config.recheck_as_user(settings)
        events.note(logger, events.INFO, events.START,
                    "running as user %s (uid %d), group %s (gid %d)", identity.user,
                    identity.uid, identity.group, identity.gid)
    elif os.geteuid() == 0:
        events.note(logger, events.WARNING, events.CONFIG,
                    "running as root without --user: the programs run as root too")
    if tls.self_signed:
        events.note(logger, events.WARNING, events.CONFIG,
                    "no --ssl-cert/--ssl-key: using a self-signed certificate for %s; "
                    "clients will not be able to verify it", settings.hostname)
    if not settings.require_auth:
        events.note(logger, events.WARNING, events.CONFIG,
                    "--no-require-auth: anyone who connects may submit mail")


def _programs(settings, environment, tracker=None) -> Programs:
    """The two programs as every session runs them (and --try-auth, --try-process)."""
    return Programs(settings.auth, settings.process, settings.auth_timeout,
                    settings.process_timeout, environment, settings.max_auth_programs,
                    tracker=tracker,
                    auth_cache=AuthCache(settings.auth_cache_ttl,
                                         settings.auth_cache_negative_ttl))


def _serve(settings, logger, tls, worker: Optional[arbiter.WorkerSpec] = None,
           on_bound=None, argv: Sequence[str] = ()) -> int:
    """One process serving clients: the whole server, or one worker of the master's
    (which leaves SIGHUP to its master)."""
    environment = dict(os.environ)
    if worker is not None:
        # The master's metrics directory is the workers' business, not the programs'.
        environment.pop(metrics.MULTIPROC_ENV, None)
    limits = None
    listeners = None
    if worker is not None:
        limits = ledger.RemoteLimits(
            socket.socket(fileno=worker.ledger), settings.ipv6_prefix_length,
            lambda: server.begin_shutdown("master gone"),
            on_go=lambda: server.open(), on_retire=lambda: (server.retire(), limits.retired()),
            on_forget=lambda: server.forget_logins())
        listeners = [(gsocket.socket(fileno=fd), implicit) for fd, implicit in worker.listeners]
    # A worker tells its master which programs run, so that a run it leaves
    # behind when it dies can be ended (docs/scaling.md "Scaling").
    def read_again():
        got = reload.read_again(argv, server.settings, server.tls, logger,
                                workers_may_change=False,
                                adjust=lambda s: _fit_descriptor_limit(s, logger))
        return None if got is None else (*got, _programs(got[0], environment, limits))

    succession = None
    if worker is None:
        succession = Succession(None, argv, logger, lambda: reload.read_again(
            argv, server.settings, server.tls, logger, workers_may_change=False,
            adjust=lambda s: _fit_descriptor_limit(s, logger)))
    server = Server(settings, tls, _programs(settings, environment, limits), logger, limits,
                    read_again=None if worker is not None else read_again,
                    upgrade=None if succession is None else succession.begin)
    if succession is not None:
        succession.server = server
    try:
        server.start(listeners, on_bound)
    except (ListenError, config.ConfigError, privileges.PrivilegeError) as e:
        return _fail(str(e))
    if worker is not None:
        limits.ready()
    # What start-up made lives as long as the process: out of the garbage
    # collector's sight, a full collection walks only what sessions made.
    gc.freeze()
    status = server.serve_forever()
    if succession is not None and succession.handed_over:
        return succession.finish()
    return status
