"""`python -m poet_jax.export`: the export tool (poet_jax.tools.export)."""
import sys

from poet_jax.tools import export

if __name__ == '__main__':
  sys.exit(export.main())
