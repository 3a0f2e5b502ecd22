#!/usr/bin/env python3
"""Example auth program for ssmtpd: checks a login against a file of scrypt hashes.

    auth-users [--users FILE]              check SSMTPD_USERNAME / SSMTPD_PASSWORD
    auth-users [--users FILE] add USER     add USER or change their password
    auth-users [--users FILE] delete USER
    auth-users [--users FILE] list

Without a subcommand it is the program ssmtpd runs for each AUTH (docs/auth-program.md "The auth program"):
exit 0 for a good password, 1 for a bad one or an unknown user, 75 (EX_TEMPFAIL)
when the users file cannot be read, so the client hears "try again later"
rather than "wrong password" while the file is missing or broken.

The users file holds one user a line, `name:scrypt$N$r$p$salt$hash`, salt and
hash in base64.  `add` reads the password from stdin when that is not a
terminal (one trailing newline is dropped), else asks twice.  The file is
replaced atomically.  A new file is made mode 0600; an existing one keeps its
owner, group and mode.  Run as root, what the tool creates (the file, and any
directory above it) belongs to the owner of the directory it is created in:
the server's user owns its state directory (docs/deploying.md "Deploying"), and a users
file that only root can read would answer every login with 454.  Default
file: var/users, relative to the working directory.
"""

import argparse
import base64
import fcntl
import getpass
import hashlib
import hmac
import os
import pwd
import stat
import sys
import tempfile

EX_USAGE = 64
EX_TEMPFAIL = 75
DEFAULT_USERS = os.path.join("var", "users")

# 16 MiB and ~50 ms per check: slow enough to hurt a stolen file, fast enough
# for a login.  Parameters are stored per entry so they can be raised later.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
# An entry asking for more memory than this is treated as broken, not obeyed.
MAX_SCRYPT_MEMORY = 1 << 30


class UsersFileError(Exception):
    """The users file (or the entry we need from it) is unusable."""


def scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL refuses above its default 32 MiB unless told the real need.
    need = 128 * r * (n + p + 2) + (1 << 20)
    if need > MAX_SCRYPT_MEMORY:
        raise ValueError("scrypt parameters too large")
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=need, dklen=length)


def make_entry(password: bytes) -> str:
    salt = os.urandom(SALT_BYTES)
    digest = scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return "scrypt${}${}${}${}${}".format(
        SCRYPT_N, SCRYPT_R, SCRYPT_P,
        base64.b64encode(salt).decode("ascii"), base64.b64encode(digest).decode("ascii"))


def check_entry(entry: str, password: bytes) -> bool:
    try:
        scheme, n, r, p, salt, digest = entry.split("$")
        if scheme != "scrypt":
            raise ValueError(f"unknown scheme {scheme!r}")
        salt = base64.b64decode(salt, validate=True)
        digest = base64.b64decode(digest, validate=True)
        computed = scrypt(password, salt, int(n), int(r), int(p), len(digest))
    except ValueError as e:
        raise UsersFileError(f"bad entry: {e}") from None
    return hmac.compare_digest(computed, digest)


# Checked for unknown users so that the time taken does not tell an attacker
# which names exist.
_DUMMY_ENTRY = "scrypt${}${}${}${}${}".format(
    SCRYPT_N, SCRYPT_R, SCRYPT_P,
    base64.b64encode(b"\0" * SALT_BYTES).decode("ascii"),
    base64.b64encode(b"\0" * HASH_BYTES).decode("ascii"))


def valid_name(name: str) -> bool:
    return bool(name) and ":" not in name and all(c.isprintable() for c in name)


def read_users(path: str) -> dict:
    """name -> entry, in file order.  Raises OSError when unreadable."""
    users = {}
    # surrogateescape: a stray byte in one line must not lock everyone out.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line or line.startswith("#") or ":" not in line:
                continue
            name, entry = line.split(":", 1)
            users[name] = entry
    return users


