"""A gevent StreamServer that rides out descriptor exhaustion quietly.

gevent logs a traceback for every accept() that fails; out of descriptors
(EMFILE and kin) is a load condition, not a bug: accepting pauses briefly
instead, and a subclass says so in its own way (docs/limits.md "Limits and abuse",
"Monitoring").
"""

import errno

from gevent.server import StreamServer

RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener(StreamServer):
    # Seconds accepting pauses once the descriptors ran out.
    PAUSE = 0.5

    def do_read(self):
        try:
            result = super().do_read()
        except OSError as e:
            if e.errno not in RESOURCE_ERRORS:
                raise
            self.exhausted(e)
            self.stop_accepting()
            self._timer = self.loop.timer(self.PAUSE)
            self._timer.start(self._start_accepting_if_started)
            return None
        if result:
            self.accepted()
        return result

    def exhausted(self, error: OSError) -> None:
        """An accept() failed for want of descriptors (or memory)."""

    def accepted(self) -> None:
        """A connection was accepted."""
