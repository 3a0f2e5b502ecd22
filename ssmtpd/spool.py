"""Where a message waits between its DATA and its process program (docs/limits.md "Limits and abuse").

Small messages stay in memory, large ones go to an unlinked file in
--spool-dir; either way the program gets a real file on its stdin.
"""

import io
import os
import tempfile
from typing import Optional


def has_room(directory: str, needed: int) -> bool:
    """Whether `directory` has `needed` octets free for an unprivileged writer.

    Checked at MAIL: a message that would fill the disk is refused with
    452 4.3.1 before its data is read (RFC 1870 §6.1, RFC 3463 §3.4), not after.
    """
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= needed


class Spool:
    """Message storage: memory up to `memory_limit`, then an unlinked temp file.

    The program gets the message as a file on its stdin, never through a pipe
    we must feed: a large message is never held whole in memory, and a program
    that does not read its stdin cannot block us.
    """

    def __init__(self, directory: Optional[str] = None, memory_limit: int = 512 * 1024):
        self.directory = directory
        self.memory_limit = memory_limit
        self._file = io.BytesIO()
        # A full disk or no descriptor left must not stop the DATA reader
        # mid-message (the rest would be read as commands): remember, go on.
        self.error: Optional[OSError] = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self._in_memory and self._file.tell() + len(data) > self.memory_limit:
                self._to_file(tempfile.TemporaryFile(prefix="ssmtpd-", dir=self.directory))
            self._file.write(data)
        except OSError as e:
            self.error = e

    @property
    def _in_memory(self) -> bool:
        return isinstance(self._file, io.BytesIO)

    def _to_file(self, new) -> None:
        old = self._file
        self._file = new
        new.write(old.getbuffer())
        old.close()

    def reader(self):
        """The whole message from its start, as a file with a real descriptor.

        Raises the OSError that made the spool fail, if any.
        """
        if self.error is not None:
            raise self.error
        if self._in_memory:
            self._to_file(_anonymous_file(self.directory))
        self._file.flush()
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        self._file.close()


def _anonymous_file(directory: Optional[str]):
    """A file in RAM (memfd) where the system has it, else an unlinked temp file."""
    try:
        return open(os.memfd_create("ssmtpd-message", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):
        return tempfile.TemporaryFile(prefix="ssmtpd-", dir=directory)
