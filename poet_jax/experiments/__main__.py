"""`python -m poet_jax.experiments`: the reproduction study's command line."""
import sys

from poet_jax.experiments import studies

if __name__ == '__main__':
  sys.exit(studies.main(sys.argv[1:]))
