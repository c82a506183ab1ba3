"""`python -m poet_jax.evaluate`: the evaluate tool (poet_jax.tools.evaluate)."""
import sys

from poet_jax.tools import evaluate

if __name__ == '__main__':
  sys.exit(evaluate.main())
