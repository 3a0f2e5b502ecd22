import sys

from ssmtpd import privileges

# At once, before the interpreter spends time importing the server: a worker
# of --workers is started as a user's ordinary execve(2), which leaves it
# dumpable until this (ssmtpd/privileges.py).
privileges.forbid_dumps()

from ssmtpd.cli import main  # noqa: E402

sys.exit(main())
