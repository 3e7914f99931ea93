"""Audio encoders: VGGish (the paper's, docs/DESIGN.md §1) or a narrow VGG-style net for small configs.

Both map VGGish log-mel examples [B, 96, 64] to 128-d embeddings (the final ReLU kept), so the rest
of the model does not depend on the choice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SmallAudioNet(nnx.Module):
  """Three strided 3×3 convs (width w, 2w, 4w), mean over time, frequency × channels flattened,
  Linear to 128, ReLU.

  Only the time axis is pooled: like VGGish's flatten, the head keeps where in frequency each
  feature is, so the absolute pitch of a sound (the fundamental and its partials) reaches the
  embedding. Averaging over frequency as well would leave only pitch-invariant patterns.
  """

  def __init__(self, width: int = 16, *, dtype=jnp.float32, rngs: nnx.Rngs, num_bands: int = 64):
    chans = [1, width, 2 * width, 4 * width]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, dtype=dtype, rngs=rngs)
                           for a, b in zip(chans[:-1], chans[1:])])
    bands = num_bands
    for _ in self.convs:
      bands = -(-bands // 2)  # 'SAME' padding, stride 2
    self.fc = nnx.Linear(bands * chans[-1], 128, dtype=dtype, rngs=rngs)
    frames = 96
    for _ in self.convs:
      frames = -(-frames // 2)
    self.token_grid = (frames, bands)   # the time-frequency map before pooling (12 x 8 for 96 x 64)
    self.token_channels = chans[-1]

  def token_map(self, log_mel):
    """log_mel [B, frames, bands] -> the conv map before pooling [B, frames', bands', 4w]."""
    x = log_mel[..., None]
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return x

  def embed(self, feature_map):
    """The map of ``token_map`` -> [B, 128]."""
    x = feature_map.mean(axis=1)  # over time: [B, bands', C]
    return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))

  def __call__(self, log_mel):
    """log_mel [B, frames, bands] -> [B, 128]."""
    return self.embed(self.token_map(log_mel))


def build_audio_encoder(config, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """config.encoder in {'vggish', 'small'} (config.width for 'small')."""
  if config.encoder == 'vggish':
    from qdformer_jax.models.vggish import VGGish
    return VGGish(dtype=dtype, rngs=rngs)
  if config.encoder == 'small':
    return SmallAudioNet(config.get('width', 16), dtype=dtype, rngs=rngs)
  raise ValueError(f"model.audio.encoder must be 'vggish' or 'small', got {config.encoder!r}")
