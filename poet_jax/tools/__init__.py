"""After training: restore a run, evaluate, generate, export to the Hugging
Face format (`python -m poet_jax.evaluate|generate|export`)."""
