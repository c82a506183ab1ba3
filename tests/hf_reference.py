"""transformers' side of the Hugging Face tests (tests/test_export.py).

A random Llama-3-shaped model built and saved by transformers itself, and
transformers' logits of a checkpoint directory. torch and transformers are
imported only when called (the tests skip these parts without them). Also
a script, for an interpreter that has them where they cannot be installed
beside jax:

  python tests/hf_reference.py build DIR tied|untied   # DIR/logits.npy too
  python tests/hf_reference.py logits DIR OUT.npy
"""
import os
import sys

import numpy as np

# Grouped-query attention (2 key/value heads for 4), Llama-3's rotary base
# and norm eps; weights drawn with std 0.1 so that each setting shows in
# the logits.
LLAMA3 = dict(vocab_size=300, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
              max_position_embeddings=64, initializer_range=0.1)
IDS = np.random.default_rng(1).integers(0, 257, (2, 16)).astype(np.int64)


def build(directory: str, tied: bool) -> np.ndarray:
  """Saves a random LlamaForCausalLM of LLAMA3's shape (safetensors) to
  `directory`; returns its logits of IDS (2, 16, vocab) float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**LLAMA3, tie_word_embeddings=tied,
                                    attn_implementation='eager')
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:  # ones by default: give the norms a say too
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return logits(directory)


def logits(directory: str, ids: np.ndarray = IDS) -> np.ndarray:
  """transformers' float32 logits of `ids` from a checkpoint directory."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation='eager').eval()
  assert type(model).__name__ == 'LlamaForCausalLM'
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


if __name__ == '__main__':
  if sys.argv[1] == 'build':
    np.save(os.path.join(sys.argv[2], 'logits.npy'),
            build(sys.argv[2], sys.argv[3] == 'tied'))
  else:
    np.save(sys.argv[3], logits(sys.argv[2]))
