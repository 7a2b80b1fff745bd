"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
import sys

from absl import app, flags


class UserError(Exception):
    """A mistake in the user's input (a path, a flag value, a checkpoint): shown as one line."""


def run(main):
    """``absl.app.run(main)``, printing a ``UserError`` (or an ``OSError``: a folder that cannot be
    made, a file the system refuses) as one ``error: ...`` line and exiting with 1."""

    def guarded(argv):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except OSError as err:  # a file or folder the run needs, refused by the system
            where = f": {err.filename}" if err.filename else ""
            print(f"error: {err.strerror or err}{where}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted; the last checkpoint written is intact", file=sys.stderr)
            sys.exit(130)

    app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's flag parsing with a bad flag, value or flagfile reported as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err).replace("ERROR:: ", "")
        print(f"error: {message} (--helpfull lists the flags)", file=sys.stderr)
        sys.exit(2)
