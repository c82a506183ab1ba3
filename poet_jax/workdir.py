"""The work directory: checked writable and matching the run's config before
anything is written, and its config.json."""
import errno
import os

from poet_jax import config as config_lib


class WorkdirError(ValueError):
  """The work directory cannot be written; one line for the user."""


# Keys a resumed run may change: they decide when to log, evaluate, save and
# stop, not what is computed (nan_policy: see docs/reliability.md).
RESUMABLE = ('nan_policy', 'log_every', 'eval_every', 'checkpoint_every',
             'keep_checkpoints', 'eval_at_start', 'tensorboard')


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def unwritable(path: str) -> tuple[str, str] | None:
  """Why `path` cannot be written as a directory (or created as one), as
  (the directory or file at fault, the reason); None if it can. Creates
  nothing and changes no time stamp.

  The test is os.access(W_OK | X_OK) on `path` if it exists, else on its
  nearest existing parent, with the effective user and group ids where the
  platform allows (os.supports_effective_ids; they are the ids that open()
  checks, and differ from the real ones under setuid or `sudo -u`). The
  kernel answers it with the permission bits, ACLs, a read-only mount and
  the immutable flag, as for a real write. It cannot know of a full disk, a
  quota or a network file system's server-side checks: those show on the
  first real write (exit code 5, earlier checkpoints intact).
  """
  where = _nearest_existing(path)
  if not os.path.isdir(where):
    return where, os.strerror(errno.ENOTDIR)
  effective = os.access in os.supports_effective_ids
  if os.access(where, os.W_OK | os.X_OK, effective_ids=effective):
    return None
  read_only = os.statvfs(where).f_flag & os.ST_RDONLY
  return where, os.strerror(errno.EROFS if read_only else errno.EACCES)


def check_writable(workdir: str) -> None:
  """The work directory (and its checkpoints) can be written, or WorkdirError.

  Checked first and without creating or touching anything (see
  `unwritable`): a refused start leaves the work directory exactly as it
  was, time stamps included, and a new one is made only once every check
  has passed.
  """
  for directory in (workdir, os.path.join(workdir, 'checkpoints')):
    if directory != workdir and not os.path.lexists(directory):
      continue
    problem = unwritable(directory)
    if problem:
      where, why = problem
      raise WorkdirError(
          f'work directory {workdir} cannot be written ({where}: {why}); '
          'choose another --workdir or fix its permissions')


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
