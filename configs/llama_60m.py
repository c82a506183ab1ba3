"""Llama-60M of the POET papers (spec, section 8) on C4."""
from poet_jax.train import config


def get_config():
  return config.paper_config('60m')
