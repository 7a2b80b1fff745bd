"""The scripts' absl flags, generated from the settings of ``common.configs`` (``docs/flags.md``).

A script calls ``flags_of(<its file name>)`` at import time: every field of the configs it uses
(``SCRIPTS``) becomes a flag of the field's name, type, default and help, and a value outside
the field's domain is refused while the command line is parsed, before any work starts, with
one line naming the flag, the value and what would be valid. Two configs of one script that
define the same name must define the same flag (one flag), else importing the script fails.

Flags become configs here and only here: ``<stage>_settings`` turns a script's flags into the
keyword arguments of its one library call (``train_settings`` for ``model.train.train``, ...);
what counts as given is what absl saw on the command line or in a flagfile. How a checkpoint's
stored config and the given flags combine is ``common.configs``'s. Nothing writes into FLAGS.

    python -m common.flags --markdown > docs/flags.md
"""
import argparse
import dataclasses
import functools
import sys

from absl import flags

from common import configs, errors

FLAGS = flags.FLAGS

# the configs whose fields are each script's flags, and fields left out ("Class.field")
SCRIPTS = {
    "ANN_train.py": ((configs.ModelConfig, configs.LoaderConfig, configs.RuntimeConfig, configs.SamplerConfig,
                      configs.TrainConfig, configs.TrainRunConfig), ()),
    "SNN_conversion.py": ((configs.ModelConfig, configs.LoaderConfig, configs.RuntimeConfig, configs.SamplerConfig,
                           configs.SNNConfig, configs.ConversionConfig), ()),
    "SNN_ft.py": ((configs.ModelConfig, configs.LoaderConfig, configs.RuntimeConfig, configs.SamplerConfig,
                   configs.SNNConfig, configs.FinetuneConfig, configs.FinetuneRunConfig), ()),
    "evaluate.py": ((configs.ModelConfig, configs.RuntimeConfig, configs.SamplerConfig, configs.EvalConfig),
                    ("DataConfig.dataset",)),
    "compute_fid_stats.py": ((configs.DataConfig, configs.LoaderConfig, configs.FidStatsConfig),
                             ("DataConfig.img_size",)),
}

# flags removed, and what to give instead (their use is an unknown flag with this hint)
REMOVED = {"sign": "--neuron=signed", "nosign": "--neuron=if"}


def _sampler_exists(name):
    """ddpm, ddim, a named diffusers sampler or ``diffusers:<ClassName>`` of a scheduler class that
    exists (only such a name imports diffusers: a few seconds)."""
    if name in ("ddpm", "ddim"):
        return True
    import schedulers
    if name not in schedulers.NAMED:
        schedulers.scheduler_class(name)  # ValueError: its message is the error line
    return True


# checks that need modules above the configs
LATE_CHECKS = {"sampler": _sampler_exists}


def settings(script):
    """[(config class, [fields])] of ``script``: a ModelConfig as its three parts, then its own checks."""
    classes, skip = SCRIPTS[script]
    groups = []
    for cls in classes:
        parts = [f.default_factory for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)] \
            if cls is configs.ModelConfig else [cls]
        for part in parts:
            groups.append((part, [f for f in dataclasses.fields(part) if f"{part.__name__}.{f.name}" not in skip]))
        if cls is configs.ModelConfig:
            groups.append((cls, []))
    return groups


def _signature(f):
    m = f.metadata
    return (f.type, m["flag_default"], m["help"], m["choices"], m["message"])


def flags_of(script, flag_values=FLAGS):
    """Define the flags of ``script`` (a key of ``SCRIPTS``) in ``flag_values`` and register their validators."""
    seen = {}
    for cls, group in settings(script):
        for f in group:
            if f.name in seen:
                if _signature(seen[f.name][1]) != _signature(f):
                    raise ValueError(f"{script}: --{f.name} is defined differently by {seen[f.name][0].__name__} "
                                     f"and {cls.__name__}; give them one definition or rename one")
                continue
            seen[f.name] = (cls, f)
            _define(f, flag_values)
        for check in getattr(cls, "CHECKS", ()):
            missing = [name for name in check.names if name not in seen]
            if missing:
                raise ValueError(f"{script}: a check of {cls.__name__} needs the flags {missing}")
            flags.register_multi_flags_validator(list(check.names), _guarded(check.test), message=check.message,
                                                 flag_values=flag_values)


