"""Latent diffusion (Rombach et al. 2022) as pipeline stages: autoencoder → latent shards → diffusion
prior → decoded evaluation. The network lives in `pipeline.models.autoencoder`; this package reads
its checkpoints (`model_io`), encodes datasets (`shards`), decodes and scores samples (`evaluate`),
and offers one function per stage (`stages`)."""
