"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
import sys

from absl import app


class UserError(Exception):
    """A mistake in the user's input (a path, a flag value, a checkpoint): shown as one line."""


def run(main, flags_parser=None):
    """``absl.app.run(main)``, printing a ``UserError`` (or an ``OSError``: a folder that cannot be
    made, a file the system refuses) as one ``error: ...`` line and exiting with 1.

    ``flags_parser``: absl's, or one that reports a bad command line as one line
    (``common.flags.parse``)."""

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

    if flags_parser is None:
        app.run(guarded)
    else:
        app.run(guarded, flags_parser=flags_parser)
