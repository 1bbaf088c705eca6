"""Structured logging: one line per event, ``key=value`` pairs.

``event(logger, level, name, **fields)`` writes
``ts=2024-01-01T00:00:00.123Z level=info event=recovery lost_keys=3 ...``.
Values with spaces, quotes or ``=`` are double-quoted; bytes are shown
with ``repr`` so a key never breaks the line format.
"""

import logging
import sys
import time

__all__ = ["event", "setup_logging", "fmt_value"]

log = logging.getLogger("kvstore.server")


def fmt_value(v):
    if isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, (bytes, bytearray)):
        s = repr(bytes(v))[2:-1]
        if len(s) > 200:
            s = s[:200] + "..."
    else:
        s = str(v)
    if not s or any(c in s for c in ' "=\t\n\r'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def event(level, name, /, **fields):
    """Log one structured event at ``level`` ("info", "warning", ...)."""
    lv = getattr(logging, level.upper())
    if not log.isEnabledFor(lv):
        return
    parts = [f"event={name}"]
    parts.extend(f"{k}={fmt_value(v)}" for k, v in fields.items())
    log.log(lv, " ".join(parts))


class _KVFormatter(logging.Formatter):
    def format(self, record):
        t = time.gmtime(record.created)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + ".%03dZ" % record.msecs
        msg = record.getMessage()
        if not msg.startswith("event="):
            msg = "msg=" + fmt_value(msg)
        line = f"ts={ts} level={record.levelname.lower()} {msg}"
        if record.exc_info:
            line += " exc=" + fmt_value(self.formatException(record.exc_info))
        return line


def setup_logging(level="info", stream=None):
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_KVFormatter())
    root = logging.getLogger("kvstore")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False
