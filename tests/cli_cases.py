"""Several command lines of one script, run one after the other by one process: a test helper.

    python -m tests.cli_cases SCRIPT CASES_JSON OUT_JSON      (from the repository root)

``CASES_JSON`` holds ``{case: [arguments ...]}`` (what follows ``python SCRIPT`` on a command
line); ``OUT_JSON`` receives ``{case: {"code": exit status, "stderr": text}}``. The script is
imported once (its flags defined once); for each case the flags go back to their defaults,
``sys.argv`` becomes the case's command line and the script's ``main`` runs through
``common.flags.run``, as ``python SCRIPT`` runs it: absl's parse of the flags and flagfiles, the
one-line errors and the exit status. What the case writes to file descriptor 2 is its stderr; an
exception escaping it is printed as the interpreter would (a traceback, status 1).
"""
import importlib.util
import json
import os
import sys
import tempfile
import traceback

from absl import flags

from common import flags as cflags


def run_case(script, main, argv):
    """{"code", "stderr"} of ``python script *argv``, run in this process."""
    flags.FLAGS.unparse_flags()
    sys.argv = [script, *argv]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as err:
        os.dup2(err.fileno(), 2)
        try:
            cflags.run(main)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return {"code": code, "stderr": err.read()}


def main(script, cases_path, out_path):
    with open(cases_path) as f:
        cases = json.load(f)
    spec = importlib.util.spec_from_file_location("cli_script", os.path.abspath(script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the script's flags; its main block does not run
    results = {case: run_case(script, module.main, argv) for case, argv in cases.items()}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
