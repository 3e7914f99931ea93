"""QDFormer (docs/DESIGN.md §1): encoders, global decomposition, local calibration, mask decoding.

Data flow for a batch of B clips of T frames (d = hidden_dim, N = num_queries, K = codebook_size):

  frames ─ backbone ─ C2..C5 ─ input proj (+ extra level) ─ deformable encoder ─ F_v (L levels)
  log-mel ─ audio encoder ─ Linear ─ F_a [B,T,d]
  global fusion (Eq. 3):     F'_a = LN(FFN(h_a) + h_a),  h_a = LN(MCA(F_a, F_v^{stride 32}) + F_a)
  global ASD (Eq. 4):        g_i = TrD_global(p_i | F'_a)                     [B,N,d]
  shared codebook:           e_i = VQ(g_i), straight-through
  AVSR (Eq. 5), every level: F'_v = BN(φ(w_1⊙F_v ⊕ … ⊕ w_N⊙F_v) + F_v),  w_i = MLP(e_i)
  local ASD (Eq. 6):         l_{i,t} = TrD_local(p_i | f_{a,t}), VQ against sg(codebook)
  FPN over F'_v and C2 ─ f_out at stride 4
  TrD_segm per frame: queries = quantized local tokens of frame t, deformable cross-attention to F'_v(t)
  heads per decoder layer: class / box / dynamic filter θ;  mask M = f_out ∗ θ (Eq. 7, CondInst)

Ablation switches (paper Table 2): ``decomposition`` (False: the baseline whose decoder queries are
prototypes plus the frame's audio feature), ``quantize``, ``avsr``, ``local_calibration``.
Bottleneck options (docs/DESIGN.md §1.6): ``quantizer`` ('vq' | 'fsq'), ``vq_gradient`` ('ste' |
'rotation'), ``vq_ema_decay``, ``local_audio_tokens`` (the local ASD attends over the audio encoder's
time-frequency map instead of one pooled vector per frame), ``query_pos_from_token`` (decoder query
positions and reference points computed from the quantized token, not learned per slot).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdformer_jax.models import modules
from qdformer_jax.models.attention import FeedForward, MultiHeadAttention, TransformerDecoderLayer, layer_norm
from qdformer_jax.models.audio import build_audio_encoder
from qdformer_jax.models.backbones import build_backbone
from qdformer_jax.models.deformable import DeformableDecoderLayer, DeformableEncoder, sine_position_embedding
from qdformer_jax.models.layers import REMAT_POLICIES, check_remat, remat, resolve_dtype
from qdformer_jax.models.quantizer import FSQ, BottleneckStep, VectorQuantizer, codebook_usage, per_slot_perplexity

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DYNAMIC_LAYERS = 3  # CondInst: (mask_dim + 2) -> c -> c -> 1


class AVSR(nnx.Module):
  """Audio-visual semantic recombination (Eq. 5) for one encoder level.

  φ(w_1⊙F ⊕ … ⊕ w_N⊙F) with φ a 1×1 conv N·d→d equals F · (Σ_i diag(w_i) W_i): the per-clip
  [d, d] matrix is formed once, so the N-fold concatenation is never materialised.
  """

  def __init__(self, dim: int, num_tokens: int, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.phi = nnx.Param(init(rngs.params(), (num_tokens * dim, dim)).reshape(num_tokens, dim, dim))
    self.phi_bias = nnx.Param(jnp.zeros((dim,)))
    self.norm = nnx.BatchNorm(dim, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, feature, weights, *, train: bool):
    """feature [B,T,h,w,d], weights [B,N,d] -> [B,T,h,w,d]."""
    mix = jnp.einsum('bnc,ncd->bcd', weights.astype(jnp.float32), self.phi[...]).astype(self.dtype)
    y = jnp.einsum('bthwc,bcd->bthwd', feature.astype(self.dtype), mix) + self.phi_bias[...].astype(self.dtype)
    return self.norm(y + feature, use_running_average=not train)


class GlobalFusion(nnx.Module):
  """Eq. 3: audio tokens attend to the clip's visual tokens; residual + LN, FFN + residual + LN."""

  def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.attn = MultiHeadAttention(dim, heads, dropout, rngs=rngs, dtype=dtype)
    self.norm1 = layer_norm(dim, rngs=rngs, dtype=dtype)
    self.ffn = FeedForward(dim, ffn_dim, dropout, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(dim, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, audio, audio_pos, visual, visual_pos, visual_mask, *, train: bool):
    h = self.attn(audio + audio_pos, visual + visual_pos, visual, key_mask=visual_mask, deterministic=not train)
    h = self.norm1(audio + self.dropout(h, deterministic=not train))
    return self.norm2(h + self.dropout(self.ffn(h, deterministic=not train), deterministic=not train))


class SemanticDecoder(nnx.Module):
  """Audio semantic decoder (Fig. 4a): the N prototypes query audio features (Eq. 4 and 6)."""

  def __init__(self, num_layers: int, dim: int, heads: int, ffn_dim: int, dropout: float, *, dtype,
               rngs: nnx.Rngs):
    self.layers = nnx.List([TransformerDecoderLayer(dim, heads, ffn_dim, dropout, rngs=rngs, dtype=dtype)
                            for _ in range(num_layers)])

  def __call__(self, prototypes, memory, memory_pos, memory_mask, *, train: bool):
    tgt = prototypes
    for layer in self.layers:
      tgt = layer(tgt, memory, query_pos=None, memory_pos=memory_pos, memory_mask=memory_mask,
                  deterministic=not train)
    return tgt


class FPN(nnx.Module):
  """Top-down FPN over the (AVSR-modulated) encoder levels at strides 8, 16, 32 and backbone C2."""

  def __init__(self, dim: int, c2_channels: int, mask_dim: int, *, dtype, rngs: nnx.Rngs):
    self.laterals = nnx.List([modules.ConvGN(dim, dim, 1, dtype=dtype, rngs=rngs) for _ in range(2)]
                             + [modules.ConvGN(c2_channels, dim, 1, dtype=dtype, rngs=rngs)])
    self.outputs = nnx.List([modules.ConvGN(dim, dim, 3, relu=True, dtype=dtype, rngs=rngs) for _ in range(3)])
    self.head = nnx.Conv(dim, mask_dim, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, levels, c2):
    """levels: [stride 8, stride 16, stride 32] maps [M,h,w,d]; c2 [M,H/4,W/4,c] -> [M,H/4,W/4,mask_dim]."""
    y = levels[2]
    for lateral, output, skip in zip(self.laterals, self.outputs, (levels[1], levels[0], c2)):
      y = jax.image.resize(y, skip.shape[:3] + y.shape[3:], 'nearest')
      y = output(lateral(skip) + y)
    return self.head(y)


def dynamic_mask(features, params, centers, channels: int):
  """Eq. 7, CondInst: three 1×1 layers with per-query weights over [features, relative coords].

  features [M,h,w,D], params [M,N,P] (P = (D+2)c + c + c² + c + c + 1), centers [M,N,2] (x, y in [0,1])
  -> mask logits [M,N,h,w].
  """
  m, h, w, d = features.shape
  c = channels
  sizes = [(d + 2) * c, c, c * c, c, c, 1]
  splits = np.cumsum(sizes)[:-1].tolist()
  w1, b1, w2, b2, w3, b3 = jnp.split(params, splits, axis=-1)
  w1 = w1.reshape(m, -1, d + 2, c)
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
  xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
  rel_x = xs[None, None, None, :] - centers[..., 0, None, None]  # [M,N,1,w]
  rel_y = ys[None, None, :, None] - centers[..., 1, None, None]  # [M,N,h,1]
  x = jnp.einsum('mhwd,mndc->mnhwc', features, w1[:, :, :d].astype(features.dtype))
  x = x + rel_x[..., None] * w1[:, :, None, None, d] + rel_y[..., None] * w1[:, :, None, None, d + 1]
  x = jax.nn.relu(x + b1[:, :, None, None, :])
  x = jax.nn.relu(jnp.einsum('mnhwc,mnce->mnhwe', x, w2.reshape(m, -1, c, c)) + b2[:, :, None, None, :])
  x = jnp.einsum('mnhwc,mnc->mnhw', x, w3) + b3[..., None]
  return x


class QDFormer(nnx.Module):
  """The whole model; ``__call__(frames uint8 [B,T,H,W,3], log_mel [B,T,96,64], frame_valid)``
  (``log_mel`` is the audio encoder's example per frame: AST filterbanks [B,T,98,128] with
  ``model.audio.encoder='ast'``)."""

  def __init__(self, config, num_classes: int, *, rngs: nnx.Rngs):
    cfg = config
    dtype = resolve_dtype(cfg.dtype, 'model.dtype')
    d, n = cfg.hidden_dim, cfg.num_queries
    self.config = cfg
    self.dtype = dtype
    self.num_classes = num_classes
    # Rematerialised in the backward pass: backbone blocks, encoder layers, decoder layers + masks.
    self.remat = check_remat(cfg.get('remat', 'none'))
    self.backbone = build_backbone(cfg.backbone, rngs, remat=self.remat)
    chans = self.backbone.out_channels
    self.num_levels = cfg.num_feature_levels
    projections = [modules.ConvGN(c, d, 1, dtype=dtype, rngs=rngs) for c in chans[1:]]
    for i in range(self.num_levels - 3):
      projections.append(modules.ConvGN(chans[-1] if i == 0 else d, d, 3, 2, dtype=dtype, rngs=rngs))
    self.input_proj = nnx.List(projections)
    enc = cfg.encoder
    self.encoder = DeformableEncoder(enc.layers, d, enc.heads, enc.points, self.num_levels, enc.ffn_dim,
                                     enc.dropout, rngs=rngs, dtype=dtype, remat=self.remat)
    self.audio_encoder = build_audio_encoder(cfg.audio, dtype=dtype, rngs=rngs)
    self.audio_proj = nnx.Linear(self.audio_encoder.out_dim, d, dtype=dtype, rngs=rngs)
    self.fusion = GlobalFusion(d, cfg.heads, cfg.ffn_dim, cfg.dropout, dtype=dtype, rngs=rngs)
    # Unit-scale prototypes: tokens of different slots start apart, so they do not all fall on one
    # codeword at initialisation (with near-zero prototypes every slot quantizes identically).
    self.prototypes = nnx.Param(jax.random.normal(rngs.params(), (n, d)))
    self.global_asd = SemanticDecoder(cfg.asd_layers, d, cfg.heads, cfg.ffn_dim, cfg.dropout, dtype=dtype,
                                      rngs=rngs)
    self.local_asd = SemanticDecoder(cfg.asd_layers, d, cfg.heads, cfg.ffn_dim, cfg.dropout, dtype=dtype,
                                     rngs=rngs)
    kind = cfg.get('quantizer', 'vq')
    if kind == 'fsq':
      self.quantizer = FSQ(d, cfg.fsq_levels, dtype=dtype, rngs=rngs)
    elif kind == 'vq':
      self.quantizer = VectorQuantizer(cfg.codebook_size, d, normalize=bool(cfg.get('vq_normalize', False)),
                                       gradient=cfg.get('vq_gradient', 'ste'),
                                       ema_decay=float(cfg.get('vq_ema_decay', 0.0)), rngs=rngs)
    else:
      raise ValueError(f"model.quantizer must be 'vq' or 'fsq', got {kind!r}")
    self.num_codes = self.quantizer.num_codes
    self.avsr_weights = modules.MLP(d, d, d, 2, dtype=dtype, rngs=rngs)
    self.avsr = nnx.List([AVSR(d, n, dtype=dtype, rngs=rngs) for _ in range(self.num_levels)])
    self.baseline_audio_query = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
    self.fpn = FPN(d, chans[0], cfg.mask_dim, dtype=dtype, rngs=rngs)
    self.query_pos = nnx.Param(jax.random.normal(rngs.params(), (n, d)))
    self.reference_points = nnx.Linear(d, 2, dtype=dtype, rngs=rngs)
    self.decoder = nnx.List([
        DeformableDecoderLayer(d, cfg.heads, cfg.decoder_points, self.num_levels, cfg.ffn_dim, cfg.dropout,
                               rngs=rngs, dtype=dtype) for _ in range(cfg.dec_layers)])
    self.decoder_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
    self.class_head = modules.MLP(d, d, num_classes, 2, dtype=dtype, rngs=rngs)
    # Iterative box refinement (Deformable-DETR ``with_box_refine``, used by ReferFormer): each decoder
    # layer has its own box head, and its box (detached) is the next layer's reference, so the
    # cross-attention of later layers samples where the object is. Off: one shared head, every layer
    # samples around the same learned per-slot point.
    self.box_refine = bool(cfg.get('box_refine', True))
    # ``box_head`` serves the first layer (every layer without refinement), ``refine_box_heads`` the rest.
    self.box_head = modules.MLP(d, d, 4, 2, dtype=dtype, rngs=rngs, last_init=nnx.initializers.zeros)
    c = cfg.dynamic_channels
    num_filter_params = (cfg.mask_dim + 2) * c + c + c * c + c + c + 1
    self.filter_head = modules.MLP(d, d, num_filter_params, 2, dtype=dtype, rngs=rngs)
    # Created last, so that a model with and without refinement share every other initial value.
    self.refine_box_heads = nnx.List([
        modules.MLP(d, d, 4, 2, dtype=dtype, rngs=rngs, last_init=nnx.initializers.zeros)
        for _ in range(cfg.dec_layers - 1 if self.box_refine else 0)])
    # Optional bottleneck modules, created after every other one so that switching them on leaves
    # every other initial value unchanged.
    self.local_audio_tokens = bool(cfg.get('local_audio_tokens', False))
    if self.local_audio_tokens:
      if not hasattr(self.audio_encoder, 'token_map'):
        raise ValueError(f'model.local_audio_tokens needs an audio encoder with a time-frequency map '
                         f"('vggish' or 'small'), not model.audio.encoder={cfg.audio.encoder!r}")
      self.audio_token_proj = nnx.Linear(self.audio_encoder.token_channels, d, dtype=dtype, rngs=rngs)
    self.query_pos_from_token = bool(cfg.get('query_pos_from_token', False))
    if self.query_pos_from_token:
      self.token_query_pos = modules.MLP(d, d, d, 2, dtype=dtype, rngs=rngs)
    # Continuous warm-up: the first vq_warmup_steps train steps bypass the quantizer (the tokens learn
    # to carry the audio first), then the codebook starts on a k-means of that step's tokens.
    # The length is state (restored with the checkpoint): a fraction of training is resolved into
    # steps by the trainer (optim.resolve_warmup) before the state is initialised.
    warmup_steps = int(cfg.get('vq_warmup_steps', 0) or 0)
    self.vq_warmup = warmup_steps > 0 or float(cfg.get('vq_warmup_fraction', 0.0) or 0.0) > 0
    if self.vq_warmup:
      if kind != 'vq':
        raise ValueError("model.vq_warmup_steps / vq_warmup_fraction need the learned codebook (model.quantizer='vq')")
      self.bottleneck_step = BottleneckStep(jnp.zeros((), jnp.int32))
      self.bottleneck_opens_at = BottleneckStep(jnp.asarray(warmup_steps, jnp.int32))

  # -- stages ----------------------------------------------------------------------------------------
  # ``__call__`` runs these in order; benchmarks/stages.py times and counts each one on its own.

  def backbone_features(self, frames):
    """frames uint8 [B,T,H,W,3] -> [C2, C3, C4, C5] of the B·T frames (ImageNet-normalised on the device)."""
    b, t, h, w, _ = frames.shape
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    x = ((frames.astype(jnp.float32) - mean) / std).astype(self.dtype).reshape(b * t, h, w, 3)
    return self.backbone(x)

  def encode_features(self, feats, *, train: bool):
    """Input projections (+ the extra stride-64 level) and the deformable encoder -> F_v (L levels)."""
    srcs = [proj(f) for proj, f in zip(self.input_proj[:3], feats[1:])]
    extra = feats[-1]
    for proj in self.input_proj[3:]:
      extra = proj(extra)
      srcs.append(extra)
    return self.encoder(srcs, deterministic=not train)

  def encode_visual(self, frames, *, train: bool):
    feats = self.backbone_features(frames)
    return feats[0], self.encode_features(feats, train=train)

  def encode_audio(self, log_mel):
    """log-mel [B,T,96,64] -> (F_a [B,T,d], per-frame audio tokens [B·T,h·w,d] or None).

    The tokens (``local_audio_tokens``) are the audio encoder's time-frequency map before its pooling,
    projected to d: what the local decomposition attends over instead of the one pooled vector."""
    b, t = log_mel.shape[:2]
    x = log_mel.reshape(b * t, *log_mel.shape[2:]).astype(self.dtype)
    frozen = (lambda v: v) if self.config.audio.trainable else jax.lax.stop_gradient
    if not self.local_audio_tokens:
      return self.audio_proj(frozen(self.audio_encoder(x))).reshape(b, t, -1), None
    feature_map = self.audio_encoder.token_map(x)
    emb = frozen(self.audio_encoder.embed(feature_map))
    tokens = self.audio_token_proj(frozen(feature_map).reshape(b * t, -1, feature_map.shape[-1]))
    return self.audio_proj(emb).reshape(b, t, -1), tokens

  def decompose(self, memory_coarse, audio, frame_valid, *, train: bool, audio_tokens=None):
    """Global fusion (Eq. 3), global ASD (Eq. 4), the codebook, the AVSR weights and the local tokens
    (Eq. 6). memory_coarse: the stride-32 level [B·T,h,w,d]; audio F_a [B,T,d]; audio_tokens
    [B·T,S,d] (``local_audio_tokens``) or None.

    Returns (AVSR weight tokens [B,N,d] or None, decoder queries [B,T,N,d], vq dict or None,
    bottleneck dict: the continuous per-frame tokens [B,T,N,d] the queries come from and, quantized,
    their code indices [B,T,N]).
    """
    cfg = self.config
    b, t, d = audio.shape
    n = cfg.num_queries
    audio_pos = modules.sine_embedding_1d(t, d).astype(self.dtype)[None]
    prototypes = jnp.broadcast_to(self.prototypes[...].astype(self.dtype), (b, n, d))
    if not cfg.decomposition:
      # Table 2 baseline: no decomposition; the queries are the prototypes conditioned on the frame's audio.
      queries = prototypes[:, None] + self.baseline_audio_query(audio)[:, :, None, :]
      return None, queries, None, {'tokens': queries}
    vq = None
    # Eq. 3: global fusion with the stride-32 level of all T frames.
    level = memory_coarse
    lh, lw = level.shape[1:3]
    visual = level.reshape(b, t * lh * lw, d)
    visual_pos = jnp.broadcast_to(sine_position_embedding(lh, lw, d).astype(self.dtype)[None, None],
                                  (b, t, lh, lw, d)).reshape(b, t * lh * lw, d)
    visual_mask = jnp.repeat(frame_valid, lh * lw, axis=1)
    fused = self.fusion(audio, audio_pos, visual, visual_pos, visual_mask, train=train)
    # Eq. 4: global semantic tokens, quantized with the shared codebook.
    g = self.global_asd(prototypes, fused, audio_pos, frame_valid, train=train)
    active = None
    if cfg.quantize:
      gq = self.quantizer(g)
      g, e = gq['tokens'], gq['quantized']
      if self.vq_warmup:
        active = self.bottleneck_step[...] >= self.bottleneck_opens_at[...]
        e = jnp.where(active, e, g)
    else:
      e = g
    w_tokens = None
    if cfg.avsr:
      w_tokens = self.avsr_weights(e if cfg.avsr_input == 'quantized' else g)
    # Eq. 6: local tokens per frame from the frame's audio feature, committed to the frozen codebook.
    if cfg.local_calibration:
      if audio_tokens is None:
        frame_audio, frame_pos = audio.reshape(b * t, 1, d), None
      else:
        hw = self.audio_encoder.token_grid
        frame_audio = audio_tokens
        frame_pos = jnp.broadcast_to(sine_position_embedding(*hw, d).astype(self.dtype).reshape(1, -1, d),
                                     audio_tokens.shape)
      local = self.local_asd(jnp.repeat(prototypes, t, axis=0), frame_audio, frame_pos, None, train=train)
      local = local.reshape(b, t, n, d)
      if cfg.quantize:
        lq = self.quantizer(local, update_codebook=False)
        local, queries = lq['tokens'], lq['quantized']
        if active is not None:
          queries = jnp.where(active, queries, local)
      else:
        queries = local
      bottleneck = {'tokens': local}
      if cfg.quantize:
        bottleneck['indices'] = lq['indices']
    else:
      queries = jnp.broadcast_to(e[:, None], (b, t, n, d))
      bottleneck = {'tokens': jnp.broadcast_to(g[:, None], (b, t, n, d))}
      if cfg.quantize:
        bottleneck['indices'] = jnp.broadcast_to(gq['indices'][:, None], (b, t, n))
    if cfg.quantize:
      vq = {'global_tokens': g, 'global_codes': gq['codes'], 'global_indices': gq['indices'],
            'local_valid': frame_valid}
      if 'sqdist' in gq:
        vq['global_sqdist'] = gq['sqdist']
      if active is not None:
        vq['active'] = active.astype(jnp.float32)  # the loss drops Eq. 9 while the bottleneck is open
      if cfg.local_calibration:
        vq.update(local_tokens=local, local_codes=lq['codes'], local_indices=lq['indices'])
        if 'sqdist' in lq:
          vq['local_sqdist'] = lq['sqdist']
    return w_tokens, queries, vq, bottleneck

  def recombine(self, memory, w_tokens, *, train: bool):
    """Eq. 5, AVSR at every encoder level (memory unchanged when ``w_tokens`` is None)."""
    if w_tokens is None:
      return memory
    b = w_tokens.shape[0]
    return [avsr(m.reshape(b, m.shape[0] // b, *m.shape[1:]), w_tokens, train=train).reshape(m.shape)
            for avsr, m in zip(self.avsr, memory)]

  def __call__(self, frames, log_mel, frame_valid=None, *, train: bool = False):
    cfg = self.config
    b, t = frames.shape[:2]
    n, d = cfg.num_queries, cfg.hidden_dim
    if frame_valid is None:
      frame_valid = jnp.ones((b, t), bool)
    c2, memory = self.encode_visual(frames, train=train)
    audio, audio_tokens = self.encode_audio(log_mel)                     # F_a [B,T,d]
    w_tokens, queries, vq, bottleneck = self.decompose(memory[2], audio, frame_valid, train=train,
                                                       audio_tokens=audio_tokens)
    memory = self.recombine(memory, w_tokens, train=train)
    mask_features = self.fpn(memory[:3], c2)                             # [BT,H/4,W/4,mask_dim]
    outputs = self.decode(queries.reshape(b * t, n, d), memory, mask_features, train=train)
    outputs = jax.tree.map(lambda x: x.reshape(b, t, *x.shape[1:]).astype(jnp.float32), outputs)
    final = outputs[-1]
    final['aux_outputs'] = tuple(outputs[:-1])
    final['vq'] = vq
    final['bottleneck'] = bottleneck
    return final

  def train_diagnostics(self, outputs: dict, key: jax.Array) -> dict:
    """Bookkeeping after the optimizer update, returned as metrics for the training log.

    Codebook usage of the batch (perplexity and unused codes of the global tokens, perplexity of the
    valid local tokens) and, with ``vq_restart_dead``, the restart of dead codewords (their number).
    Runs inside the jitted train step; ``outputs`` are the forward pass's (before the update).
    """
    vq = outputs.get('vq')
    if vq is None:
      return {}
    num_codes = self.num_codes
    usage = codebook_usage(vq['global_indices'], num_codes)
    metrics = {'codebook_perplexity': usage['perplexity'], 'codebook_dead_codes': usage['dead_codes']}
    tokens, indices = vq['global_tokens'].reshape(-1, vq['global_tokens'].shape[-1]), vq['global_indices']
    if self.vq_warmup:
      step = self.bottleneck_step[...] + 1
      self.bottleneck_step[...] = step
      candidates = [tokens]
      if vq.get('local_tokens') is not None:
        candidates.append(vq['local_tokens'].reshape(-1, tokens.shape[-1]))
      start = jnp.concatenate(candidates)
      nnx.cond(step == self.bottleneck_opens_at[...],
               lambda q: q.kmeans_init(start, jax.random.fold_in(key, 1)), lambda q: None, self.quantizer)
    if isinstance(self.quantizer, VectorQuantizer) and self.quantizer.ema_decay > 0:
      # The EMA codebook follows the global tokens (the codebook term of Eq. 9, as an average).
      self.quantizer.ema_update(tokens, indices)
    if vq.get('local_indices') is not None:
      local = codebook_usage(vq['local_indices'], num_codes,
                             jnp.broadcast_to(vq['local_valid'][..., None], vq['local_indices'].shape))
      metrics['codebook_local_perplexity'] = local['perplexity']
      # Per slot: slot identity alone gives 1 (the pooled figure above gets N from it).
      metrics['codebook_local_slot_perplexity'] = per_slot_perplexity(vq['local_indices'], num_codes,
                                                                      vq['local_valid'])
      # Restart candidates include the local tokens: a restart is not a gradient step (the codebook
      # is still trained only by Eq. 9's first term), and codewords where the local tokens are keep
      # the per-frame audio from collapsing onto one code.
      tokens = jnp.concatenate([tokens, vq['local_tokens'].reshape(-1, tokens.shape[-1])])
      indices = jnp.concatenate([indices.reshape(-1), vq['local_indices'].reshape(-1)])
    if self.config.vq_restart_dead and isinstance(self.quantizer, VectorQuantizer):
      metrics['codebook_restarts'] = self.quantizer.restart_dead_codes(tokens, indices, key)
    return metrics

  def decode(self, queries, memory, mask_features, *, train: bool):
    """TrD_segm + heads for M = B·T frames; returns a list (one per decoder layer) of output dicts."""
    m, n, d = queries.shape
    shapes = tuple((x.shape[1], x.shape[2]) for x in memory)
    flat = jnp.concatenate([x.reshape(m, -1, d) for x in memory], axis=1)
    if self.query_pos_from_token:
      # Eq. 7 read literally: where a query looks is a function of its (quantized) token, so the
      # decoder has no per-slot learned query to segment from the frames alone.
      query_pos = self.token_query_pos(queries)
    else:
      query_pos = jnp.broadcast_to(self.query_pos[...].astype(self.dtype), (m, n, d))
    reference = jax.nn.sigmoid(self.reference_points(query_pos).astype(jnp.float32))   # [M,N,2]
    tgt = queries
    outputs = []

    def run_layer(layer, tgt, query_pos, reference_levels, flat):
      return layer(tgt, query_pos, reference_levels, flat, shapes, deterministic=not train)

    masks_of = dynamic_mask
    if self.remat != 'none':
      masks_of = jax.checkpoint(dynamic_mask, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
    for index, layer in enumerate(self.decoder):
      # [M,N,L,2] points, or [M,N,L,4] boxes once a refining layer has predicted one.
      reference_levels = jnp.broadcast_to(reference[:, :, None, :], (m, n, len(shapes), reference.shape[-1]))
      tgt = remat(run_layer, self.remat)(layer, tgt, query_pos, reference_levels, flat)
      hs = self.decoder_norm(tgt)
      logits = self.class_head(hs).astype(jnp.float32)
      box_head = self.refine_box_heads[index - 1] if self.box_refine and index else self.box_head
      delta = box_head(hs).astype(jnp.float32)
      if reference.shape[-1] == 4:
        box = jax.nn.sigmoid(delta + modules.inverse_sigmoid(reference))
      else:
        box = jax.nn.sigmoid(delta.at[..., :2].add(modules.inverse_sigmoid(reference)))
      if self.box_refine:
        reference = jax.lax.stop_gradient(box)
      filters = self.filter_head(hs).astype(jnp.float32)
      masks = masks_of(mask_features.astype(jnp.float32), filters, box[..., :2], self.config.dynamic_channels)
      outputs.append({'pred_logits': logits, 'pred_boxes': box, 'pred_masks': masks})
    return outputs


def build_model(config, rngs_or_seed, num_classes: int | None = None) -> QDFormer:
  """The model a config describes. ``config`` is the full config (uses config.model and
  config.data.num_classes) or a model config with ``num_classes`` given."""
  rngs = rngs_or_seed if isinstance(rngs_or_seed, nnx.Rngs) else nnx.Rngs(int(rngs_or_seed))
  if 'model' in config:
    num_classes = config.data.num_classes if num_classes is None else num_classes
    config = config.model
  if num_classes is None:
    raise ValueError('build_model needs num_classes when given a model config alone')
  return QDFormer(config, num_classes, rngs=rngs)
