"""train.py with the test-only faults of tests/faults.py installed (the
POET_JAX_FAULT and POET_JAX_KILL_AT_STEP environment variables); without
them it trains exactly as train.py does."""
import os
import sys

# The checkout's poet_jax, as `python train.py` from the checkout uses.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import faults
from poet_jax.train import cli
from poet_jax.train import hooks

if __name__ == '__main__':
  hooks.current = faults.Faults(os.environ)
  cli.run()
