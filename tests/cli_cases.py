"""Many command lines of one script in one process, each run as a user's would be: a test helper.

    python -m tests.cli_cases SCRIPT CASES_JSON OUT_JSON      (from the repository root)

``CASES_JSON`` holds ``{case: [arguments ...]}`` (what follows ``python SCRIPT`` on a command
line), or ``{case: {"argv": [arguments ...], "fault": [FAULT, NAME, NTH]}}`` for a case run with
a write fault injected (``tests/fault_run.py``); ``OUT_JSON`` receives ``{case: {"code": exit status, "stderr": text, "open": [paths]}}``.

The script is imported once (its flags defined once). For each case the flags go back to their
unparsed defaults (``FLAGS.unparse_flags()``), ``sys.argv`` becomes the case's command line, and
the script's own ``if __name__ == "__main__":`` block runs: the same ``run(main)`` a user hits,
with the flags and flagfiles parsed by absl as on a command line. Everything written to file
descriptor 2 while it runs is the case's stderr; its ``SystemExit`` is the exit status, and an
exception escaping it is printed as the interpreter would (a traceback, status 1). ``open`` lists
the files the case opened and left open (a lock still held, say). What each case changed in the
process is put back: the working directory and the number of torch threads.
"""
import ast
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import traceback

from absl import flags


def main_block(path):
    """The compiled body of ``path``'s ``if __name__ == "__main__":`` block."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            return compile(ast.Module(body=node.body, type_ignores=[]), path, "exec")
    raise SystemExit(f"{path} has no `if __name__ == \"__main__\":` block")


def load_script(path):
    """The script imported as a module (its flags defined, its main block not run)."""
    spec = importlib.util.spec_from_file_location("cli_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _open_files():
    """{fd: path} of this process's open regular files and folders."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            found[fd] = target
    return found


def run_case(script, block, namespace, argv, fault=None):
    """{"code", "stderr", "open"} of ``python script *argv``, run in this process (under
    ``fault_run.injected(*fault)`` when a fault is given)."""
    import torch
    from tests.fault_run import injected
    flags.FLAGS.unparse_flags()
    cwd, threads, before = os.getcwd(), torch.get_num_threads(), _open_files()
    sys.argv = [script, *argv]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as err:
        os.dup2(err.fileno(), 2)
        try:
            with injected(*fault) if fault else contextlib.nullcontext():
                exec(block, namespace)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if done.code is not None and not isinstance(done.code, int):
                print(done.code, file=sys.stderr)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        stderr = err.read()
    opened = sorted(path for fd, path in _open_files().items() if before.get(fd) != path)
    os.chdir(cwd)
    torch.set_num_threads(threads)
    return {"code": code, "stderr": stderr, "open": opened}


def main():
    script, cases_path, out_path = sys.argv[1:4]
    with open(cases_path) as f:
        cases = json.load(f)
    block = main_block(script)
    module = load_script(script)
    namespace = {**vars(module), "__name__": "__main__"}
    results = {}
    for case, spec in cases.items():
        spec = spec if isinstance(spec, dict) else {"argv": spec}
        results[case] = run_case(script, block, namespace, spec["argv"], spec.get("fault"))
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
