"""poet_jax: POET / POET-X training of language models in JAX, Flax NNX and optax.

The library is the package's top level (the orthogonal maps, placements,
layers, compute paths, quantization, merge, poetize, the optax
transformations); its applications are subpackages that import it: models/
(the Llama), data/, train/ (with train/plan/, the dry run), tools/, bench/
and experiments/.
"""
from poet_jax.clipping import clip_by_global_norm, post_merge_clip_ramp
from poet_jax.inject import layer_at, merge_with_placements, set_layer_at, set_poet_layer
from poet_jax.kernels import PoetKernelsState, poet_kernels, select_kernels
from poet_jax.layers import FrozenWeight, OrthogonalBlocks, Placement, POETLinear, init_w0
from poet_jax.layout import KernelLayout, linen_kernel_axes
from poet_jax.merge import (merge_and_reset, merge_if_due, merge_key, merge_model, merge_model_if_due, merge_params,
                            merge_states, poet_layers)
from poet_jax.models.llama import Llama, LlamaConfig, next_token_loss
from poet_jax.multihead import POETEinsum, POETLinearGeneral
from poet_jax.optim import ScaleByPoetState, poet, poet_param_labels, reset_poet_state, scale_by_poet, scale_by_reference_adam
from poet_jax.orthogonal import (cayley_exact, cayley_neumann, orthogonal_blocks, orthogonality_error,
                                 params_from_skew, skew_from_params)
from poet_jax.poetize import BiasedPOETLinear, poetize
from poet_jax.reparam import (ReparameterizeState, generator_norms, merge_count, merge_due, merge_every_of,
                              reparameterize, reset_after_merge, update_count)

__version__ = '0.1.0'