def owner_of(directory: str):
    """(uid, gid) that what root creates in `directory` gets: the directory's own,
    or None when that is root's or we are not root (the new file is then ours)."""
    if os.geteuid() != 0:
        return None
    st = os.stat(directory)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def write_users(path: str, users: dict) -> None:
    """Replace the file atomically: readers see the old or the new one, never half."""
    directory = os.path.dirname(path) or "."
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    # mkstemp creates the file 0600, before a single hash is written into it.
    fd, tmp = tempfile.mkstemp(prefix=".users-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            if old is not None:
                # The server's user must still read the file when root edits it;
                # chown first, as it may clear mode bits.
                try:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                except PermissionError:
                    pass
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            else:
                owner = owner_of(directory)
                if owner is not None:
                    os.fchown(f.fileno(), *owner)
                elif os.geteuid() == 0:
                    print(f"auth-users: note: {path} belongs to root, mode 0600: a server "
                          "running as another user (--user, User=) cannot read it; chown "
                          "it to that user", file=sys.stderr)
            for name, entry in users.items():
                f.write(f"{name}:{entry}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_directories(directory: str) -> None:
    """os.makedirs(mode 0700), each new directory owned as a new users file is."""
    parent = os.path.dirname(os.path.abspath(directory))
    if os.path.isdir(directory):
        return
    make_directories(parent)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return  # another `add` made it first
    owner = owner_of(parent)
    if owner is not None:
        os.chown(directory, *owner)


class Locked:
    """Serialises writers on the users file's directory; readers need no lock."""

    def __init__(self, path: str, create: bool = False):
        self.directory = os.path.dirname(path) or "."
        self.create = create

    def __enter__(self):
        if self.create:
            make_directories(self.directory)
        self.fd = os.open(self.directory, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def fail(message: str, status: int) -> int:
    print(f"auth-users: {message}", file=sys.stderr)
    return status


def verify(path: str) -> int:
    name = os.environ.get("SSMTPD_USERNAME")
    password = os.environ.get("SSMTPD_PASSWORD")
    if name is None or password is None:
        return fail("SSMTPD_USERNAME and SSMTPD_PASSWORD must be set "
                    "(this mode is run by ssmtpd for each AUTH)", EX_USAGE)
    try:
        users = read_users(path)
    except PermissionError as e:
        return fail(f"cannot read {path}: {e.strerror} ({whose(path)}; this program runs "
                    f"as {user_name(os.geteuid())})", EX_TEMPFAIL)
    except OSError as e:
        return fail(f"cannot read {path}: {e.strerror}", EX_TEMPFAIL)
    # Environment strings carry undecodable bytes as surrogates; hash the
    # bytes the client actually sent.
    secret = os.fsencode(password)
    entry = users.get(name) if valid_name(name) else None
    try:
        good = check_entry(entry if entry is not None else _DUMMY_ENTRY, secret)
    except UsersFileError as e:
        return fail(f"{path}: user {name!r}: {e}", EX_TEMPFAIL)
    return 0 if good and entry is not None else 1


def whose(path: str) -> str:
    """Who may read `path`, for the log line of an auth that could not."""
    try:
        st = os.stat(path)
    except OSError:
        return "its directory cannot be entered"
    return f"it belongs to {user_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def read_new_password() -> bytes:
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        if data.endswith(b"\r\n"):
            return data[:-2]
        return data[:-1] if data.endswith(b"\n") else data
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the passwords do not match")
    return first.encode("utf-8", "surrogateescape")


def add(path: str, name: str) -> int:
    if not valid_name(name):
        return fail(f"refusing user name {name!r}: empty, or has ':' or a control character",
                    EX_USAGE)
    try:
        password = read_new_password()
    except ValueError as e:
        return fail(str(e), EX_USAGE)
    if not password:
        return fail("refusing an empty password", EX_USAGE)
    entry = make_entry(password)
    try:
        with Locked(path, create=True):
            try:
                users = read_users(path)
            except FileNotFoundError:
                users = {}
            existed = name in users
            users[name] = entry
            write_users(path, users)
    except OSError as e:
        return fail(f"cannot update {path}: {e.strerror}", EX_TEMPFAIL)
    print(f"{'changed password of' if existed else 'added'} {name}")
    return 0


def delete(path: str, name: str) -> int:
    try:
        with Locked(path):
            users = read_users(path)
            if name not in users:
                return fail(f"no user {name!r} in {path}", 1)
            del users[name]
            write_users(path, users)
    except OSError as e:
        return fail(f"cannot update {path}: {e.strerror}", EX_TEMPFAIL)
    print(f"deleted {name}")
    return 0


def list_users(path: str) -> int:
    try:
        users = read_users(path)
    except OSError as e:
        return fail(f"cannot read {path}: {e.strerror}", EX_TEMPFAIL)
    for name in users:
        print(name)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="auth-users",
        description="ssmtpd auth program: without a subcommand, check SSMTPD_USERNAME and "
                    "SSMTPD_PASSWORD against the users file (exit 0 good, 1 bad, 75 file "
                    "unreadable).")
    parser.add_argument("--users", default=DEFAULT_USERS, metavar="FILE",
                        help="users file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("add", help="add a user or change a password").add_argument("user")
    commands.add_parser("delete", help="remove a user").add_argument("user")
    commands.add_parser("list", help="print the user names")
    args = parser.parse_args(argv)
    if args.command == "add":
        return add(args.users, args.user)
    if args.command == "delete":
        return delete(args.users, args.user)
    if args.command == "list":
        return list_users(args.users)
    return verify(args.users)


if __name__ == "__main__":
    sys.exit(main())
