"""Giving up root once the ports are bound (README "Deploying").

Ports 587 and 465 need root to bind; nothing after that does.  With --user
(and --group) the process that bound them switches to that user for good,
real, effective and saved ids alike, before it accepts a client, so no
program ever runs as root.  Workers of --workers are started after the
switch and inherit it.
"""

import errno
import grp
import os
import pwd
import sys
from dataclasses import dataclass
from typing import Optional


class PrivilegeError(Exception):
    """The switch could not be made or did not hold; str() names the option."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    group: str
    gid: int


def resolve(user: Optional[str], group: Optional[str]) -> Optional[Identity]:
    """The identity --user/--group name, or None without --user; raises ValueError."""
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    try:
        group_entry = grp.getgrnam(group) if group is not None else grp.getgrgid(entry.pw_gid)
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None
    return Identity(user, entry.pw_uid, group_entry.gr_name, group_entry.gr_gid)


def drop(identity: Optional[Identity]) -> bool:
    """Become `identity` for good; False if already it (a worker, or not root)."""
    if identity is None:
        return False
    if (os.getuid(), os.geteuid(), os.getgid()) == (identity.uid, identity.uid, identity.gid):
        return False
    if os.geteuid() != 0:
        raise PrivilegeError(f"--user: only root can switch to {identity.user}")
    try:
        os.setgroups([identity.gid])  # no supplementary group of root's survives
        os.setgid(identity.gid)
        os.setuid(identity.uid)  # as root this sets the saved id too: no way back
    except OSError as e:
        raise PrivilegeError(f"--user: cannot switch to {identity.user}: {e.strerror}") from None
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return True
        raise PrivilegeError("--user: root could be regained after the switch")
    return True


def bind_advice(error: OSError) -> str:
    """The fix to add to a bind error, or "": the two ways README "Configuration" gives.

    The kernel refuses ports below 1024 (ip_unprivileged_port_start) with
    EACCES to a process without CAP_NET_BIND_SERVICE.
    """
    if error.errno != errno.EACCES:
        return ""
    python = os.path.realpath(sys.executable)
    return ("; a port below 1024 needs root: start ssmtpd as root with --user NAME (it gives "
            "up root once the ports are bound), or give it CAP_NET_BIND_SERVICE "
            f"(systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE; otherwise: setcap "
            f"cap_net_bind_service=+ep {python})")
