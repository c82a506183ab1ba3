"""What the command line says: --help, unknown keys, the start-up lines,
quiet tfds, data notes, evaluation at step 0, compile-free timing,
TensorBoard events and the dry run's advice."""
import contextlib
import io
import os
import subprocess

import numpy as np
import pytest
import tqdm
from tensorboard.backend.event_processing import event_accumulator

from poet_jax.data import pipeline as data_lib
from poet_jax.train import arguments
from poet_jax.train import cli
from poet_jax.train import config as config_lib
from poet_jax.train import keys as keys_lib
from poet_jax.train import loop as train_lib
from poet_jax.train import metrics as metrics_lib
from poet_jax.train.plan import planner
import tolerance
from train_util import ROOT, read_metrics, train_command, train_env

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


# ------------------------------------------------------------------ --help


def test_help_lists_every_key_with_its_default_and_meaning():
  text = cli.help_text(['train.py', '--help'])
  assert 'Exit codes' in text and '--workdir' in text
  text = text[text.index('Config keys'):]  # not the usage examples above
  for key, value in keys_lib.defaults().items():
    line = next((l for l in text.splitlines()
                 if l.strip().startswith(f'--config.{key}=')), None)
    assert line is not None, key
    assert f'--config.{key}={keys_lib.show(value)} ' in line, line
    assert keys_lib.MEANINGS[key] in line, line


def test_help_shows_the_chosen_config_files_values():
  text = cli.help_text(['train.py', '--config=configs/llama_60m.py', '-h'])
  assert '--config.model.dim=512 ' in text
  assert '--config.data.name=c4/en ' in text


def test_every_key_has_a_meaning_and_every_meaning_a_key():
  assert set(keys_lib.MEANINGS) == set(keys_lib.defaults())
  assert all(m.strip() and '\n' not in m for m in keys_lib.MEANINGS.values())


# ----------------------------------------------------------- unknown keys


@pytest.mark.parametrize('key,nearest', [
    ('sed', "'seed'"),
    ('eval_evry', "'eval_every'"),
    ('train.stepz', "'train.steps'"),
    ('trian.steps', "'train.steps'"),
    ('poet.blok_size', "'poet.block_size'"),
    ('model.dim.x', "'model.dim'"),
    ('distributed.proces_id', "'distributed.process_id'"),
    # The same name in another section before the nearest spelling.
    ('optimizer.lr', "'train.lr' or 'poet.lr'"),
])
def test_unknown_key_at_any_level_names_the_nearest(key, nearest):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(
      io.StringIO()):
    code = cli.main(['train.py', f'--config.{key}=10'])
  assert code == 2
  assert err.getvalue() == (f'error: unknown config key {key!r}; did you '
                            f'mean {nearest}?\n')


def test_unknown_key_with_nothing_near():
  result = cli.parse_command_line(['train.py', '--config.qqqqqqqq.zz=1'])
  assert result == "unknown config key 'qqqqqqqq.zz'; --help lists the keys"


def test_config_names_resolve_to_the_installed_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  for spec in ('llama_60m', 'configs/llama_60m.py'):
    command = cli.parse_command_line(['train.py', f'--config={spec}'])
    assert isinstance(command, cli.Command), command
    assert command.config.model.dim == 512
    assert command.workdir == os.path.join('runs', 'llama_60m_poet')
  assert 'does not exist' in cli.parse_command_line(
      ['train.py', '--config=elsewhere/llama_60m.py'])


# ----------------------------------------------- the rules and the notes


def paper(size='60m', **train):
  c = config_lib.paper_config(size)
  for key, value in train.items():
    setattr(c.train, key, value)
  return c


def test_eval_at_start_rule():
  tiny = config_lib.base_config()
  assert train_lib.eval_at_start(tiny, 16)[0]  # 32k tokens, every 100 steps
  # A paper config cut to 12 steps that evaluates only at its end.
  c = paper(steps=12)
  c.eval_every = 100_000
  run, why = train_lib.eval_at_start(c, 77)
  assert not run and 'eval_at_start=always' in why
  # The whole paper run: 10 M tokens are 77 batches, ~26 steps of work.
  assert train_lib.eval_at_start(paper(), 77)[0]
  # Evaluating every 10 steps with 77 batches would triple the run.
  c = paper(steps=1000)
  c.eval_every = 10
  run, why = train_lib.eval_at_start(c, 77)
  assert not run and 'more than eval_every' in why
  c.eval_at_start = 'always'
  assert train_lib.eval_at_start(c, 77)[0]
  tiny.eval_at_start = 'never'
  assert not train_lib.eval_at_start(tiny, 16)[0]


