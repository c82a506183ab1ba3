"""`python -m poet_jax.generate`: the generate tool (poet_jax.tools.generate)."""
import sys

from poet_jax.tools import generate

if __name__ == '__main__':
  sys.exit(generate.main())