def _define(f, flag_values):
    m = f.metadata
    default, name, help = m["flag_default"], f.name, m["help"]
    kw = {"help": help, "flag_values": flag_values}
    if f.type is tuple:
        flags.DEFINE_multi_integer(name, list(default), **kw)
    elif f.type is bool:
        flags.DEFINE_bool(name, default, **kw)
    elif f.type is int:
        flags.DEFINE_integer(name, default, **kw)
    elif f.type is float:
        flags.DEFINE_float(name, default, **kw)
    elif m["choices"] is not None:
        flags.DEFINE_enum(name, default, list(m["choices"]), **kw)
    else:
        flags.DEFINE_string(name, default, **kw)
    if m["check"] is not None:
        flags.register_validator(name, _guarded(m["check"]), message=f"--{name} {m['message']}",
                                 flag_values=flag_values)
    if name in LATE_CHECKS:
        flags.register_validator(name, _guarded(LATE_CHECKS[name]), flag_values=flag_values)


def _guarded(test):
    """``test`` as an absl validator: a ValueError it raises becomes the error line."""
    def valid(value):
        try:
            return test(value)
        except ValueError as err:
            raise flags.ValidationError(str(err)) from None
    return valid


def parse(argv):
    """absl's flag parsing with a bad flag, value or flagfile reported as one line (exit 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        message = str(err).replace("ERROR:: ", "")
        removed = [f"--{name} is gone: give {instead}" for name, instead in REMOVED.items()
                   if f"flag '{name}'" in message or f"flag '--{name}'" in message]
        print(f"error: {message}{'; ' + removed[0] if removed else ''} (--helpfull lists the flags)", file=sys.stderr)
        sys.exit(2)


def run(main):
    """``common.errors.run(main)`` with this module's one-line flag parsing."""
    errors.run(main, flags_parser=parse)


# flags -> configs ---------------------------------------------------------------------------

def given(flag_values=FLAGS):
    """The names of the flags given explicitly (command line or flagfile), as absl parsed them."""
    return {name for name in flag_values if flag_values[name].present}


def wanted(cls, flag_values=FLAGS):
    """``cls`` from the flags of its field names; fields that are no flag of this script keep the default."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in flag_values:
            value = flag_values[f.name].value
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _stage_settings(flag_values, **classes):
    """The keyword arguments of stage 2's and stage 3's library call: the wanted model, the names
    given, the run folder, the runtime (``kernels()`` applied) and ``{name: wanted(cls)}``."""
    runtime_cfg = dataclasses.replace(wanted(configs.RuntimeConfig, flag_values), kernels=kernels(flag_values))
    return {"logdir": runtime_cfg.folder(flag_values.bit), "model_cfg": wanted_model(flag_values),
            "given": given(flag_values), "runtime_cfg": runtime_cfg,
            **{name: wanted(cls, flag_values) for name, cls in classes.items()}}


def conversion_settings(flag_values=FLAGS):
    """SNN_conversion.py's flags as the keyword arguments of ``snn.conversion.convert_run``."""
    return _stage_settings(flag_values, snn_cfg=configs.SNNConfig, sampler_cfg=configs.SamplerConfig,
                           conversion_cfg=configs.ConversionConfig, loader_cfg=configs.LoaderConfig)


def finetune_settings(flag_values=FLAGS):
    """SNN_ft.py's flags as the keyword arguments of ``snn.finetune_run.finetune_run``."""
    return _stage_settings(flag_values, snn_cfg=configs.SNNConfig, sampler_cfg=configs.SamplerConfig,
                           ft_cfg=configs.FinetuneConfig, run_cfg=configs.FinetuneRunConfig,
                           loader_cfg=configs.LoaderConfig)


def values_of(script, argv):
    """Flag values of their own holding ``script``'s flags parsed from ``argv`` (what follows
    ``python script`` on a command line, flagfiles included): a stage run in-process with the
    settings functions above, e.g. ``finetune_run(**finetune_settings(values_of("SNN_ft.py", argv)))``."""
    values = flags.FlagValues()
    flags_of(script, values)
    values([script, *argv])
    return values


@functools.lru_cache(maxsize=None)
def _parallel_kernels_note(kernels):
    print(f"note: --kernels={kernels} is not used with --parallel (DataParallel); torchrun runs the compiled kernels")


def kernels(flag_values=FLAGS):
    """``--kernels``, except under ``--parallel``: DataParallel's replica threads run the reference."""
    if flag_values.parallel and flag_values.kernels != "reference":
        _parallel_kernels_note(flag_values.kernels)  # once per process
        return "reference"
    return flag_values.kernels


def wanted_model(flag_values=FLAGS):
    """The ``ModelConfig`` of the flags alone (``unet.img_channels`` None: the dataset's)."""
    return configs.ModelConfig(**{f.name: wanted(f.default_factory, flag_values)
                                  for f in dataclasses.fields(configs.ModelConfig)})


