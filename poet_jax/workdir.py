"""The work directory: checked writable and matching the run's config before
anything is written, and its config.json."""
import errno
import os
import tempfile

from poet_jax import config as config_lib


class WorkdirError(ValueError):
  """The work directory cannot be written; one line for the user."""




# Keys a resumed run may change: they decide when to log, evaluate, save and
# stop, not what is computed (nan_policy: see docs/reliability.md).
RESUMABLE = ('nan_policy', 'log_every', 'eval_every', 'checkpoint_every',
             'keep_checkpoints', 'eval_at_start', 'tensorboard')


def check_writable(workdir: str) -> None:
  """The work directory (and its checkpoints) can be written, or WorkdirError.

  Checked first and without creating anything: a work directory that does
  not exist yet is made only once every check has passed. A probe file in
  the directory (or, for a new one, its nearest existing parent) is
  created and removed again.
  """
  probes = [workdir, os.path.join(workdir, 'checkpoints')]
  if not os.path.lexists(workdir):
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.lexists(parent):
      parent = os.path.dirname(parent)
    probes = [parent]
  try:
    for directory in probes:
      if directory == probes[0] or os.path.lexists(directory):
        if not os.path.isdir(directory):
          raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                   directory)
        with tempfile.NamedTemporaryFile(dir=directory, prefix='.probe'):
          pass
  except OSError as e:
    where = e.filename or workdir
    raise WorkdirError(
        f'work directory {workdir} cannot be written ({where}: '
        f'{e.strerror or e}); choose another --workdir or fix its '
        'permissions') from None


def check_config_matches(workdir: str, c, has_checkpoint: bool) -> None:
  """A work directory that holds a checkpoint belongs to one configuration:
  refuse another. Without a checkpoint there is no run to protect."""
  path = os.path.join(workdir, 'config.json')
  if not (has_checkpoint and os.path.exists(path)):
    return
  with open(path) as f:
    saved = f.read()
  current = c.to_json(sort_keys=True, indent=1)
  if saved == current:
    return
  old, new = (config_lib.flatten(s) for s in (saved, current))
  # The mesh and the processes may change between a stop and a resume, and
  # so may the keys that do not change what is computed (RESUMABLE).
  keys = sorted(k for k in old.keys() | new.keys()
                if old.get(k) != new.get(k) and k not in RESUMABLE
                and not k.startswith(('mesh.', 'distributed.')))
  if keys:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({", ".join(keys)}'
        '); use a new --workdir or the same settings to resume')


def write_config(workdir: str, c) -> None:
  """<workdir>/config.json (atomically), creating the work directory."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(c.to_json(sort_keys=True, indent=1))
  os.replace(path + '.tmp', path)
