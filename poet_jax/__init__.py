"""poet_jax: POET / POET-X training of language models in JAX, Flax NNX and optax."""
from poet_jax.layers import FrozenWeight, OrthogonalBlocks, Placement, POETLinear, init_w0
from poet_jax.merge import (merge_and_reset, merge_if_due, merge_key, merge_model, merge_model_if_due, merge_params,
                            merge_states, poet_layers)
from poet_jax.model import Llama, LlamaConfig, next_token_loss
from poet_jax.inject import layer_at, merge_with_placements, set_layer_at, set_poet_layer
from poet_jax.poetize import BiasedPOETLinear, poetize
from poet_jax.multihead import POETEinsum, POETLinearGeneral
from poet_jax.layout import KernelLayout, linen_kernel_axes
from poet_jax.reparam import (ReparameterizeState, generator_norms, merge_count, merge_due, merge_every_of,
                              reparameterize, reset_after_merge, update_count)
from poet_jax.kernels import PoetKernelsState, poet_kernels, select_kernels
from poet_jax.optim import (ScaleByPoetState, clip_by_global_norm, poet, poet_param_labels, post_merge_clip_ramp,
                            reset_poet_state, scale_by_poet, scale_by_reference_adam)
from poet_jax.orthogonal import (cayley_exact, cayley_neumann, orthogonal_blocks, orthogonality_error,
                                 params_from_skew, skew_from_params)

__version__ = '0.1.0'
