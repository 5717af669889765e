"""Prefect flows of the diffusion pipeline: thin tasks over `pipeline.stages`, passing URIs."""
