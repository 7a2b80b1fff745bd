"""Stage 4: FID / IS, energy and SNN-ANN agreement of a spiking (or quantized) DDPM.

    python evaluate.py --flagfile config/SNN_evaluate/CIFAR10_snn.txt [--flag=value ...]

``--eval_model_path`` names a converted or fine-tuned SNN checkpoint or an ANN ``ckpt.pt``; the
model is rebuilt from the configuration stored in it, so an ANN and its SNN are evaluated the
same way. Images are generated in shards under ``<logdir>/eval_<tag>/`` (a restarted run resumes
from them; under torchrun the ranks share the shards), then rank 0 computes IS and FID against
``--fid_cache``, measures the energy per generated image and, for an SNN whose ANN is at hand,
the PSNR between SNN and ANN samples drawn from the same noise. One JSON line per run is
appended to ``<logdir>/snn_eval.txt`` (``docs/formats.md``). The run is
``metrics.evaluation.evaluate``.
"""
from common import flags as cflags
from metrics.evaluation import evaluate

cflags.flags_of("evaluate.py")


def main(argv):
    evaluate(**cflags.evaluation_settings())


if __name__ == "__main__":
    cflags.run(main)
