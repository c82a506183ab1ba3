"""Training: the configuration and its checks, the command line
(`python -m poet_jax.train`, `poet-jax-train`, train.py), start-up, the
loop, the train state and steps, checkpoints, sharding, metrics and the loss
plot; plan/ is the dry run."""
