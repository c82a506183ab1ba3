"""Times the official PyTorch POET code's own training update, eagerly.

Run by poet_jax.bench.reference as a script in a separate Python that has
torch and transformers (never imported by poet_jax: no jax here). It imports
the official code from --src (a checkout of Sphere-AI-Lab/poet): its Llama
(examples/peft_pretraining/modeling_llama.py), POETModel,
get_poet_optimizer, calc_poet_grad_clipping_value and the scheduler of its
trainer, and runs the update of its examples/torchrun_main.py on one process
(forward with labels, backward, the gradient clip, optimizer.step,
scheduler.step, zero_grad, merge_if_needed). Their POET forward is
decorated with torch.compile; the driver makes torch.compile return the
function unchanged before importing their code, so the update runs eagerly,
as docs/benchmarks.md measures it (--compiled keeps their torch.compile).

Protocol, one JSON object a line: on start it prints {"ready": ...}; then
each line "run COUNT WARMUP" on stdin (WARMUP 0 or 1: one untimed step
first) answers {"seconds": [...]}; "quit" ends it. An error answers
{"error": "..."} and exits 1.
"""
import argparse
import json
import os
import sys
import time


def _flags(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--src', required=True, help='checkout of the official code')
  p.add_argument('--method', choices=('adamw', 'poet'), required=True)
  p.add_argument('--threads', type=int, default=2)
  for name in ('dim', 'layers', 'heads', 'ffn', 'vocab', 'batch', 'seq',
               'block_size'):
    p.add_argument(f'--{name}', type=int, required=True)
  p.add_argument('--merge_every', type=int, default=400)
  p.add_argument('--grad_clip', type=float, default=0.1)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--poet_lr', type=float, default=1e-3)
  p.add_argument('--compiled', action='store_true',
                 help='keep the torch.compile of their POET forward')
  return p.parse_args(argv)


def _model(a):
  """The official Llama at our sizes (their llama_60m.json otherwise)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from peft_pretraining.modeling_llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig.from_json_file(
      os.path.join(a.src, 'examples', 'configs', 'llama_60m.json'))
  config.hidden_size, config.num_hidden_layers = a.dim, a.layers
  config.num_attention_heads, config.intermediate_size = a.heads, a.ffn
  config.vocab_size, config.max_sequence_length = a.vocab, max(1024, a.seq)
  return LlamaForCausalLM(config)


def _trainer(a):
  """(model, optimizer, scheduler, clip(step)) as their trainer builds them."""
  import torch  # pylint: disable=g-import-not-at-top
  import poet_torch  # pylint: disable=g-import-not-at-top
  from peft_pretraining import training_utils  # pylint: disable=g-import-not-at-top
  model = _model(a)
  if a.method == 'poet':
    config = poet_torch.POETConfig(
        block_size=a.block_size, merge_interval=a.merge_every,
        poet_lr=a.poet_lr, base_lr=a.lr, weight_decay=0.0)
    model = poet_torch.POETModel(model, config)
    optimizer = poet_torch.get_poet_optimizer(model, config)
    params = [p for g in optimizer.param_groups for p in g['params']]

    def clip(step):
      value = poet_torch.calc_poet_grad_clipping_value(
          global_step=step, grad_clipping=a.grad_clip, warmup_steps=10,
          poet_merge_interval=a.merge_every, min_ratio=0.1, max_steps=2000)
      torch.nn.utils.clip_grad_norm_(params, value)
  else:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

    def clip(step):
      del step
      torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
  scheduler = training_utils.get_scheduler(
      optimizer=optimizer, scheduler_type='cosine', num_training_steps=10000,
      warmup_steps=1000, min_lr_ratio=0.1)
  return model, optimizer, scheduler, clip


def main(argv=None) -> int:
  a = _flags(argv)
  # Run as a script, this file's folder (poet_jax/bench) heads sys.path,
  # where our modules would shadow the standard library's for torch.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]
  sys.path[:0] = [a.src, os.path.join(a.src, 'examples')]
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(a.threads)
  if not a.compiled:
    # Their decorators run at import: an identity torch.compile, set first,
    # leaves every function as written (eager, no graph capture).
    torch.compile = lambda fn=None, **_: fn if fn else (lambda f: f)
  torch.manual_seed(0)
  model, optimizer, scheduler, clip = _trainer(a)
  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)
             for _ in range(4)]
  mask = torch.ones(a.batch, a.seq, dtype=torch.long)
  step = 0

  def update(ids):  # one iteration of torchrun_main.py's loop
    nonlocal step
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.clone()).loss
    loss.backward()
    clip(step)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    step += 1
    if a.method == 'poet':
      model.merge_if_needed(step)
    return float(loss)

  print(json.dumps({'ready': True, 'torch': torch.__version__,
                    'threads': torch.get_num_threads(),
                    'params': sum(p.numel() for p in model.parameters())}),
        flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == 'quit':
      break
    count, warmup = int(words[1]), words[2] == '1'
    if warmup:
      update(batches[0])
    seconds = []
    for i in range(count):
      start = time.perf_counter()
      update(batches[(i + 1) % len(batches)])
      seconds.append(time.perf_counter() - start)
    print(json.dumps({'seconds': seconds}), flush=True)
  return 0


if __name__ == '__main__':
  try:
    sys.exit(main())
  except Exception as e:  # pylint: disable=broad-except
    print(json.dumps({'error': f'{type(e).__name__}: {e}'}), flush=True)
    sys.exit(1)
