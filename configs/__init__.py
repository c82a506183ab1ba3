"""The training configs, installed as the package poet_jax.configs."""
