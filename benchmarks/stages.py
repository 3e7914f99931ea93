"""Where the train step's FLOPs and time go: one jitted sub-program per stage of the paper-sized QDFormer.

  python benchmarks/stages.py --out /tmp/stages_s4.json                   # configs/s4.py, T=5, 224², batch 1
  python benchmarks/stages.py --config configs/avss.py --out /tmp/stages_avss.json

Stages (the QDFormer methods ``__call__`` chains, so the benchmark runs the model's own code):

  backbone       ``backbone_features``: ResNet-50 C2..C5 of the B·T frames (stem + layer1 frozen)
  encoder        ``encode_features``: input projections + the 4-layer deformable encoder
  audio          ``encode_audio``: VGGish (frozen) + its projection
  decomposition  ``decompose``: global fusion (Eq. 3), global ASD (Eq. 4), VQ codebook, local ASD (Eq. 6)
  avsr           ``recombine``: AVSR at the 4 levels (Eq. 5)
  fpn            ``fpn``: the FPN down to stride 4
  decoder        ``decode``: deformable decoder, heads and the dynamic masks of every layer (Eq. 7)
  loss           ``compute_loss``: targets, Hungarian matching of every layer, the loss terms
  optimizer      ``optimizer.update``: clipping + AdamW of the trained parameters

Each stage is timed and counted (XLA ``cost_analysis`` flops; a multiply-add = 2) forward only and
forward + backward (gradients of the stage's trained parameters and of its inputs that the real
step differentiates; the loss stage: of the model outputs), on the activations the previous
stages produced. Next to XLA's count, each stage's FLOPs from its formula (``formulas``): a stage
whose XLA count is far above its formula does work the model does not need.

``--compare`` (default ``pvt_v2_b5,ast``) adds rows for the comparison choices: the backbone stage
with PVT-v2-B5 and the audio stage with the Audio Spectrogram Transformer (each built from the
config with that word, on the same frames / one-second filterbanks), next to their formulas.

The whole train step (``training.step.make_train_step``) is compiled, counted and timed in the
same run, as is the backbone forward + backward alone (= a bare ResNet-50 with the model's frozen
stages on the same frames): ``ratio`` = the step's achieved FLOP/s over the backbone's.

Prints Markdown tables and writes JSON (--out). Times: the best of --repeats calls after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.model_cost import flops_of, load_config, make_batch  # noqa: E402
from qdformer_jax import sharding  # noqa: E402
from qdformer_jax.data import audio  # noqa: E402
from qdformer_jax.losses.criterion import compute_loss  # noqa: E402
from qdformer_jax.models.ast import patch_grid  # noqa: E402
from qdformer_jax.models.layers import path_prefix_filter  # noqa: E402
from qdformer_jax.models.pvt import PVT_V2_SPECS  # noqa: E402
from qdformer_jax.models.vggish import VGGISH_CONVS, VGGISH_FCS  # noqa: E402
from qdformer_jax.training import optim  # noqa: E402
from qdformer_jax.training import state as state_lib  # noqa: E402
from qdformer_jax.training import step as step_lib  # noqa: E402

# Stage -> the top-level model attributes whose trained parameters it differentiates.
STAGE_PARAMS = {
    'backbone': ('backbone',),
    'encoder': ('input_proj', 'encoder'),
    'audio': ('audio_encoder', 'audio_proj'),
    'decomposition': ('fusion', 'global_asd', 'local_asd', 'quantizer', 'prototypes', 'avsr_weights',
                      'baseline_audio_query'),
    'avsr': ('avsr',),
    'fpn': ('fpn',),
    'decoder': ('decoder', 'decoder_norm', 'class_head', 'box_head', 'refine_box_heads', 'filter_head',
                'query_pos', 'reference_points'),
    'loss': (),
}


# -- formulas (multiply-adds per clip; FLOPs = 2 x) -------------------------------------------------

def resnet_macs(size: int, depth_blocks=(3, 4, 6, 3), width: int = 64, frozen_stages: int = 1) -> tuple[int, int]:
  """(all conv MACs, MACs of the trained stages) of one bottleneck-ResNet image (torchvision v1.5)."""
  s = size // 2
  total = s * s * 49 * 3 * width
  trained = 0
  s //= 2
  cin = width
  for i, n in enumerate(depth_blocks):
    planes, out = width * 2 ** i, width * 2 ** i * 4
    stage = 0
    for b in range(n):
      stride = 2 if i > 0 and b == 0 else 1
      so = s // stride
      stage += s * s * cin * planes + so * so * 9 * planes * planes + so * so * planes * out
      if b == 0:
        stage += so * so * cin * out
      cin, s = out, so
    total += stage
    trained += stage if i + 1 > frozen_stages else 0
  return total, trained


def pvt_macs(size: int, name: str, frozen_stages: int = 1) -> tuple[int, int]:
  """(all MACs, MACs of the trained stages) of one PVT-v2 image: overlapping patch convs, then per
  block q (N C^2), the spatial-reduction conv (N' r^2 C^2) and kv (2 N' C^2) on N' = (h/r)(w/r)
  tokens, QK^T + AV (2 N N' C), the output projection (N C^2), fc1 + fc2 (2 N C h) and the 3x3
  depth-wise conv (9 N h), h = mlp_ratio C."""
  spec = PVT_V2_SPECS[name]
  total = trained = 0
  side, cin = size, 3
  for i in range(4):
    kernel, stride = (7, 4) if i == 0 else (3, 2)
    side = -(-side // stride)
    c, r, hidden = spec['embed_dims'][i], spec['sr_ratios'][i], int(spec['embed_dims'][i] * spec['mlp_ratios'][i])
    n, reduced = side * side, (side // r) ** 2
    block = 2 * n * c * c + reduced * (r * r * c * c if r > 1 else 0) + 2 * reduced * c * c + 2 * n * reduced * c
    block += 2 * n * c * hidden + 9 * n * hidden
    stage = n * kernel * kernel * cin * c + spec['depths'][i] * block
    total += stage
    trained += stage if i + 1 > frozen_stages else 0
    cin = c
  return total, trained


def ast_macs(spec, d: int) -> int:
  """MACs of one AST example (one second, 98 x 128 filterbanks) + its Linear(hidden, d): the patch
  conv (P 16^2 C), per layer 4 n C^2 (q, k, v, o) + 2 n^2 C (QK^T, AV) + 2 n C m (MLP), n = P + 2."""
  mel, time_patches = patch_grid(98, 128, 16, 10, 10)
  p = mel * time_patches
  c, m, n = spec.hidden_size, spec.mlp_dim, p + 2
  return p * 256 * c + spec.layers * (4 * n * c * c + 2 * n * n * c + 2 * n * c * m) + c * d


def level_sizes(size: int, levels: int) -> list[int]:
  sides = [size // 8, size // 16, size // 32]
  for _ in range(levels - 3):
    sides.append((sides[-1] + 1) // 2)
  return sides


def formulas(config, frames: int) -> dict:
  """Forward multiply-adds per clip of each stage from its definition (paper sizes read from the config)."""
  m = config.model
  size, t = int(config.data.image_size), frames
  d, n, ffn, heads = m.hidden_dim, m.num_queries, m.ffn_dim, m.heads
  sides = level_sizes(size, m.num_feature_levels)
  tokens = sum(s * s for s in sides)
  levels = m.num_feature_levels
  out = {}
  if m.backbone.name == 'resnet50':
    total, trained = resnet_macs(size, frozen_stages=m.backbone.frozen_stages)
    chans = (256, 512, 1024, 2048)
    out['backbone'] = {'fwd': t * total, 'trained_fwd': t * trained,
                       'what': 'ResNet-50 convs: sum over convs of h_out*w_out*k^2*c_in*c_out per frame'}
  elif m.backbone.name in PVT_V2_SPECS and 'depths' not in m.backbone:  # a preset, not a smoke variant
    total, trained = pvt_macs(size, m.backbone.name, m.backbone.frozen_stages)
    chans = PVT_V2_SPECS[m.backbone.name]['embed_dims']
    out['backbone'] = {'fwd': t * total, 'trained_fwd': t * trained,
                       'what': f'{m.backbone.name}: patch convs + per block q, SR conv, kv, attention, proj, '
                               'MLP with depth-wise conv'}
  else:
    return out  # formulas exist for the paper's ResNet-50 and the PVT-v2 presets
  enc = m.encoder
  samples = enc.heads * levels * enc.points
  proj = (sides[0] ** 2 * chans[1] + sides[1] ** 2 * chans[2] + sides[2] ** 2 * chans[3]) * d
  proj += sum(sides[3 + i] ** 2 * 9 * (chans[3] if i == 0 else d) * d for i in range(levels - 3))
  per_token = 2 * d * d + d * samples * 3 + 2 * d * enc.ffn_dim + samples * 4 * (d // enc.heads)
  out['encoder'] = {'fwd': t * (proj + enc.layers * tokens * per_token),
                    'what': f'1x1/3x3 input projections + {enc.layers} layers x S={tokens} tokens x (value+output '
                            'proj 2d^2 + offsets/weights 3d*M*L*P + FFN 2d*ffn + bilinear 4*M*L*P*Dh)'}
  vgg, side = 0, (96, 64)
  for _, cin, cout, pool in VGGISH_CONVS:
    vgg += side[0] * side[1] * 9 * cin * cout
    if pool:
      side = (side[0] // 2, side[1] // 2)
  vgg += sum(a * b for _, a, b in VGGISH_FCS) + 128 * d
  if m.audio.encoder == 'vggish':
    out['audio'] = {'fwd': t * vgg, 'what': 'VGGish convs + FCs + Linear(128, d), per 0.96 s example'}
  elif m.audio.encoder == 'ast':
    out['audio'] = {'fwd': t * ast_macs(m.audio.ast, d),
                    'what': 'AST patch conv + layers (q, k, v, o, attention, MLP) + Linear(hidden, d), per second'}
  hw = sides[2] ** 2
  attn = lambda q, k: 2 * q * d * d + 2 * k * d * d + 2 * q * k * d  # noqa: E731  projections + QK^T + AV
  fusion = attn(t, t * hw) + 2 * t * d * ffn
  asd_layer = lambda k: attn(n, n) + attn(n, k) + 2 * n * d * ffn  # noqa: E731
  decomp = fusion + m.asd_layers * asd_layer(t) + t * m.asd_layers * asd_layer(1)
  decomp += (n + t * n) * m.codebook_size * d + 2 * n * d * d
  out['decomposition'] = {'fwd': decomp, 'what': 'fusion MHA over T*h32*w32 + FFN, 2 ASD layers (global, and '
                                                 'local per frame), VQ distances, AVSR-weight MLP'}
  out['avsr'] = {'fwd': levels * n * d * d * d + t * tokens * d * d,
                 'what': 'per level the clip\'s d x d mix sum_i diag(w_i) W_i (N*d^3), then T*S*d^2'}
  s4, s8, s16 = size // 4, sides[0], sides[1]
  fpn = (s16 ** 2 + s8 ** 2) * d * d + s4 ** 2 * chans[0] * d   # laterals (C2: 256 channels in R50)
  fpn += (s16 ** 2 + s8 ** 2 + s4 ** 2) * 9 * d * d + s4 ** 2 * d * m.mask_dim
  out['fpn'] = {'fwd': t * fpn, 'what': '3 laterals 1x1 + 3 outputs 3x3 at strides 16, 8, 4 + 1x1 head'}
  c = m.dynamic_channels
  dec_samples = heads * levels * m.decoder_points
  filters = (m.mask_dim + 2) * c + c + c * c + c + c + 1
  layer = attn(n, n) + tokens * d * d + n * d * dec_samples * 3 + n * d * d + n * dec_samples * 4 * (d // heads)
  layer += 2 * n * d * ffn + n * (2 * d * d + d * int(config.data.num_classes) + 4 * d + d * filters)
  masks = n * s4 * s4 * ((m.mask_dim + 2) * c + c * c + c)
  out['decoder'] = {'fwd': t * m.dec_layers * (layer + masks), 'masks_fwd': t * m.dec_layers * masks,
                    'what': f'{m.dec_layers} layers x (self-attn, value proj of all S tokens, sampling, FFN, '
                            'heads) + Eq. 7 dynamic masks N*(H/4*W/4)*((D+2)c + c^2 + c) per layer'}
  return out


# -- stage programs ---------------------------------------------------------------------------------

def float_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def scalar(tree):
  return sum(jnp.sum(x.astype(jnp.float32)) for x in float_leaves(tree))


def make_stages(graphdef, config, num_classes: int):
  """name -> (fn(model, diff, static) -> outputs, ... ); the outputs feed the next stage."""
  def backbone(model, diff, static):
    return model.backbone_features(static['frames'])

  def encoder(model, diff, static):
    return model.encode_features([static['c2']] + list(diff['feats']), train=True)

  def audio(model, diff, static):
    return model.encode_audio(static['log_mel'])  # (F_a, the local audio tokens or None)

  def decomposition(model, diff, static):
    return model.decompose(diff['coarse'], diff['audio'], static['frame_valid'], train=True,
                           audio_tokens=diff.get('audio_tokens'))

  def avsr(model, diff, static):
    return model.recombine(diff['memory'], diff['w_tokens'], train=True)

  def fpn(model, diff, static):
    return model.fpn(diff['memory'][:3], static['c2'])

  def decoder(model, diff, static):
    b, t = static['frame_valid'].shape
    queries = diff['queries']
    outputs = model.decode(queries.reshape(b * t, *queries.shape[2:]), diff['memory'], diff['mask_features'],
                           train=True)
    outputs = jax.tree.map(lambda x: x.reshape(b, t, *x.shape[1:]).astype(jnp.float32), outputs)
    final = outputs[-1]
    final['aux_outputs'] = tuple(outputs[:-1])
    return final

  def loss(model, diff, static):
    outputs = dict(diff['outputs'], vq=static['vq'])
    return compute_loss(outputs, static['batch'], config.loss, num_classes)[0]

  return {'backbone': backbone, 'encoder': encoder, 'audio': audio, 'decomposition': decomposition,
          'avsr': avsr, 'fpn': fpn, 'decoder': decoder, 'loss': loss}


def timed(compiled, args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def run_stage(name, fn, graphdef, state, trained, diff, static, repeats):
  """Forward and forward + backward of one stage: (outputs, record)."""
  prefixes = [(p,) for p in STAGE_PARAMS[name]]
  wrt = path_prefix_filter(prefixes, of_type=trained) if prefixes else nnx.Not(nnx.Everything())

  def forward(state, diff, static):
    return fn(nnx.merge(graphdef, state), diff, static)

  def forward_backward(state, diff, static):
    model = nnx.merge(graphdef, state)
    return nnx.grad(lambda model, diff: scalar(fn(model, diff, static)),
                    argnums=(nnx.DiffState(0, wrt), 1))(model, diff)

  record = {}
  for kind, f in (('fwd', forward), ('fwd_bwd', forward_backward)):
    t0 = time.time()
    compiled = jax.jit(f).lower(state, diff, static).compile()
    record[f'{kind}_compile_seconds'] = round(time.time() - t0, 1)
    record[f'{kind}_flops'] = flops_of(compiled)
    record[f'{kind}_seconds'] = timed(compiled, (state, diff, static), repeats)
    if kind == 'fwd':
      outputs = compiled(state, diff, static)
    del compiled
  print(f"  {name:<14} fwd {record['fwd_flops'] / 1e9:8.2f} GFLOP {record['fwd_seconds']:6.3f} s | fwd+bwd "
        f"{record['fwd_bwd_flops'] / 1e9:8.2f} GFLOP {record['fwd_bwd_seconds']:6.3f} s", flush=True)
  return outputs, record


def optimizer_stage(graphdef, state, trained_params, repeats):
  def update(state, grads):
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, x.dtype), trained_params)
  compiled = jax.jit(update).lower(state, grads).compile()
  flops = flops_of(compiled)
  seconds = timed(compiled, (state, grads), repeats)
  print(f"  {'optimizer':<14} {flops / 1e9:8.3f} GFLOP {seconds:6.3f} s", flush=True)
  return {'fwd_flops': flops, 'fwd_seconds': seconds, 'fwd_bwd_flops': flops, 'fwd_bwd_seconds': seconds}


def build_inputs(config, batch_size: int, t: int, size: int, num_classes: int):
  """(train graphdef, train state, a random batch, model graphdef, model state, trainable filter) of
  ``config``: the state initialised as training does, the batch in the train step's shapes."""
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = state_lib.abstract_train_state(config, mesh, ())
  with jax.threefry_partitionable(False):
    state = state_lib.init_train_state(config, abstract_state, ())
  batch = make_batch(batch_size, t, size, num_classes, audio.example_shape(config.data.audio_encoder))
  model_graphdef, model_state = nnx.split(nnx.merge(graphdef, state)[0])
  trained = optim.trainable_filter(nnx.merge(model_graphdef, model_state))
  return graphdef, state, batch, model_graphdef, model_state, trained


def apply_overrides(config, args) -> None:
  """The command line's --frames, --dtype and --remat on ``config``."""
  if args.frames:
    config.data.num_frames = args.frames
  if args.dtype:
    config.model.dtype = config.model.backbone.dtype = args.dtype
  if args.remat:
    config.model.remat = args.remat


def compare_stage(args, word: str, t: int, size: int, num_classes: int) -> dict:
  """The one stage that config word ``word`` changes (backbone, or audio for 'ast'), measured like the
  main run's stages on a model built from ``args.config`` + ``word``."""
  spec = args.config + (',' if ':' in args.config else ':') + word
  config = load_config(spec)
  apply_overrides(config, args)
  name = 'audio' if word == 'ast' else 'backbone'
  graphdef, state, batch, model_graphdef, model_state, trained = build_inputs(config, args.batch, t, size,
                                                                              num_classes)
  fn = make_stages(model_graphdef, config, num_classes)[name]
  static = {'log_mel': batch['log_mel']} if name == 'audio' else {'frames': batch['frames']}
  _, record = run_stage(name, fn, model_graphdef, model_state, trained, {}, static, args.repeats)
  del state, model_state
  return {'word': word, 'stage': name, 'config': spec, 'formula': formulas(config, t).get(name), **record}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/s4.py', help='task config file[:args]')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--frames', type=int, default=0, help='T (0: config.data.num_frames)')
  parser.add_argument('--dtype', default='', help="model.dtype and backbone dtype ('' = the config's)")
  parser.add_argument('--remat', default='', help="model.remat ('' = the config's)")
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--compare', default='pvt_v2_b5,ast',
                      help="config words whose one stage is also measured: a backbone name (the backbone stage) "
                           "or 'ast' (the audio stage), each on the same frames / audio ('' for none)")
  parser.add_argument('--compare_only', action='store_true', help='measure only the --compare rows')
  parser.add_argument('--out', default='', help='write the JSON here')
  args = parser.parse_args(argv)

  config = load_config(args.config)
  if args.compare_only:
    t, size, num_classes = (int(args.frames or config.data.num_frames), int(config.data.image_size),
                            int(config.data.num_classes))
    results = {'config': args.config, 'batch': args.batch, 'frames': t, 'image_size': size,
               'compare': [compare_stage(args, w, t, size, num_classes) for w in filter(None, args.compare.split(','))]}
    print('\n| stage | fwd GFLOP (XLA) | fwd GFLOP (formula) | XLA / formula | fwd+bwd GFLOP | fwd+bwd s |')
    print('|---|---:|---:|---:|---:|---:|')
    for c in results['compare']:
      formula = (c.get('formula') or {}).get('fwd')
      f_gflop = '' if formula is None else f'{2 * formula / 1e9:.2f}'
      ratio = '' if formula is None else f"{c['fwd_flops'] / args.batch / (2 * formula):.2f}"
      print(f"| {c['stage']} with {c['word']} | {c['fwd_flops'] / args.batch / 1e9:.2f} | {f_gflop} | {ratio} | "
            f"{c['fwd_bwd_flops'] / args.batch / 1e9:.2f} | {c['fwd_bwd_seconds']:.3f} |")
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(results, f, indent=1, default=float)
    return results
  apply_overrides(config, args)
  t, size, num_classes = int(config.data.num_frames), int(config.data.image_size), int(config.data.num_classes)
  print(f'{args.config}: batch {args.batch}, T={t}, {size}x{size}, dtype {config.model.dtype}, remat '
        f'{config.model.remat} ({jax.default_backend()}, 1-min load {os.getloadavg()[0]:.1f})', flush=True)
  graphdef, state, batch, model_graphdef, model_state, trained = build_inputs(config, args.batch, t, size,
                                                                              num_classes)
  stages = make_stages(model_graphdef, config, num_classes)
  results = {'config': args.config, 'batch': args.batch, 'frames': t, 'image_size': size,
             'dtype': config.model.dtype, 'remat': config.model.remat, 'backend': jax.default_backend(),
             'jax': jax.__version__, 'load_average_before': os.getloadavg()[0], 'stages': {}}

  def go(name, diff, static):
    out, record = run_stage(name, stages[name], model_graphdef, model_state, trained, diff, static, args.repeats)
    results['stages'][name] = record
    return out

  feats = go('backbone', {}, {'frames': batch['frames']})
  memory = go('encoder', {'feats': tuple(feats[1:])}, {'c2': feats[0]})
  audio_features, audio_tokens = go('audio', {}, {'log_mel': batch['log_mel']})
  w_tokens, queries, vq, _ = go('decomposition', {'coarse': memory[2], 'audio': audio_features,
                                                  'audio_tokens': audio_tokens},
                                {'frame_valid': batch['frame_valid']})
  memory = go('avsr', {'memory': memory, 'w_tokens': w_tokens}, {})
  mask_features = go('fpn', {'memory': memory}, {'c2': feats[0]})
  outputs = go('decoder', {'queries': queries, 'memory': memory, 'mask_features': mask_features},
               {'frame_valid': batch['frame_valid']})
  go('loss', {'outputs': outputs}, {'vq': vq, 'batch': batch})
  trained_params = nnx.state(nnx.merge(model_graphdef, model_state), trained)
  results['stages']['optimizer'] = optimizer_stage(graphdef, state, trained_params, args.repeats)

  # The whole train step, in the same run.
  mesh = sharding.make_mesh(config)
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, state), mesh)
  data = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  t0 = time.time()
  compiled = step.lower(state, data).compile()
  results['step'] = {'compile_seconds': round(time.time() - t0, 1), 'flops': flops_of(compiled)}
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  best = float('inf')
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    best = min(best, time.perf_counter() - t0)
  results['step']['seconds'] = best
  results['load_average_after'] = os.getloadavg()[0]
  backbone = results['stages']['backbone']
  results['backbone_fwd_bwd'] = {'flops': backbone['fwd_bwd_flops'], 'seconds': backbone['fwd_bwd_seconds']}
  step_rate = results['step']['flops'] / results['step']['seconds']
  backbone_rate = backbone['fwd_bwd_flops'] / backbone['fwd_bwd_seconds']
  results['ratio'] = step_rate / backbone_rate
  results['formulas'] = formulas(config, t)
  results['compare'] = [compare_stage(args, word, t, size, num_classes) for word in filter(None, args.compare.split(','))]
  print_tables(results)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1, default=float)
  return results


