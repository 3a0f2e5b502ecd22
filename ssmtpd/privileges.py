"""Giving up root once the ports are bound (docs/deploying.md "Deploying").

Ports 587 and 465 need root to bind; nothing after that does.  With --user
(and --group) the process that bound them switches to that user for good,
real, effective and saved ids alike, before it accepts a client, so no
program ever runs as root.  Workers of --workers are started after the
switch and inherit it.

Our processes hold what the programs, which run as the same user, must not
see: the private key, other sessions' messages and passwords.  Each makes
itself non-dumpable (prctl(2) PR_SET_DUMPABLE), which puts its /proc files
(mem, environ, fd) and ptrace(2) out of reach of every other process of the
user, and leaves no core dump.  The kernel decides the flag anew at two
moments, so each process sets it itself after both: an execve(2) of an
ordinary program by a user other than root makes the process dumpable (every
worker starts so, and so does the server under systemd's
AmbientCapabilities=), and a change of user ids sets the flag to
/proc/sys/fs/suid_dumpable (proc(5)), which may be 1.  Nor does a program
inherit the capability to bind ports below 1024 (capabilities(7)): it is
given up once the ports are bound.
"""

import ctypes
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
    forbid_dumps()  # the switch set it to /proc/sys/fs/suid_dumpable
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return True
        raise PrivilegeError("--user: root could be regained after the switch")
    return True


# prctl(2) and capget(2)/capset(2), from <linux/prctl.h> and <linux/capability.h>.
PR_SET_DUMPABLE = 4
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _prctl(option: int, arg: int = 0) -> int:
    """prctl(2); raises OSError."""
    result = _lib().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def forbid_dumps() -> None:
    """No other process of our user may read our memory, descriptors or environment.

    Raises PrivilegeError.
    """
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except OSError as e:
        raise PrivilegeError(f"cannot make the process non-dumpable: {e.strerror}") from None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def give_up_capabilities() -> None:
    """Once the ports are bound: no capability for us, none for what we start.

    Under systemd's AmbientCapabilities=CAP_NET_BIND_SERVICE the server runs
    as its user with that capability in its ambient set, which every program
    and every worker would inherit through execve(2).  A process that is not
    root also gives it up altogether (effective, permitted, inheritable):
    nothing after binding needs it, as a reload does not bind again.  Root
    without --user keeps its capabilities (the programs run as root anyway,
    which start-up warns about); with --user they went with the switch.
    Raises PrivilegeError.
    """
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel older than ambient sets (4.3)
            raise PrivilegeError(f"cannot clear the ambient capabilities: {e.strerror}") \
                from None
    if os.geteuid() == 0:
        return
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    libc = _lib()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capget: {os.strerror(ctypes.get_errno())}")
    if not any(d.effective or d.permitted or d.inheritable for d in data):
        return
    data = (_CapData * 2)()  # all zero
    if libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot give up capabilities: {os.strerror(ctypes.get_errno())}")


def bind_advice(error: OSError) -> str:
    """The fix to add to a bind error, or "": the two ways docs/configuration.md "Configuration" gives.

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