def train_settings(flag_values=FLAGS):
    """ANN_train.py's flags as the keyword arguments of ``model.train.train``."""
    def of(cls):
        return wanted(cls, flag_values)
    runtime_cfg = dataclasses.replace(of(configs.RuntimeConfig), kernels=kernels(flag_values))
    return {"model_cfg": wanted_model(flag_values), "train_cfg": of(configs.TrainConfig),
            "run_cfg": of(configs.TrainRunConfig), "logdir": runtime_cfg.folder(flag_values.bit),
            "given": given(flag_values), "sampler_cfg": of(configs.SamplerConfig), "loader_cfg": of(configs.LoaderConfig),
            "runtime_cfg": runtime_cfg, "flags_text": flag_values.flags_into_string()}


def evaluation_settings(flag_values=FLAGS):
    """evaluate.py's flags as the arguments of ``metrics.evaluation.evaluate``."""
    return {"cfg": wanted(configs.EvalConfig, flag_values), "sampler_cfg": wanted(configs.SamplerConfig, flag_values),
            "logdir": wanted(configs.RuntimeConfig, flag_values).folder(flag_values.bit),
            "model": wanted_model(flag_values), "given": given(flag_values), "kernels": kernels(flag_values),
            "parallel": flag_values.parallel}


def fid_stats_settings(flag_values=FLAGS):
    """compute_fid_stats.py's flags as the arguments of ``metrics.fid_stats.compute_fid_stats``."""
    return {"cfg": wanted(configs.FidStatsConfig, flag_values), "dataset": flag_values.dataset,
            "data_dir": flag_values.data_dir}


# docs/flags.md --------------------------------------------------------------------------------

INTRO = """# Flags

<!-- generated by `python -m common.flags --markdown > docs/flags.md`; edit common/configs.py -->

Every script is an absl app: `python SCRIPT.py --flagfile config/<stage>/<name>.txt [--flag=value
...]`; flags on the command line override the flagfile. `--helpfull` lists them all. Each flag is
a setting of `common/configs.py`, defined once with its default and the values it accepts: a
value outside them is refused while the command line is parsed, before any work, with one line
naming the flag, the value and what would be valid.

## What comes from a checkpoint

The model flags (UNet, diffusion, data) are stored in every checkpoint (`config`, see
[formats.md](formats.md)). Stages 2-4, and a resumed stage 1, rebuild the model from the
checkpoint: a model flag *not* given takes the checkpoint's value; one given (on the command
line or in a flagfile) that contradicts it is a one-line error. So `python ANN_train.py
--logdir=logs/x --total_steps=N` continues the stored model on the stored data, and `python
SNN_ft.py --logdir=logs/x` continues an interrupted fine-tuning with its stored settings.

A resumed training run takes its training settings (stage 1's optimisation below) from the
checkpoint too; one given with another value is applied from the resumed step on, said in one
line, and recorded in the next checkpoint. A resumed fine-tuning keeps the conversion mode and
`--val_size`, `--seed`, `--judge_images`, `--judge_steps`, `--judge_eta` of its backpack (a
contradicting flag is an error; `--restart` starts again); its other settings apply to the
remaining blocks, said in one line.

`--sign` / `--nosign` are no flags: give `--neuron=signed` / `--neuron=if`.
"""


def _shown_default(f):
    value = f.metadata["flag_default"]
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) + " (repeat the flag)" if value else "none (repeat the flag)"
    return f"`{value}`" if value != "" else "empty"


def _cell(text):
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _accepts(f):
    m = f.metadata
    if m["choices"] is not None:
        return " / ".join(f"`{c}`" if c else "empty" for c in m["choices"])
    return _cell(m["message"]) if m["message"] else ""


def markdown():
    """docs/flags.md: for each script, its flags by config with default, meaning and valid values."""
    lines = [INTRO]
    for script in SCRIPTS:
        lines += [f"## `{script}`", ""]
        for cls, group in settings(script):
            checks = getattr(cls, "CHECKS", ())
            if not group and not checks:
                continue
            lines += [f"**{cls.__name__}**: {cls.__doc__.splitlines()[0]}", ""]
            if group:
                lines += ["| flag | default | meaning | accepts |", "|---|---|---|---|"]
                lines += [f"| `--{f.name}` | {_cell(_shown_default(f))} | {_cell(f.metadata['help'])} | {_accepts(f)} |"
                          for f in group]
                lines.append("")
            lines += [f"- {_cell(check.message)}" for check in checks]
            lines += [""] if checks else []
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the scripts' flags as generated from common/configs.py")
    parser.add_argument("--markdown", action="store_true", required=True, help="print docs/flags.md")
    parser.parse_args()
    sys.stdout.write(markdown())
