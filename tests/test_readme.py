"""The README's Python example runs as written and does what it says."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return f.read()


def test_library_example_runs_and_learns(capsys):
  block = re.search(r'```python\n(.*?)```', readme(), re.S).group(1)
  assert len(block.strip().splitlines()) < 30
  namespace = {}
  exec(compile(block, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  loss = float(re.search(r'loss after 60 steps: ([\d.]+)', printed).group(1))
  assert loss < 0.5 * 5.55  # log(256): it memorizes the batch


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read()
  command = re.search(r'\. \.venv/bin/activate && (python -m pytest[^\n]*)',
                      readme()).group(1)
  assert command in ci
  assert 'pip install --quiet -r requirements.txt' in ci
