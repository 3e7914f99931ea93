"""Audio encoders: VGGish (the paper's, DESIGN.md §1) or a narrow VGG-style net for small configs.

Both map VGGish log-mel examples [B, 96, 64] to 128-d embeddings (the final ReLU kept), so the rest
of the model does not depend on the choice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SmallAudioNet(nnx.Module):
  """Three strided 3×3 convs (width w, 2w, 4w), global average pool, Linear to 128, ReLU."""

  def __init__(self, width: int = 16, *, dtype=jnp.float32, rngs: nnx.Rngs):
    chans = [1, width, 2 * width, 4 * width]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, dtype=dtype, rngs=rngs)
                           for a, b in zip(chans[:-1], chans[1:])])
    self.fc = nnx.Linear(chans[-1], 128, dtype=dtype, rngs=rngs)

  def __call__(self, log_mel):
    x = log_mel[..., None]
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return jax.nn.relu(self.fc(x.mean(axis=(1, 2))))


def build_audio_encoder(config, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """config.encoder in {'vggish', 'small'} (config.width for 'small')."""
  if config.encoder == 'vggish':
    from qdformer_jax.models.vggish import VGGish
    return VGGish(dtype=dtype, rngs=rngs)
  if config.encoder == 'small':
    return SmallAudioNet(config.get('width', 16), dtype=dtype, rngs=rngs)
  raise ValueError(f"model.audio.encoder must be 'vggish' or 'small', got {config.encoder!r}")
