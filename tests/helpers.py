"""Running the scripts as a user does, on tiny settings."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = ["--dataset=shapes", "--img_size=16", "--ch=32", "--ch_mult=1", "--num_res_blocks=1",
              "--dropout=0.0", "--T=100", "--bit=2"]
TINY_TRAIN = TINY_MODEL + ["--batch_size=4", "--num_workers=0", "--sample_step=0", "--log_step=1",
                           "--warmup=10", "--ema_decay=0.9"]


def run_script(script, *args, check=True, env=None):
    """Run ``python script args`` from the repository root; returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_tiny(logdir, steps=3, *extra):
    """A tiny 2-bit checkpoint at ``logdir/ckpt.pt`` trained for ``steps`` steps."""
    return run_script("ANN_train.py", *TINY_TRAIN, f"--logdir={logdir}", f"--total_steps={steps}",
                      f"--save_step={steps}", *extra)


def assert_one_line_error(proc, *fragments):
    """The process failed with a single ``error:`` line and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def unet(T=100, kernels="reference", **fields):
    """A ``UNet`` of ``UNetConfig(**fields)`` (lists become tuples) for ``T`` diffusion steps."""
    from common.configs import UNetConfig
    from model import UNet
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return UNet(UNetConfig(**fields), T, kernels)


def start_cases(script, cases, folder, env=None):
    """Start ``python -m tests.cli_cases script`` on ``cases`` (``{case: arguments}``, or ``{case:
    {"argv": ..., "fault": [...]}}``): every case a command line of ``script`` in one process.
    Returns (process, path of its results); ``cases_results`` waits for them."""
    import json
    name = os.path.basename(script)
    cases_path, out_path = os.path.join(folder, f"{name}.cases.json"), os.path.join(folder, f"{name}.out.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    proc = subprocess.Popen([sys.executable, "-m", "tests.cli_cases", script, cases_path, out_path], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return proc, out_path


def cases_results(proc, out_path):
    """{case: {"code", "stderr", "open"}} once ``proc`` (of ``start_cases``) is done."""
    import json
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    with open(out_path) as f:
        return json.load(f)


def run_cases_two_at_a_time(cases_by_script, folder, env=None):
    """``{case: result}`` of ``{script: cases}``, one process per script, two running at a time
    (the largest first; the next starts as soon as one is done)."""
    import time
    results, running = {}, []
    waiting = sorted((s for s in cases_by_script if cases_by_script[s]), key=lambda s: -len(cases_by_script[s]))
    while waiting or running:
        while waiting and len(running) < 2:
            script = waiting.pop(0)
            running.append(start_cases(script, cases_by_script[script], folder, env))
        done = next((r for r in running if r[0].poll() is not None), None)
        if done is None:
            time.sleep(0.2)
            continue
        running.remove(done)
        results.update(cases_results(*done))
    return results


def stage_in_process(script, *argv):
    """The library call ``script`` (one of the five) makes of the command line ``argv`` (its real
    flags and flagfiles, parsed by absl into flag values of their own), in this process; its lines
    go to stdout as the script's do. Returns what the call returns."""
    from common import flags as cflags
    values = cflags.values_of(script, argv)
    if script == "ANN_train.py":
        from model.train import train
        return train(**cflags.train_settings(values))
    if script == "SNN_conversion.py":
        from snn.conversion import convert_run
        return convert_run(**cflags.conversion_settings(values))
    if script == "SNN_ft.py":
        from snn.finetune_run import finetune_run
        return finetune_run(**cflags.finetune_settings(values))
    if script == "evaluate.py":
        from metrics.evaluation import evaluate
        return evaluate(**cflags.evaluation_settings(values))
    from metrics.fid_stats import compute_fid_stats
    return compute_fid_stats(**cflags.fid_stats_settings(values))


def train_in_process(*argv):
    """Stage 1 (``model.train.train``) of the command line ``argv`` of ANN_train.py, in this process."""
    return stage_in_process("ANN_train.py", *argv)


def train_tiny_in_process(logdir, steps=3, *extra):
    """``train_tiny`` in this process: a tiny 2-bit checkpoint at ``logdir/ckpt.pt`` after ``steps`` steps."""
    train_in_process(*TINY_TRAIN, f"--logdir={logdir}", f"--total_steps={steps}", f"--save_step={steps}", *extra)


def run_cli_cases(script, cases, env=None):
    """[CompletedProcess] of each case (``{"argv": [...]}``) of ``script``, all run by one process of
    ``tests/cli_cases.py`` through the script's own flags and ``run`` wrapper (stdout not kept)."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        results = cases_results(*start_cases(script, {str(i): case["argv"] for i, case in enumerate(cases)},
                                             folder, env))
    return [subprocess.CompletedProcess(case["argv"], results[str(i)]["code"], "", results[str(i)]["stderr"])
            for i, case in enumerate(cases)]


def cli_cases(script, cases, folder):
    """{case: {"code", "stderr", "open"}} of ``python script *argv`` for each ``{case: argv}``, all
    run one after the other by one process of ``tests/cli_cases.py`` (``folder``: its files)."""
    return cases_results(*start_cases(script, cases, folder))
