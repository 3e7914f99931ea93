"""VGGish audio network (Hershey et al. 2017): log-mel example [B, 96, 64] -> embedding [B, 128].

The architecture of the TF original and of torchvggish's `VGG`: the log-mel patch (96 frames x 64
mel bands) is an image [B, 96, 64, 1]; convs 3x3 (stride 1, padding 1) + ReLU with channels
64, M, 128, M, 256, 256, M, 512, 512, M (M = 2x2 max-pool, stride 2) give [B, 6, 4, 512], which is
flattened in NHWC order (torchvggish transposes its NCHW map to NHWC before `view`, to match TF),
then FC 12288 -> 4096 -> 4096 -> 128, each followed by ReLU (the final ReLU is kept). No PCA /
quantisation post-processing.

Layer names are the TF checkpoint's (conv1, conv2, conv3_1, conv3_2, conv4_1, conv4_2, fc1_1,
fc1_2, fc2); `qdformer_jax.convert.vggish` maps torchvggish's `features.{0,3,6,8,11,13}` and
`embeddings.{0,2,4}` onto them. Freezing (AVSBench keeps VGGish frozen) is the caller's
`jax.lax.stop_gradient` / optimizer filter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qdformer_jax.models.layers import max_pool

# (name, in channels, out channels, max-pool after this conv)
VGGISH_CONVS = (
    ('conv1', 1, 64, True),
    ('conv2', 64, 128, True),
    ('conv3_1', 128, 256, False),
    ('conv3_2', 256, 256, True),
    ('conv4_1', 256, 512, False),
    ('conv4_2', 512, 512, True),
)
VGGISH_FCS = (('fc1_1', 512 * 6 * 4, 4096), ('fc1_2', 4096, 4096), ('fc2', 4096, 128))
NUM_FRAMES, NUM_BANDS, EMBEDDING_SIZE = 96, 64, 128


class VGGish(nnx.Module):
  """`__call__(log_mel [B,96,64] or [B,96,64,1]) -> [B,128]` (post-ReLU embedding, no PCA)."""

  def __init__(self, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.out_dim = EMBEDDING_SIZE
    for name, cin, cout, _ in VGGISH_CONVS:
      setattr(self, name, nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs))
    for name, fin, fout in VGGISH_FCS:
      setattr(self, name, nnx.Linear(fin, fout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs))

  token_grid = (NUM_FRAMES // 16, NUM_BANDS // 16)  # the last conv map: 6 x 4 (time x frequency)
  token_channels = 512

  def __call__(self, log_mel: jax.Array) -> jax.Array:
    return self.embed(self.token_map(log_mel))

  def token_map(self, log_mel: jax.Array) -> jax.Array:
    """log-mel -> the last conv map [B, 6, 4, 512] (before the flatten and the FCs)."""
    x = log_mel
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (NUM_FRAMES, NUM_BANDS, 1):
      raise ValueError(f'VGGish expects log-mel examples [B,{NUM_FRAMES},{NUM_BANDS}] '
                       f'(or [..., 1]), got shape {log_mel.shape}.')
    x = x.astype(self.dtype)
    for name, _, _, pool in VGGISH_CONVS:
      x = jax.nn.relu(getattr(self, name)(x))
      if pool:
        x = max_pool(x, 2, 2)
    return x

  def embed(self, feature_map: jax.Array) -> jax.Array:
    """The map of ``token_map`` -> the 128-d embedding."""
    x = feature_map.reshape(feature_map.shape[0], -1)  # NHWC flatten, as TF / torchvggish
    for name, _, _ in VGGISH_FCS:
      x = jax.nn.relu(getattr(self, name)(x))
    return x
