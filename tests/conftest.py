import os

# Tests run on CPU; multi-device tests ask for 8 simulated devices. Set before
# JAX initializes its backends.
# Less LLVM optimization, as the train.py subprocesses of the tests use
# (tests/train_util.py): tiny programs compile in about 60% of the time and
# run in milliseconds anyway; the numbers are the same.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
