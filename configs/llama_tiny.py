"""The default: a tiny POET Llama on the embedded corpus, minutes on a CPU."""
from poet_jax.train import config


def get_config():
  return config.base_config()
