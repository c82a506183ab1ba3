"""`python -m poet_jax.plot`: the loss plot (poet_jax.train.plot)."""
import sys

from poet_jax.train import plot

if __name__ == '__main__':
  sys.exit(plot.main())
