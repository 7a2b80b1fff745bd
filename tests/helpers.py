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


def snn_stage_in_process(script, *argv):
    """Stage 2 (``SNN_conversion.py``) or 3 (``SNN_ft.py``) in this process: the library call the
    script makes of the command line ``argv`` (its real flags and flagfiles, parsed into flag
    values of their own); returns what the call returns."""
    from common import flags as cflags
    values = cflags.values_of(script, argv)
    if script == "SNN_conversion.py":
        from snn.conversion import convert_run
        return convert_run(**cflags.conversion_settings(values))
    from snn.finetune_run import finetune_run
    return finetune_run(**cflags.finetune_settings(values))


def cli_cases(script, cases, folder):
    """{case: {"code", "stderr", "open"}} of ``python script *argv`` for each ``{case: argv}``, all
    run one after the other by one process of ``tests/cli_cases.py`` (``folder``: its files)."""
    import json
    cases_path, out_path = os.path.join(folder, "cases.json"), os.path.join(folder, "out.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    proc = subprocess.run([sys.executable, "-m", "tests.cli_cases", script, cases_path, out_path], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"tests/cli_cases.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(out_path) as f:
        return json.load(f)
