"""The results table of a run folder, in the seed's shape, from the lines of its ``snn_eval.txt``.

    python -m metrics.results --logdir=logs/demo        # prints it and writes logs/demo/results.md

One row per evaluated model (the newest line of each model, mode and sampler): the quantized ANN,
the converted and the fine-tuned SNNs in each conversion mode evaluated. Columns: FID and the
second score in the record's feature network (named above the table), recognisability, PSNR to
the ANN's samples from the same noise, energy per generated image (the model's own: an ANN's
32-bit float MACs), the same quantized ANN on integer-activation hardware, the ANN's float-MAC
energy over the model's (``docs/energy.md``), the latency in time steps per network call and
the firing rate.
"""
import argparse
import json
import os

from common.atomic import atomic_open


def read_records(path):
    """The JSON lines of an ``snn_eval.txt``, oldest first (unreadable lines are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def describe(record):
    """What a row is: 'quantized ANN', 'SNN, converted' or 'SNN, fine-tuned' (by its file name),
    with ', spike-driven' for a spike-driven UNet."""
    unet = ", spike-driven" if record.get("spike_driven") else ""
    if record["kind"] == "ann":
        return f"quantized ANN ({record['bit']}-bit){unet}"
    name = os.path.basename(record["model_path"])
    tuned = name.startswith("snn_ft") or "backpack" in record["model_path"]
    return ("SNN, fine-tuned" if tuned else "SNN, converted") + unet


def _row_key(record):
    return (record["model_path"], record.get("neuron"), record.get("norm"), record["sampler"], record["sample_steps"])


def newest_rows(records):
    """The newest record of each (model, mode, sampler), the ANN first, then in order of appearance."""
    newest = {}
    for record in records:
        newest.pop(_row_key(record), None)
        newest[_row_key(record)] = record
    rows = list(newest.values())
    return [r for r in rows if r["kind"] == "ann"] + [r for r in rows if r["kind"] != "ann"]


def _number(value, fmt):
    return "–" if value is None else (value if isinstance(value, str) else format(value, fmt))


def _uj(pj):
    return None if pj is None else pj / 1e6


def table(records):
    """The markdown table (with a line naming the features and sampler) of ``newest_rows(records)``."""
    rows = newest_rows(records)
    features = sorted({r.get("features") or "none" for r in rows})
    samplers = sorted({f"{r['sampler']} {r['sample_steps']} calls, {r['num_images']} images" for r in rows})
    lines = [f"Scores in the features of {', '.join(features)}; sampling: {'; '.join(samplers)}.", "",
             "| model | neuron | norm | FID | IS | recognisability | PSNR to ANN (dB) | energy / image (uJ) "
             "| integer ANN / image (uJ) | ANN / model | latency (steps) | firing rate |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        snn = r["kind"] == "snn"
        lines.append(f"| {describe(r)} | {r.get('neuron') or '–'} | {r.get('norm') or '–'} "
                     f"| {_number(r.get('FID'), '.2f')} | {_number(r.get('IS'), '.2f')} "
                     f"| {_number(r.get('recognisability'), '.3f')} | {_number(r.get('psnr_snn_vs_ann_dB'), '.1f')} "
                     f"| {_number(_uj(r.get('energy_pJ_per_image')), '.1f')} "
                     f"| {_number(_uj(r.get('int_ann_energy_pJ_per_image')), '.1f')} "
                     f"| {_number(r.get('energy_ratio_ann_over_snn') if snn else None, '.2f')} "
                     f"| {_number(r.get('latency_steps'), 'd')} "
                     f"| {_number(r.get('firing_rate') if snn else None, '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True, help="the run folder holding snn_eval.txt")
    args = parser.parse_args(argv)
    path = os.path.join(args.logdir, "snn_eval.txt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: run evaluate.py with --logdir={args.logdir} first")
    text = table(read_records(path))
    with atomic_open(os.path.join(args.logdir, "results.md"), "w") as f:
        f.write(text)
    print(text + f"\nwritten to {os.path.join(args.logdir, 'results.md')}")


if __name__ == "__main__":
    main()
