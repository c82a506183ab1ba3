"""The README's set-up commands, Python example and config-key table are
what the project does."""
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

from poet_jax.train import keys

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


def test_readme_states_the_supported_python():
  # The package installs from requires-python on; the tested pins need the
  # Python the set-up command names, which README must state too.
  required = pyproject()['project']['requires-python']  # '>=3.11'
  version = required.removeprefix('>=')
  assert f'Python {version} or newer' in readme()
  assert sys.version_info[:2] >= tuple(map(int, version.split('.')))
  tested = re.match(r'python(3\.\d+) ', setup_commands()[0]).group(1)
  assert f'Python {tested} or newer' in readme()
  assert tuple(map(int, tested.split('.'))) >= tuple(
      map(int, version.split('.')))


def test_config_key_table_is_generated_from_the_config():
  assert keys.markdown_table() in readme()


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


@pytest.mark.parametrize('index, says', [(1, 'poetized attention'),
                                         (2, 'linen MLP through optax')])
def test_each_route_example_runs_as_written(index, says, capsys):
  """The README's other ```python blocks: poetize, and optax only."""
  blocks = re.findall(r'```python\n(.*?)```', readme(), re.S)
  exec(compile(blocks[index], f'README block {index}', 'exec'), {})
  out = capsys.readouterr().out
  assert says in out
  assert float(out.split('loss ')[1].split(',')[0].split()[0]) < 0.3


def test_train_loop_example_plots_only_runs_it_trains(tmp_path, monkeypatch):
  """The example that trains from Python, run in an empty directory with
  loop.train standing in (each run's metrics written at once): every run it
  plots is one it made, so it works from anywhere."""
  from poet_jax.train import loop  # pylint: disable=g-import-not-at-top
  block = re.search(r'```\n(from poet_jax.train import config, loop, plot\n'
                    r'.*?)```', readme(), re.S).group(1)
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
