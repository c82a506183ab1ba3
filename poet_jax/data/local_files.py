"""A local corpus's files: which they are, its held-out split, their text.

A local corpus is the .py files of this interpreter's standard library or
the .txt files under a directory (poet_jax.data.corpora prepares either for
tfds). Here: finding the files, holding out about 5% of them as the
validation split by a hash of each relative path, reading their bytes as
text (what is not UTF-8 counted and replaced), and the digest of a
directory's contents that names its dataset.
"""
import dataclasses
import hashlib
import os
import sysconfig
from typing import Sequence

# A document is held out when the hash of its relative path falls in the
# first 5% of buckets: stable across machines, runs and file additions.
_HASH_BUCKETS = 10_000
_VALIDATION_BUCKETS = 500


def _files_under(root: str, suffix: str,
                 skip_dirs: frozenset[str] = frozenset()
                 ) -> list[tuple[str, str]]:
  """Sorted (posix relative path, path) of files under root ending in suffix.

  Hidden files and directories are skipped (editor and notebook droppings).
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames
                   if d not in skip_dirs and not d.startswith('.')]
    for name in filenames:
      if name.endswith(suffix) and not name.startswith('.'):
        path = os.path.join(dirpath, name)
        found.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  return sorted(found)


def stdlib_files() -> list[tuple[str, str]]:
  """The standard library's .py files, tests included, without site-packages.

  Tests stay in: they are ordinary Python and nearly double the corpus.
  """
  root = sysconfig.get_paths()['stdlib']
  return _files_under(root, '.py', frozenset(
      {'site-packages', 'dist-packages', '__pycache__'}))


def text_files(directory: str) -> list[tuple[str, str]]:
  return _files_under(directory, '.txt')


def printable(path: str) -> str:
  """A path for a message: a file name that is not UTF-8 (os.walk gives its
  bytes as surrogates, which print cannot encode) with those bytes as \\xNN."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


def _bucket(relpath: str) -> int:
  # The name's bytes: a name that is not UTF-8 hashes too (UTF-8 names
  # hash as their UTF-8 encoding, as they always did).
  digest = hashlib.sha256(os.fsencode(relpath)).digest()
  return int.from_bytes(digest[:8], 'big') % _HASH_BUCKETS


def _held_out(buckets: dict[str, int], candidates) -> set[str]:
  held_out = {rel for rel in candidates if buckets[rel] < _VALIDATION_BUCKETS}
  if not held_out and candidates:
    # A handful of files may all miss the 5%: hold out the one nearest the
    # cut so that both splits exist, still independent of the other files.
    held_out = {min(candidates, key=buckets.get)}
  return held_out


def split_files(files: Sequence[tuple[str, str]]
                ) -> dict[str, list[tuple[str, str]]]:
  """{'train': [...], 'validation': [...]}, each in the given order.

  A file is held out when the hash of its relative path falls in the first
  5% of buckets. Empty files are never held out: a held-out split of empty
  files could not be evaluated on.
  """
  buckets = {rel: _bucket(rel) for rel, _ in files}
  held_out = _held_out(buckets, [rel for rel, path in files
                                 if os.path.getsize(path)])
  return {'train': [f for f in files if f[0] not in held_out],
          'validation': [f for f in files if f[0] in held_out]}


def decode_text(raw: bytes) -> tuple[str, int, int | None]:
  """A corpus file's bytes as text: (text, sequences replaced, offset of the
  first).

  UTF-8; each byte sequence that is not text (invalid UTF-8, and NUL, which
  a text file never holds: a UTF-16 or binary file does) becomes one U+FFFD
  and is counted. (text, 0, None) for a clean file.
  """
  try:
    text, first = raw.decode('utf-8'), None
  except UnicodeDecodeError as e:
    text, first = raw.decode('utf-8', errors='replace'), e.start
  # U+FFFD the file itself holds (as its 3 UTF-8 bytes) is not a replacement.
  replaced = text.count('\ufffd') - raw.count('\ufffd'.encode('utf-8'))
  if '\0' in text:
    nul = raw.index(b'\0')
    first = nul if first is None else min(first, nul)
    replaced += text.count('\0')
    text = text.replace('\0', '\ufffd')
  return text, replaced, first


def read_bytes(path: str) -> bytes:
  """The bytes of a file."""
  with open(path, 'rb') as f:
    return f.read()


@dataclasses.dataclass(frozen=True)
class Scan:
  """What reading every file of a directory corpus found."""
  digest: str           # of the relative paths and the bytes of the files
  not_text: list        # (relative path, sequences replaced, first offset)


# Scans of this process, by the files' (path, size, mtime, inode): the
# validation and train splits of one start read the files once.
_SCANS: dict[tuple, Scan] = {}


def scan(files: Sequence[tuple[str, str]]) -> tuple[Scan, bool]:
  """(what the files are, whether they were read now): a digest of their
  relative paths and bytes, so a touched file or another path to the same
  files is the same corpus, and the files that are not UTF-8 text."""
  key = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino)
              for rel, st in ((rel, os.stat(path)) for rel, path in files))
  if key in _SCANS:
    return _SCANS[key], False
  h, not_text = hashlib.sha256(), []
  for rel, path in files:
    raw = read_bytes(path)
    h.update(os.fsencode(rel) + b'\0' + hashlib.sha256(raw).digest())
    _, replaced, first = decode_text(raw)
    if replaced:
      not_text.append((rel, replaced, first))
  _SCANS[key] = Scan(h.hexdigest()[:16], not_text)
  return _SCANS[key], True
