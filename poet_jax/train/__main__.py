"""`python -m poet_jax.train`: the trainer's command line (train.py)."""
from poet_jax.train import cli

if __name__ == '__main__':
  cli.run()
