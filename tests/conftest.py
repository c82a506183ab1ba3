import os

# Tests run on CPU; multi-device tests ask for 8 simulated devices. Set before
# JAX initializes its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
