"""User-facing errors: a mistake the user can fix is one clear line, never a traceback."""
import errno
import sys


class UserError(Exception):
    """Something the user can fix (bad flag, missing file, corrupt shard). The message says what and how."""


def first_line(e: BaseException) -> str:
    """What an exception says, in one line for a one-line message: its first line, or its type if it says nothing."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def run_main(main):
    """Run a script's main(); turn UserError into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk can strike any write, and only the user can make room: one line, not a traceback.
        print(f"error: {e.strerror}" + (f" writing {e.filename}" if e.filename else "") + "; make room and rerun",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