def test_data_notes_count_epochs_and_missing_held_out_tokens():
  c = config_lib.base_config()  # 300 steps x 16 sequences of 128
  stream = data_lib.TokenStream(np.zeros(129 * 1000, np.uint16), 128)
  notes = train_lib.data_notes(c, stream, num_eval_batches=2)
  assert any('the 1,000 training sequences 4.8 times' in n for n in notes)
  assert any('4,096 tokens' in n and 'eval_tokens=32,768' in n
             for n in notes)
  stream = data_lib.TokenStream(np.zeros(129 * 4800, np.uint16), 128)
  assert train_lib.data_notes(c, stream, num_eval_batches=16) == []


def test_progress_bar_clock_restarts_after_compilation():
  clock = [0.0]
  bar = tqdm.tqdm(total=10, file=io.StringIO(), mininterval=0)
  bar._time = lambda: clock[0]  # pylint: disable=protected-access
  bar.reset(total=10)
  clock[0] = 100.0  # compiling
  train_lib._restart_clock(bar, 0)  # pylint: disable=protected-access
  clock[0] += 2.0
  bar.update(1)
  clock[0] += 2.0
  bar.update(1)
  d = bar.format_dict
  assert d['elapsed'] == 4.0 and d['n'] - d['initial'] == 2
  assert bar.format_meter(**d).count('00:16') == 1  # 8 steps at 2 s left
  bar.close()


# -------------------------------------------------------------- a real run

