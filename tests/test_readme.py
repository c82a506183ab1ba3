"""The README's set-up commands and Python examples, and the config-key
table and examples of docs/, are what the project does."""
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

from poet_jax.train import keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


def readme():
  return read('README.md')


def python_blocks(path):
  return re.findall(r'```python\n(.*?)```', read(path), re.S)


def test_library_example_runs_and_learns(capsys):
  """docs/library.md's POET Llama in a hand-written step."""
  block = python_blocks('docs/library.md')[0]
  assert len(block.strip().splitlines()) < 30
  namespace = {}
  exec(compile(block, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  loss = float(re.search(r'loss after 60 steps: ([\d.]+)', printed).group(1))
  assert loss < 0.5 * 5.55  # log(256): it memorizes the batch


def setup_commands():
  """The indented command lines of the set-up section."""
  section = readme().split('## Set up on a fresh machine')[1].split('\n## ')[0]
  return [l.strip() for l in section.splitlines() if l.startswith('    ')]


def test_readme_gives_two_setup_commands_that_install_the_package():
  install, tests = setup_commands()
  steps = install.split(' && ')
  assert re.fullmatch(r'python3\.\d+ -m venv \.venv', steps[0]), steps[0]
  assert steps[1] == '. .venv/bin/activate'
  assert 'pip install -r requirements.txt' in steps
  assert steps.index('pip install -e .') > steps.index(
      'pip install -r requirements.txt')
  assert steps[-1] == 'poet-jax-train'
  assert tests == ('. .venv/bin/activate && pip install -e '
                   "'.[plan]' && python -m pytest -q -n 2 --dist loadfile "
                   'tests')


def test_ci_installs_and_tests_as_the_readme_says():
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read()
  install, tests = setup_commands()
  steps = install.split(' && ')[:-1] + tests.split(' && ')[1:]
  for step in steps:
    quiet = step.replace('pip install', 'pip install --quiet')
    assert step in ci or quiet in ci, step
  # In the README's order.
  where = [max(ci.find(s), ci.find(s.replace('pip install', 'pip install '
                                              '--quiet'))) for s in steps]
  assert where == sorted(where), steps


def pyproject():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def test_readme_states_the_tested_versions():
  # The set-up command's Python and requirements.txt's pins are the ones
  # README says the project is tested with; the package accepts that Python.
  tested = re.match(r'python(3\.\d+) ', setup_commands()[0]).group(1)
  pins = dict(l.split('==') for l in read('requirements.txt').splitlines()
              if '==' in l and not l.startswith('#'))
  assert pins['jax'] == pins['jaxlib']
  line = (f"Tested with Python {tested}, jax/jaxlib {pins['jax']}, "
          f"flax {pins['flax']} (the pins in\nrequirements.txt)")
  assert line in readme()
  required = pyproject()['project']['requires-python'].removeprefix('>=')
  assert tuple(map(int, tested.split('.'))) >= tuple(
      map(int, required.split('.')))
  assert sys.version_info[:2] >= tuple(map(int, required.split('.')))


def test_config_key_table_is_generated_from_the_config():
  assert keys.markdown_table() in read('docs/training.md')


DOCS = ['README.md'] + [os.path.join('docs', f) for f in sorted(
    os.listdir(os.path.join(ROOT, 'docs'))) if f.endswith('.md')]


@pytest.mark.parametrize('path', DOCS)
def test_docs_describe_the_project_without_issue_numbers(path):
  found = re.findall(r'\b[Ii]ssues? \d+|\B#\d+\b', read(path))
  assert not found, found


def test_entry_points_name_functions_that_exist():
  scripts = pyproject()['project']['scripts']
  for name in ('poet-jax-train', 'poet-jax-plot'):
    module, function = scripts[name].split(':')
    assert callable(getattr(importlib.import_module(module), function))


def test_installed_package_imports_from_another_directory(tmp_path):
  """Outside the checkout, `import poet_jax` is the installed package (not
  the checkout folder as a namespace package) and finds its configs."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  script = ('import importlib.util, sys\n'
            "if importlib.util.find_spec('poet_jax') is None: sys.exit(3)\n"
            'import poet_jax, poet_jax.train.arguments as arguments\n'
            'print(poet_jax.LlamaConfig.__name__, arguments.CONFIG_DIR)\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path,
                          capture_output=True, text=True, env=env,
                          timeout=300)
  if result.returncode == 3:
    pytest.skip('poet-jax is not installed here (pip install -e .)')
  assert result.returncode == 0, result.stderr[-2000:]
  name, config_dir = result.stdout.split()
  assert name == 'LlamaConfig'
  assert os.path.isfile(os.path.join(config_dir, 'llama_60m.py'))


@pytest.mark.parametrize('path, index, says', [
    ('README.md', 0, 'poetized attention'),
    ('docs/library.md', 1, 'linen MLP through optax')])
def test_each_route_example_runs_as_written(path, index, says, capsys):
  """README's poetize example, and docs/library.md's optax-only one; README
  shows what its example prints (the loss to within a few percent: the
  last digits are one CPU's rounding)."""
  block = python_blocks(path)[index]
  exec(compile(block, f'{path} block {index}', 'exec'), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert says in out
  loss = float(out.split('loss ')[1].split(',')[0].split()[0])
  assert loss < 0.3
  if path == 'README.md':
    shown = re.search(r'prints `(.*?)`', readme()).group(1)
    number = r'loss [\d.]+'
    assert re.sub(number, 'loss', shown) == re.sub(number, 'loss', out.strip())
    assert float(shown.split('loss ')[1].split(',')[0]) == pytest.approx(
        loss, rel=0.25)


def test_train_loop_example_plots_only_runs_it_trains(tmp_path, monkeypatch):
  """docs/library.md's example that trains from Python, run in an empty
  directory with loop.train standing in (each run's metrics written at
  once): every run it plots is one it made, so it works from anywhere."""
  from poet_jax.train import loop  # pylint: disable=g-import-not-at-top
  block = re.search(r'```\n(from poet_jax.train import config, loop, plot\n'
                    r'.*?)```', read('docs/library.md'), re.S).group(1)
  trained = []

  def train(c, workdir):
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write('{"step": 10, "train_loss": 3.0}\n')
    trained.append((workdir, c.optimizer.name))
    return 0

  monkeypatch.setattr(loop, 'train', train)
  monkeypatch.chdir(tmp_path)
  exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  assert len(trained) == 2 and os.path.isfile('compare.png')
