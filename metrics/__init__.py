"""Evaluation of generated images: FID / IS through pytorch-gan-metrics' Inception network,
reference statistics files, sharded resumable generation, SNN-versus-ANN agreement."""