TEXTS = ' '.join(f'word{i % 37}' for i in range(300))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One tiny run on a fresh small directory corpus, with the progress bar
  and TensorBoard on; stdout unbuffered and merged with stderr, as on a
  terminal."""
  root = tmp_path_factory.mktemp('cli')
  corpus = root / 'corpus'
  corpus.mkdir()
  names = [f'doc{i:02d}.txt' for i in range(40)]
  texts = [TEXTS[i:] + TEXTS[:i] for i in range(len(names))]
  for name, text in zip(names, texts):
    (corpus / name).write_text(text[:30])
  # The split holds out only non-empty files: decided on the files as
  # written, then the held-out ones get their long text.
  held_out = {n for n, _ in data_lib.split_files(
      [(n, str(corpus / n)) for n in names])['validation']}
  assert held_out
  for name, text in zip(names, texts):
    # Short training documents (read several times in 20 steps), long
    # held-out ones (a few batches).
    if name in held_out:
      (corpus / name).write_text(text)
  workdir = str(root / 'work')
  command = [a for a in train_command(workdir) if a != '--no_progress']
  command += [f'--config.data.name={corpus}',
              f'--config.data.data_dir={root / "data"}',
              '--config.train.steps=20', '--config.log_every=5',
              '--config.eval_every=10', '--config.eval_tokens=100000',
              '--config.tensorboard=True']
  result = subprocess.run(command, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env=train_env({'PYTHONUNBUFFERED': '1'}),
                          timeout=600)
  assert result.returncode == 0, result.stdout[-3000:]
  return workdir, result.stdout.replace('\r', '\n')


def test_tfds_is_quiet_and_says_one_line_of_its_own(run):
  _, out = run
  assert 'Downloading and preparing' not in out
  assert 'absl' not in out and 'Generating' not in out
  assert 'Shuffling' not in out
  assert sum('preparing .txt files under' in l for l in out.splitlines()) == 1


def test_workdir_line_comes_before_the_bar_on_its_own_line(run):
  workdir, out = run
  lines = out.splitlines()
  at = lines.index(f'workdir: {os.path.abspath(workdir)}')
  first_bar = next(i for i, l in enumerate(lines) if 'step/s' in l or
                   '/20 [' in l)
  assert at < first_bar


def test_run_says_what_the_data_will_do(run):
  _, out = run
  assert 'training sequences' in out and 'times' in out  # many epochs
  assert 'fewer than eval_tokens=100,000' in out
  # eval_every (10) < steps (20) and a cheap evaluation: evaluated at 0.
  assert 'step 0: evaluating the initial model' in out
  assert 'evaluating:' in out  # the evaluation's own progress bar


def test_tokens_per_s_leaves_compilation_out(run):
  workdir, _ = run
  rates = [e['tokens_per_s'] for e in read_metrics(workdir)
           if 'tokens_per_s' in e]
  assert len(rates) == 4
  # Compiling takes hundreds of steps' time here: with it, the first rate
  # would be ~100x lower than the others.
  assert rates[0] > 0.1 * np.median(rates[1:]), rates


def test_tensorboard_events_hold_the_metrics(run):
  workdir, _ = run
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard'))
  events.Reload()
  entries = read_metrics(workdir)
  for key in ('train_loss', 'eval_loss', 'learning_rate', 'tokens_per_s',
              'orth_error_max'):
    logged = [(e['step'], e[key]) for e in entries if key in e]
    scalars = [(s.step, s.value) for s in events.Scalars(key)]
    assert [s for s, _ in scalars] == [s for s, _ in logged], key
    # TensorBoard stores float32: one rounding of each value.
    np.testing.assert_allclose([v for _, v in scalars],
                               [v for _, v in logged], rtol=tolerance.EPS32)


def test_tensorboard_drops_events_after_the_resumed_checkpoint(tmp_path):
  path, tb = str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'tb')
  log = metrics_lib.MetricsLog(path, tensorboard_dir=tb)
  for step in range(1, 6):
    log.write({'step': step, 'train_loss': float(step)})
  log.close()
  log = metrics_lib.MetricsLog(path, resume_step=3, tensorboard_dir=tb)
  for step in (4, 5):
    log.write({'step': step, 'train_loss': 10.0 * step})
  log.close()
  events = event_accumulator.EventAccumulator(tb)
  events.Reload()
  assert [(s.step, s.value) for s in events.Scalars('train_loss')] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


# ---------------------------------------------------------- dry-run advice


def test_dry_run_names_settings_with_their_compiled_peaks(tmp_path,
                                                          monkeypatch,
                                                          capsys):
  c = config_lib.base_config()
  c.mesh.data = 1
  c.model.vocab_size, c.model.dim, c.model.num_layers = 64, 32, 1
  c.model.num_heads, c.model.ffn_dim, c.poet.block_size = 2, 64, 8.0
  c.train.batch_size, c.train.seq_len = 8, 16
  # A device smaller than anything: every suggestion is compiled, and
  # micro-batches go down to one sequence.
  monkeypatch.setattr(planner, 'device_memory_gib', lambda **_: 1e-6)
  monkeypatch.setattr(planner, 'LARGEST_DEVICE_GIB', 1e-6)
  plans, plan = [], planner.plan
  monkeypatch.setattr(planner, 'plan', lambda c, **kw: plans.append(
      (c, plan(c, **kw))) or plans[-1][1])
  report = planner.dry_run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert 'far above any single accelerator' in out
  figures = report['suggestions_peak_gib']
  assert list(figures) == ['model.remat=True', 'poet.compute=mem',
                           'optimizer.mu_dtype=bfloat16',
                           'model.param_dtype=bfloat16',
                           'train.grad_accum_steps=8', 'all of the above']
  for name, gib in figures.items():
    assert name in out and f'peak {gib:.3g} GiB' in out
  # Each figure is the peak of the step compiled with that setting; for
  # micro-batches, of one micro-batch plus a float32 gradient buffer.
  (_, base), *variants = plans
  assert [(v.model.remat, v.poet.compute, v.optimizer.mu_dtype,
           v.model.param_dtype, v.train.batch_size) for v, _ in variants] == [
               (True, 'fast', 'auto', 'float32', 8),
               (False, 'mem', 'auto', 'float32', 8),
               (False, 'fast', 'bfloat16', 'float32', 8),
               (False, 'fast', 'auto', 'bfloat16', 8),
               (False, 'fast', 'auto', 'float32', 1),
               (True, 'mem', 'bfloat16', 'bfloat16', 1)]
  buffer = base['trainable_params'] * 4 / planner.GIB
  assert list(figures.values()) == [
      r['peak_gib'] + (buffer if v.train.batch_size == 1 else 0)
      for v, r in variants]
  assert figures['train.grad_accum_steps=8'] < base['peak_gib']
  assert figures['all of the above'] < base['peak_gib']


def test_the_persistent_compilation_cache_flag(monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert arguments.compilation_cache_dir(None) == os.path.expanduser(
      arguments.DEFAULT_COMPILATION_CACHE)
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/tmp/elsewhere')
  assert arguments.compilation_cache_dir(None) == '/tmp/elsewhere'
  assert arguments.compilation_cache_dir('') == ''
  command = cli.parse_command_line(['train.py', '--compilation_cache=/tmp/c'])
  assert command.compilation_cache == '/tmp/c'
