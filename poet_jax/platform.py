"""The platform the code being traced is compiled for.

`platform()` is the one place the code asks which platform it is being
compiled for (the attention core, the tokens-major layout, the merge's
select, the compiler options): inside `compiling_for(target)` it is the
target's (a dry run for an H100 on a CPU machine: poet_jax.train.plan),
elsewhere the default backend's.
"""
import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar('poet_jax_target', default=None)


@contextlib.contextmanager
def compiling_for(target: str | None):
  """Within: platform() is `target`'s ('gpu' for a GPU target such as
  'h100', 'cpu' for 'cpu'); None leaves it to the default backend."""
  token = _TARGET.set(target)
  try:
    yield
  finally:
    _TARGET.reset(token)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform the code traced now is compiled
  for. Every choice the code makes by backend asks this, never
  jax.default_backend(), so that a dry run for an H100 on a CPU machine
  traces what an H100 runs.

  It is read while tracing: JAX reuses the trace of a function it has
  traced before, so each target gets jax.jit objects of its own
  (steps.compile_steps makes new ones on every call)."""
  target = _TARGET.get()
  if target is None:
    return jax.default_backend()
  return 'cpu' if target == 'cpu' else 'gpu'


def runs_here() -> bool:
  """Whether what is traced now will run on this machine. False while
  compiling for a platform this machine lacks (an H100 dry run on a CPU
  machine): such executables are never run, and host callbacks
  (jax.debug.callback) cannot even be compiled for them."""
  if _TARGET.get() is None:
    return True
  try:
    return bool(jax.devices(platform()))
  except RuntimeError:
    return False
