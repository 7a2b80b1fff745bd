"""Stage 2 (snn/conversion.py, SNN_conversion.py) on a tiny checkpoint in the format ANN_train.py writes:
one real command line end to end, the one-line errors as command lines run by one process, the
rest in this process with the settings the script makes of the same command lines."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_checkpoint, save_atomic
from common.configs import SNNConfig
from helpers import cli_cases, stage_in_process, unet
from snn import SpikingUNet
from snn.io import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = dict(ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0, bit=2, wbit=32, T=100,
             beta_1=1e-4, beta_T=0.02, mean_type="epsilon", var_type="fixedlarge", img_size=16,
             dataset="shapes", lr=2e-4, total_steps=3, warmup=1, batch_size=4, ema_decay=0.9, seed=0)
SMALL_RUN = ["--sampler=ddim", "--sample_steps=2", "--sample_size=4", "--val_size=8", "--num_workers=0"]


def write_ckpt(logdir, **overrides):
    """A ``ckpt.pt`` in the first format (a flat ``flags`` dict), with a UNet of random weights."""
    flags = {**FLAGS, **overrides}
    torch.manual_seed(0)
    extra = {k: flags[k] for k in ("spike_driven", "resample") if k in flags}
    model = unet(flags["T"], ch=flags["ch"], ch_mult=flags["ch_mult"], attn=flags["attn"],
                 num_res_blocks=flags["num_res_blocks"], dropout=flags["dropout"], bit=flags["bit"], **extra)
    optim = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    save_atomic({"net_model": model.state_dict(), "ema_model": model.state_dict(), "optim": optim.state_dict(),
                 "sched": sched.state_dict(), "step": 3, "x_T": torch.randn(4, 3, 16, 16), "flags": flags},
                os.path.join(logdir, "ckpt.pt"))


def convert_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "SNN_conversion.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def at_the_root(monkeypatch):
    """The repository root as the working folder, as for ``python SNN_conversion.py`` (flagfiles
    name the flagfiles they include from there)."""
    monkeypatch.chdir(ROOT)


def convert(*args):
    """SNN_conversion.py's work for the command line ``args``, in this process: its record."""
    return stage_in_process("SNN_conversion.py", *args)