def print_tables(r: dict) -> None:
  stages, forms = r['stages'], r['formulas']
  total_time = sum(s['fwd_bwd_seconds'] for s in stages.values())
  total_flops = sum(s['fwd_bwd_flops'] for s in stages.values())
  b = r['batch']
  print(f"\n{r['config']}  batch {b}  T={r['frames']}  {r['image_size']}x{r['image_size']}  dtype {r['dtype']}  "
        f"remat {r['remat']}  ({r['backend']}, jax {r['jax']}); GFLOP per clip\n")
  print('| stage | fwd GFLOP (XLA) | fwd GFLOP (formula) | XLA / formula | fwd+bwd GFLOP | fwd+bwd s | time share |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for name, s in stages.items():
    formula = forms.get(name, {}).get('fwd')
    f_gflop = '' if formula is None else f'{2 * formula / 1e9:.2f}'
    ratio = '' if formula is None else f"{s['fwd_flops'] / b / (2 * formula):.2f}"
    print(f"| {name} | {s['fwd_flops'] / b / 1e9:.2f} | {f_gflop} | {ratio} | {s['fwd_bwd_flops'] / b / 1e9:.2f} | "
          f"{s['fwd_bwd_seconds']:.3f} | {100 * s['fwd_bwd_seconds'] / total_time:.1f}% |")
  print(f"| sum of stages | | | | {total_flops / b / 1e9:.2f} | {total_time:.3f} | 100% |")
  for c in r.get('compare', []):
    formula = (c.get('formula') or {}).get('fwd')
    f_gflop = '' if formula is None else f'{2 * formula / 1e9:.2f}'
    ratio = '' if formula is None else f"{c['fwd_flops'] / b / (2 * formula):.2f}"
    print(f"| {c['stage']} with {c['word']} (instead of the row above) | {c['fwd_flops'] / b / 1e9:.2f} | {f_gflop} | "
          f"{ratio} | {c['fwd_bwd_flops'] / b / 1e9:.2f} | {c['fwd_bwd_seconds']:.3f} | |")
  step, bb = r['step'], r['backbone_fwd_bwd']
  print(f"| whole train step | | | | {step['flops'] / b / 1e9:.2f} | {step['seconds']:.3f} | |")
  print(f"\nachieved: train step {step['flops'] / step['seconds'] / 1e9:.1f} GFLOP/s; backbone (bare ResNet-50 with the "
        f"model's frozen stages) fwd+bwd on the same frames {bb['flops'] / 1e9:.1f} GFLOP in {bb['seconds']:.2f} s = "
        f"{bb['flops'] / bb['seconds'] / 1e9:.1f} GFLOP/s; ratio {r['ratio']:.2f} (target >= 0.9). "
        f"1-min load {r['load_average_before']:.1f} -> {r['load_average_after']:.1f}\n")


if __name__ == '__main__':
  main()
