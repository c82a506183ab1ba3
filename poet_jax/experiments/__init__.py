"""The reproduction study: the papers' findings at a size a CPU can run,
over seeds (`python -m poet_jax.experiments`; studies.py)."""
