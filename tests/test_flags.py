"""The flags generated from the settings of common/configs.py, and how given flags meet a checkpoint."""
import dataclasses
import os
import re

import pytest
from absl import flags

from common import configs
from common import flags as cflags
from common.errors import UserError
from tests.helpers import ROOT


def fresh(script):
    """A FlagValues holding exactly ``script``'s generated flags."""
    values = flags.FlagValues()
    cflags.flags_of(script, values)
    return values


def parse_error(script, *args):
    """The message absl raises for ``args`` on ``script``'s flags (None: they parse)."""
    values = fresh(script)
    try:
        values(["prog", *args])
    except flags.Error as err:
        return str(err)
    return None


def test_docs_flags_md_is_what_the_generator_prints():
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        committed = f.read()
    assert committed == cflags.markdown(), \
        "docs/flags.md is out of date: run `python -m common.flags --markdown > docs/flags.md`"


@pytest.mark.parametrize("script", sorted(cflags.SCRIPTS))
def test_every_field_is_one_flag_of_its_type(script):
    values = fresh(script)
    expected = {int: "int", float: "float", bool: "bool", tuple: "multi int"}
    for _, group in cflags.settings(script):
        for f in group:
            fl = values[f.name]
            kind = "string enum" if f.metadata["choices"] is not None else expected.get(f.type, "string")
            assert fl.flag_type() == kind, (f.name, fl.flag_type())
            default = f.metadata["flag_default"]
            assert fl.default == (list(default) if isinstance(default, tuple) else default)
            assert f.metadata["help"] in fl.help  # absl adds the choices of enums, a note to multi flags
            if f.metadata["choices"] is not None:
                assert fl.parser.enum_values == list(f.metadata["choices"])


def test_stored_and_flag_defaults_differ_only_where_said():
    """img_channels: a stored config without it is RGB (old checkpoints); the flag follows the dataset."""
    field = {f.name: f for f in dataclasses.fields(configs.UNetConfig)}["img_channels"]
    assert field.default == 3 and field.metadata["flag_default"] is None
    assert fresh("ANN_train.py")["img_channels"].default is None
    assert configs.from_dict(configs.UNetConfig, {}).img_channels == 3


@pytest.mark.parametrize("args,line", [
    (["--T=0"], "flag --T=0: --T must be at least 2"),
    (["--num_groups=0"], "flag --num_groups=0: --num_groups must be at least 1"),
    (["--ch=36"], "flags ch=36, num_groups=32: --ch must be a positive multiple of --num_groups"),
    (["--beta_1=0.1", "--beta_T=0.01"], "the beta schedule needs 0 < --beta_1 <= --beta_T < 1"),
    (["--img_size=7"], "--img_size must be a positive multiple of 2**(levels - 1)"),
    (["--lr=-1"], "flag --lr=-1.0: --lr must be positive"),
    (["--snr_gamma=-1"], "--snr_gamma must be 0 (off) or positive"),
    (["--sampler=diffusers:NoSuchScheduler"], "no scheduler class 'NoSuchScheduler'"),
    (["--sign"], "Unknown command line flag 'sign'"),
])
def test_validators_come_from_the_settings(args, line):
    message = parse_error("ANN_train.py", *args)
    assert message is not None and line in message, message


def test_stage_defaults_that_differ_are_two_fields():
    assert fresh("ANN_train.py")["lr"].default == 2e-4 and fresh("SNN_ft.py")["lr"].default == 1e-6
    assert parse_error("SNN_ft.py", "--sample_size=0") is None  # 0: no grids in stage 3
    assert "--sample_size must be at least 1" in parse_error("ANN_train.py", "--sample_size=0")
    assert parse_error("compute_fid_stats.py", "--num_images=0") is None
    assert "--num_images must be at least 1" in parse_error("evaluate.py", "--num_images=0")


