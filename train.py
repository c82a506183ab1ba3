"""Train a Llama with POET (or a baseline): `python train.py --help`.

The command line lives in poet_jax/train/cli.py, which the installed package
runs as `poet-jax-train` (and `python -m poet_jax.train`); this file keeps
`python train.py` working from a checkout.
"""
from poet_jax.train import cli

if __name__ == '__main__':
  cli.run()
