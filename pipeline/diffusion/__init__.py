"""The torch-only math core. Importing the package registers the processes and losses that live in
modules of their own (the exact DDPM chain with `sde.build_sde`, score matching with
`losses.build_loss`), so that rebuilding either by name never depends on which module was imported."""

from . import chain, score_matching  # noqa: F401  (registration)
