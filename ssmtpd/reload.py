"""SIGHUP: the configuration read again, checked, and what of it a running
server can take over (docs/operations.md "Reloading (SIGHUP)").

The ini file is read again with the command line and the environment the
server started with, and checked as a start would check it (every option,
both programs, the certificate).  A refused configuration changes nothing:
one ERROR line says why.  Settings that need new sockets, another user or
another process layout cannot change in a running server: each such change
is one WARNING line and the running value is kept; the rest applies to new
sessions, while sessions in progress finish on the settings they began with.
"""

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

from ssmtpd import config, events
from ssmtpd.config import Settings
from ssmtpd.tls import TLSError, TLSHolder

# Settings whose change needs a restart: the sockets are bound and root is
# given up.  `identity` is what --user and --group resolve to.
NEEDS_RESTART = ("bind", "port", "smtps_port", "metrics_bind", "user", "group", "identity")


def read_again(argv: Sequence[str], running: Settings, running_tls: TLSHolder, logger,
               workers_may_change: bool,
               adjust: Callable[[Settings], Settings] = lambda s: s
               ) -> Optional[Tuple[Settings, TLSHolder]]:
    """The settings and certificate new sessions are to use, or None (logged)
    when the configuration is refused.  `adjust` fits what the machine
    imposes (the descriptor limit) onto the settings read."""
    try:
        settings = config.parse(argv)
    except config.ConfigError as e:
        _refused(logger, str(e))
        return None
    # --workers 1 serves in the one process: more workers would need a master.
    restart_only = NEEDS_RESTART if workers_may_change else NEEDS_RESTART + ("workers",)
    kept = {}
    for name in restart_only:
        old, new = getattr(running, name), getattr(settings, name)
        if old != new:
            kept[name] = old
            if name != "identity":  # said as --user / --group
                events.note(logger, events.WARNING, events.RELOAD,
                            "reload: --%s changed from %s to %s: that needs a restart; "
                            "keeping %s", name.replace("_", "-"), _shown(old), _shown(new),
                            _shown(old), option=name.replace("_", "-"))
    settings = adjust(dataclasses.replace(settings, **kept))
    try:
        if settings.ssl_cert:
            tls = TLSHolder(settings.hostname, settings.ssl_cert, settings.ssl_key)
        else:  # self-signed: the one made at start stays, clients may have pinned it
            tls = TLSHolder(settings.hostname, None, None, running_tls.pem)
    except TLSError as e:
        _refused(logger, f"--ssl-cert: {e}")
        return None
    return settings, tls


def applied(logger, what: str, before: Settings, after: Settings) -> None:
    """The one INFO line of a reload that took effect, naming what changed."""
    changed = [f"--{name.replace('_', '-')}" for name in _OPTIONS
               if getattr(before, name) != getattr(after, name)]
    events.note(logger, events.INFO, events.RELOAD, "reload: %s (%s)", what,
                "changed: " + ", ".join(changed) if changed
                else "no setting changed; the certificate and programs are read again",
                changed=changed)


# The settings a user sets (not what a run was asked to do, nor derived values).
_OPTIONS = [opt.attr for opt in config.OPTIONS]


def _refused(logger, why: str) -> None:
    events.note(logger, events.ERROR, events.RELOAD,
                "reload refused, the running configuration stays: %s", why, reason=why)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"  # --metrics-bind
    return str(value)
