"""``kvstore-server`` / ``python -m kvstore.server``."""

import sys

from .config import load_config
from .logs import event, setup_logging


def main(argv=None):
    try:
        config = load_config(argv)
    except (ValueError, OSError) as e:
        print(f"kvstore-server: {e}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if config.supervise:
        from .supervise import supervise
        return supervise(sys.argv[1:] if argv is None else list(argv))
    from .app import run
    try:
        return run(config)
    except (ValueError, MemoryError) as e:
        event("error", "startup_failed", error=f"{type(e).__name__}: {e}")
        print(f"kvstore-server: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
