"""The work directory: checked writable and matching the run's config before
anything is written, owned by one live trainer, never written by the tools,
and its config.json."""
import errno
import fcntl
import json
import os

from poet_jax.train import config as config_lib


class WorkdirError(ValueError):
  """The work directory cannot be written; one line for the user."""


# Keys a resumed run may change: they decide when to log, evaluate, save and
# stop, not what is computed (nan_policy: see docs/reliability.md).
RESUMABLE = ('nan_policy', 'log_every', 'eval_every', 'checkpoint_every',
             'keep_checkpoints', 'eval_at_start', 'tensorboard',
             # refused then, or the same text: the data identity decides
             'data.decode_errors')


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


def _saved_config(workdir: str) -> dict | None:
  """The dotted keys of <workdir>/config.json; None if there is none.

  Raises ConfigError for one that cannot be read, or that is not a poet_jax
  run's (a Hugging Face export's, say): the trainer neither compares with
  nor overwrites it.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.lexists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    reason = getattr(e, 'strerror', None) or type(e).__name__
    raise config_lib.ConfigError(
        f'{path} cannot be read ({reason}): it should be the config this run '
        'was started with; restore it, or, if this command has the run\'s '
        'settings, delete it and run the command again (it is rewritten)'
    ) from None
  # Any version's config shares keys with this one's; another tool's (a
  # Hugging Face config.json: model_type, hidden_size, ...) shares none.
  if (not isinstance(saved, dict) or
      not saved.keys() & config_lib.base_config().keys()):
    raise config_lib.ConfigError(
        f'{path} is not the config of a poet_jax run (is {workdir} a '
        'Hugging Face export?); choose another --workdir')
  return config_lib.flatten(json.dumps(saved))


def check_config_matches(workdir: str, c, has_checkpoint: bool,
                         also_resumable=()) -> None:
  """A work directory that holds a checkpoint belongs to one configuration:
  refuse another. Without a checkpoint there is no run to protect, but a
  config.json that is not a run's (damaged, or another tool's) is refused
  all the same: the run would overwrite it.

  also_resumable: keys that may change too (the data's and tokenizer's
  paths, when the checkpoint records their identity: that is compared
  instead).
  """
  old = _saved_config(workdir)
  if not has_checkpoint or old is None:
    return
  new = config_lib.flatten(c.to_json(sort_keys=True, indent=1))
  # The mesh and the processes may change between a stop and a resume, and
  # so may the keys that do not change what is computed (RESUMABLE).
  keys = sorted(k for k in old.keys() | new.keys()
                if old.get(k) != new.get(k)
                and k not in RESUMABLE + tuple(also_resumable)
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


# --------------------------------------------------------- whose files these are


def is_run_directory(path: str) -> bool:
  """Whether path is a training run's work directory: its config.json and
  its metrics or checkpoints (the trainer writes both before the first
  step; an export or a plot has neither)."""
  return os.path.isfile(os.path.join(path, 'config.json')) and (
      os.path.isfile(os.path.join(path, 'metrics.jsonl')) or
      os.path.isdir(os.path.join(path, 'checkpoints')))


# What the trainer writes in a work directory.
RUN_ENTRIES = ('config.json', 'metrics.jsonl', 'loss.png', 'memory.json',
               'checkpoints', 'tensorboard')


def run_owning(path: str, itself: bool = True, runs=()) -> str | None:
  """The run whose files writing `path` (links resolved) would overwrite or
  mix with: path is its work directory (unless not `itself`), one of its
  RUN_ENTRIES or inside one. A new name beside a run's files, or a run's
  directory inside another one's, is no run's. `runs`: directories to take
  as runs (one about to start). None if none."""
  path = os.path.realpath(path)
  runs = {os.path.realpath(r) for r in runs}
  child = None
  if not itself:
    path, child = os.path.dirname(path), os.path.basename(path)
  while True:
    if ((path in runs or is_run_directory(path)) and
        (child is None or child in RUN_ENTRIES)):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path, child = parent, os.path.basename(path)


def check_outside_runs(path: str, what: str, runs=()) -> None:
  """WorkdirError when writing `path` (a file or directory; `what` names
  the flag) could overwrite or mix with a training run's files
  (run_owning; `runs` as there)."""
  run = run_owning(path, runs=runs)
  if run:
    where = ('the work directory of' if run == os.path.realpath(path) else
             "one of the files of")
    raise WorkdirError(
        f'{what}={path} is {where} the run {run}, which it could '
        'overwrite; give a path outside the run\'s files')


# ----------------------------------------------- one live trainer per directory


def _lock_holder(path: str) -> int | None:
  """The process holding a flock on path (Linux /proc/locks), if known."""
  try:
    st = os.stat(path)
    with open('/proc/locks') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  where = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
  for line in lines:
    fields = line.split()
    # '1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF'; '->' marks waiters
    if len(fields) > 5 and fields[1] == 'FLOCK' and fields[5] == where:
      return int(fields[4]) if fields[4].isdigit() else None
  return None


def lock(workdir: str) -> int | None:
  """An exclusive lock on the work directory for this trainer: the open
  descriptor holding it (release with os.close), None where the file system
  cannot lock (a warning is printed).

  flock(2) on the directory itself: nothing is created, and the kernel
  releases it when the process ends, however it ends (kill -9 included), so
  a killed trainer never leaves it stuck. Raises WorkdirError when a live
  trainer holds it.
  """
  fd = os.open(workdir, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    holder = _lock_holder(workdir)
    who = f' (process {holder})' if holder else ''
    raise WorkdirError(
        f'work directory {workdir} is in use by another trainer{who}; wait '
        'for it to finish or stop it, or choose another --workdir') from None
  except OSError as e:  # a network file system without flock
    os.close(fd)
    print(f'warning: work directory {workdir} cannot be locked ({e.strerror}'
          '); make sure no other trainer uses it', flush=True)
    return None
  return fd