def test_a_name_two_configs_define_alike_is_one_flag(monkeypatch):
    """--seed and --tag are fields of several configs: one flag per script, one value for all."""
    values = fresh("SNN_ft.py")
    values(["prog", "--seed=7", "--tag=x"])
    assert cflags.wanted(configs.FinetuneConfig, values).seed == 7
    assert cflags.wanted(configs.FinetuneRunConfig, values).tag == "x"


def test_a_name_two_configs_define_differently_fails_at_import(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class A:
        """a."""
        batch_size: int = configs.setting(128, "images per call")

    @dataclasses.dataclass(frozen=True)
    class B:
        """b."""
        batch_size: int = configs.setting(50, "images per call")

    monkeypatch.setitem(cflags.SCRIPTS, "clash.py", ((A, B), ()))
    with pytest.raises(ValueError, match="--batch_size is defined differently by A and B"):
        cflags.flags_of("clash.py", flags.FlagValues())


def test_given_names_are_absl_s_present_flags(tmp_path):
    """A flag is given when absl read it from the command line or a flagfile, not when defaulted."""
    flagfile = tmp_path / "f.txt"
    flagfile.write_text("--neuron=if\n")
    values = fresh("SNN_conversion.py")
    values(["prog", f"--flagfile={flagfile}", "--norm=step"])
    assert {"neuron", "norm"} <= cflags.given(values)
    assert "ch" not in cflags.given(values) and "seed" not in cflags.given(values)


def test_resolve_takes_given_names_over_the_stored_config():
    stored = configs.SNNConfig(neuron="if", norm="step")
    wanted = configs.SNNConfig(neuron="graded", norm="step")
    assert configs.resolve(None, wanted, set(), "x.pt") == wanted
    assert configs.resolve(stored, wanted, set(), "x.pt") == stored  # not given: the stored values
    with pytest.raises(UserError, match=re.escape("--neuron=graded contradicts x.pt, which has neuron=if; "
                                                  "drop the flag or fix it (or --restart)")):
        configs.resolve(stored, wanted, {"neuron"}, "x.pt", hint=" (or --restart)")
    train = configs.TrainConfig(lr=1e-3)
    resumed = configs.resolve(train, configs.TrainConfig(lr=5e-4, warmup=7), {"lr"}, "ckpt.pt", fixed=())
    assert resumed == configs.TrainConfig(lr=5e-4)  # given and not fixed: taken; warmup not given: stored
    assert configs.changes(train, resumed) == [("lr", 5e-4, 1e-3)]


def test_model_config_follows_the_dataset_unless_given():
    wanted = configs.ModelConfig(dataclasses.replace(configs.UNetConfig(), img_channels=None),
                                 data=configs.DataConfig(dataset="mnist"))
    assert configs.model_config(wanted, set()).unet.img_channels == 1
    bad = dataclasses.replace(wanted, unet=configs.UNetConfig(img_channels=3))
    with pytest.raises(UserError, match="--img_channels=3 contradicts --dataset=mnist"):
        configs.model_config(bad, {"img_channels"})
    stored = configs.ModelConfig(configs.UNetConfig(ch=32))
    with pytest.raises(UserError, match=r"--ch=128 contradicts s.pt, which has ch=32"):
        configs.model_config(configs.ModelConfig(), {"ch"}, stored, "s.pt")
    assert configs.model_config(configs.ModelConfig(), {"bit"}, stored, "s.pt") == stored  # same value given


def test_only_the_flags_module_and_the_scripts_touch_flags():
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".venv", ".git", "tests", "logs", "data", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.relpath(os.path.join(folder, name), ROOT)
                with open(os.path.join(folder, name)) as f:
                    text = f.read()
                if "FLAGS" in text:
                    found.add(path)
    assert found <= set(cflags.SCRIPTS) | {os.path.join("common", "flags.py")}, found
    for module in (cflags, configs):  # what is given is absl's to say, not the raw command line
        with open(module.__file__) as f:
            assert "sys.argv" not in f.read()
