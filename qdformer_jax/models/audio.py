"""Audio encoders: VGGish (the paper's, docs/DESIGN.md §1), the Audio Spectrogram Transformer
(`'ast'`, AudioSet-trained, stronger) or a narrow VGG-style net for small configs.

Each maps one audio example per frame (one second) to an embedding of `encoder.out_dim` channels:
VGGish and the small net take VGGish log-mel [B, 96, 64] -> 128 (the final ReLU kept), AST its own
filterbanks [B, 98, 128] -> 768 (`qdformer_jax.data.audio.example_shape` gives the input shape of
each, and the pipeline computes the matching one). The model's audio projection reads `out_dim`,
so the rest of the model does not depend on the choice.
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
    self.out_dim = 128
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


AUDIO_ENCODERS = ('vggish', 'ast', 'small')


def build_audio_encoder(config, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """config.encoder in AUDIO_ENCODERS (config.width for 'small'; config.ast overrides the AST size)."""
  if config.encoder == 'ast':
    from qdformer_jax.models.ast import AST_SPECS, AudioSpectrogramTransformer
    spec = dict(AST_SPECS['base'])
    spec.update({k: int(v) for k, v in dict(config.get('ast') or {}).items()})
    return AudioSpectrogramTransformer(**spec, dtype=dtype, rngs=rngs)
  if config.encoder == 'vggish':
    from qdformer_jax.models.vggish import VGGish
    return VGGish(dtype=dtype, rngs=rngs)
  if config.encoder == 'small':
    return SmallAudioNet(config.width, dtype=dtype, rngs=rngs)
  raise ValueError(f'model.audio.encoder must be one of {list(AUDIO_ENCODERS)}, got {config.encoder!r}')
