"""Many command lines of one script in one process, as a user's shell would run each.

    python -m tests.cli_cases SCRIPT CASES.json OUT.json

``CASES.json``: a list of ``{"argv": [...], "cwd": optional folder, "env": optional {name: value}}``.
The script is imported once (its flags defined once); every case starts from the flags'
defaults, parses its ``argv`` with the script's real flags and runs its ``main`` through the
``run`` wrapper of ``common.flags`` (one-line errors, exit codes), capturing its stdout, stderr
and exit status. An exception that escapes is written to the case's stderr as Python would (a
traceback, exit status 1). ``OUT.json``: a list of ``{"rc", "stdout", "stderr"}``, one per case.
"""
import contextlib
import importlib.util
import io
import json
import os
import sys
import traceback

from absl import flags

from common import flags as cflags


def load_script(path):
    """The script at ``path`` imported as a module (not as ``__main__``: its flags, not its run)."""
    spec = importlib.util.spec_from_file_location("cli_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def environment(cwd=None, env=None):
    """The working folder and environment variables of one case, restored afterwards."""
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(cwd or old_cwd)
    os.environ.update(env or {})
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def run_case(script, main, argv, cwd=None, env=None):
    """{"rc", "stdout", "stderr"} of ``python script *argv`` run in this process."""
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with environment(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [script, *argv]
        try:
            cflags.run(main)
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            rc = 1
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(script, cases_path, out_path):
    with open(cases_path) as f:
        cases = json.load(f)
    module = load_script(os.path.abspath(script))
    results = [run_case(script, module.main, case["argv"], case.get("cwd"), case.get("env")) for case in cases]
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
