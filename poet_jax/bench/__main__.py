"""`python -m poet_jax.bench`: see poet_jax/bench/__init__.py."""
import sys

from poet_jax.bench.cli import main

sys.exit(main())