def test_converts_samples_and_reports(tmp_path):
    """The one real command line of SNN_conversion.py here, end to end."""
    write_ckpt(tmp_path)
    proc = convert_script(f"--logdir={tmp_path}", "--neuron=signed", "--norm=step", *SMALL_RUN)
    assert proc.returncode == 0, proc.stderr
    loaded = load_model(str(tmp_path / "converted_snn.pt"))
    model, ckpt = loaded.model, loaded.ckpt
    assert loaded.kind == "snn" and isinstance(model, SpikingUNet)
    assert ckpt["config"]["unet"]["bit"] == 2 and ckpt["time_steps"] == 3 and model.neuron == "signed"
    assert ckpt["config"]["snn"] == {"neuron": "signed", "norm": "step"}
    ann_state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["ema_model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ann_state.items())
    for name in ("ann.png", "snn.png", "ann_vs_snn.png"):
        assert (tmp_path / "images" / name).stat().st_size > 0
    report = json.loads((tmp_path / "conversion.json").read_text())
    assert report["bit"] == 2 and report["time_steps"] == 3 and report["neuron"] == "signed"
    assert report["clip_denoised"] is False and report["network_calls"] == 2 and report["val_images"] == "held-out"
    assert 0 <= report["noise_relative_error"] < float("inf")
    assert [q["t_min"] for q in report["noise_relative_error_by_t"]][0] == 0
    assert report["noise_relative_error_by_t"][-1]["t_max"] == FLAGS["T"] - 1
    stats = report["spike_stats"]
    assert stats["num_samples"] == 8 and stats["time_steps"] == 3
    for key in ("energy_pJ_per_sample", "ann_energy_pJ_per_sample", "ac_per_sample", "mac_per_sample",
                "firing_rate", "layers"):
        assert key in stats
    assert report["wall_s"] > 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


ERROR_CASES = {
    "no ckpt.pt": ([], "no checkpoint at"),
    "contradicting --bit": (["--bit=3"], "--bit=3 contradicts"),
    "full-precision checkpoint": ([], "full-precision"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """The error cases as command lines, one after the other in one process (``tests/cli_cases.py``)."""
    logdirs, cases = {}, {}
    for case, (args, _) in ERROR_CASES.items():
        logdirs[case] = logdir = tmp_path_factory.mktemp("logdir")
        if case == "contradicting --bit":
            write_ckpt(logdir)
        elif case == "full-precision checkpoint":
            write_ckpt(logdir, bit=32)
        cases[case] = [f"--logdir={logdir}", *args, *SMALL_RUN]
    outcomes = cli_cases("SNN_conversion.py", cases, str(tmp_path_factory.mktemp("cli")))
    return {case: (logdirs[case], outcomes[case]["code"], outcomes[case]["stderr"]) for case in cases}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line(error_runs, case):
    logdir, returncode, stderr = error_runs[case]
    message = ERROR_CASES[case][1]
    assert returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not (logdir / "converted_snn.pt").exists()


def test_command_line_neuron_overrides_a_flagfiles(tmp_path):
    """``--neuron`` on the command line wins over the one in a flagfile, and counts as given."""
    write_ckpt(tmp_path)
    flagfile = tmp_path / "mode.txt"
    flagfile.write_text("--neuron=graded\n--norm=step\n")
    convert(f"--flagfile={flagfile}", f"--logdir={tmp_path}", "--neuron=if", *SMALL_RUN)
    assert json.loads((tmp_path / "conversion.json").read_text())["neuron"] == "if"


@pytest.mark.parametrize("flagfile,tag,mode", [("CIFAR10_snn.txt", "", ("graded", "compensated")),
                                               ("CIFAR10_snn_seed.txt", "_seed", ("if", "step")),
                                               ("CIFAR10_snn_seed_signed.txt", "_seed_signed", ("signed", "step"))])
def test_cifar10_flagfiles_convert_in_the_mode_they_name(tmp_path, flagfile, tag, mode):
    """The default flagfile converts in the exact mode; the seed's (a flagfile that includes the
    default one and overrides it) in the binary mode of the seed's paper, or in the signed mode
    of the seed's code, beside it under its tag."""
    write_ckpt(tmp_path)
    convert(f"--flagfile={os.path.join(ROOT, 'config', 'SNN_convert', flagfile)}", f"--logdir={tmp_path}",
            "--dataset=shapes", *SMALL_RUN)
    report = json.loads((tmp_path / f"conversion{tag}.json").read_text())
    assert (report["neuron"], report["norm"]) == mode and report["sampler"] == "ddim"
    assert load_model(str(tmp_path / f"converted_snn{tag}.pt")).snn == SNNConfig(*mode)


def test_exact_mode_reports_the_float_floor(tmp_path):
    """--neuron=graded --norm=compensated: the float64 SNN is the float64 ANN to rounding, and the
    float32 error is reported beside the ANN's own float32-vs-float64 difference."""
    write_ckpt(tmp_path)
    convert(f"--logdir={tmp_path}", "--neuron=graded", "--norm=compensated", *SMALL_RUN)
    report = json.loads((tmp_path / "conversion.json").read_text())
    assert (report["neuron"], report["norm"]) == ("graded", "compensated")
    assert report["noise_relative_error_float64"] < 1e-12
    assert report["noise_relative_error"] <= 2 * report["ann_float32_vs_float64"] + 1e-5
    assert torch.load(tmp_path / "converted_snn.pt", weights_only=True)["config"]["snn"] == \
        {"neuron": "graded", "norm": "compensated"}


def test_two_phase_mode_is_exact_with_binary_spikes(tmp_path, capsys):
    """--neuron=two_phase --norm=compensated: exact in float64, spikes in {0, 1} only, latency
    (12 neuron layers on the longest path of this one-level UNet + 1) x 3 steps, and the energy
    split by layer role, the analog layers running once per call (their ANN's energy)."""
    write_ckpt(tmp_path)
    convert(f"--logdir={tmp_path}", "--neuron=two_phase", "--norm=compensated", *SMALL_RUN)
    stdout = capsys.readouterr().out
    report = json.loads((tmp_path / "conversion.json").read_text())
    stats, energy = report["spike_stats"], report["energy"]
    assert report["neuron"] == "two_phase" and report["noise_relative_error_float64"] < 1e-12
    assert report["noise_relative_error"] <= 2 * report["ann_float32_vs_float64"] + 1e-5
    assert stats["multi_spike_fraction"] == 0 and stats["negative_spike_fraction"] == 0
    assert report["latency_steps"] == 13 * 3 and "latency 39 steps" in stdout
    parts = stats["energy_breakdown"]
    for role in ("head", "shortcut"):  # the up blocks' shortcuts: analog, held
        assert parts[role]["energy_pJ"] == pytest.approx(parts[role]["ann_energy_pJ"]) and parts[role]["energy_pJ"] > 0
    assert parts["resampling"]["energy_pJ"] == 0  # one level: no resampling
    assert 0 < parts["spike_conv"]["energy_pJ"] < parts["spike_conv"]["ann_energy_pJ"]
    assert energy["network_calls"] == 2 and energy["energy_pJ_per_image"] == pytest.approx(
        2 * stats["energy_pJ_per_sample"])
    assert energy["energy_breakdown_pJ_per_image"]["spike_conv"]["int_ann_energy_pJ"] == pytest.approx(
        2 * parts["spike_conv"]["int_ann_energy_pJ"])


def test_spike_driven_model_reads_analog_values_only_at_its_inputs(tmp_path):
    """A --spike_driven checkpoint (two levels, so resampling and channel changes exist) converts
    so that only the head conv and the first time-embedding linear read analog values: its
    shortcuts are folds and its resampling pools, without weights."""
    write_ckpt(tmp_path, spike_driven=True, ch_mult=[1, 2])
    convert(f"--logdir={tmp_path}", "--neuron=two_phase", "--norm=compensated", *SMALL_RUN)
    report = json.loads((tmp_path / "conversion.json").read_text())
    layers = [r for r in report["spike_stats"]["layers"] if r["type"] != "neuron"]
    assert {r["name"] for r in layers if r["input"] != "spikes"} == {"head", "time_embedding.timembedding.1"}
    assert not any(r["name"].endswith(("shortcut", "main")) for r in layers) and report["spike_driven"] is True
    assert report["resample"] == "pool" and report["noise_relative_error_float64"] < 1e-12


def test_spike_driven_demo_flagfiles(tmp_path):
    """config/*/demo_spike_driven.txt: the demo's model with --spike_driven, stored in its
    checkpoint, converted into two-phase neurons with compensated GroupNorm (both stages in this process)."""
    stage_in_process("ANN_train.py", "--flagfile=config/train_ANN/demo_spike_driven.txt", f"--logdir={tmp_path}",
                     "--total_steps=2", "--save_step=2", "--sample_step=0", "--batch_size=2", "--kernels=reference")
    unet_cfg = load_checkpoint(tmp_path / "ckpt.pt")["config"]["unet"]
    assert unet_cfg["spike_driven"] is True and unet_cfg["ch"] == 32 and unet_cfg["num_groups"] == 8
    convert(f"--flagfile={os.path.join(ROOT, 'config', 'SNN_convert', 'demo_spike_driven.txt')}",
            f"--logdir={tmp_path}", "--kernels=reference", *SMALL_RUN)
    report = json.loads((tmp_path / "conversion.json").read_text())
    assert (report["neuron"], report["norm"], report["spike_driven"]) == ("two_phase", "compensated", True)
