"""The embedded synthetic task (docs/DESIGN.md §4.3): the default job on a fresh machine, no download.

  python main.py --config configs/synthetic.py --workdir /tmp/qdf_synthetic
  python main.py --config configs/synthetic.py:smoke --workdir /tmp/qdf_smoke       # < 2 min
  python main.py --config configs/synthetic.py --workdir /tmp/qdf_synthetic --config.mode=eval

Arguments after ':' (comma-separated): 'smoke'; 'single' | 'multi' | 'semantic' | 'semantic_hard'
(builder config; 'semantic_hard': sources sounding together, classes sharing partials, several
off-screen sources, noise bursts, so that one frame's audio no longer names its classes on its own);
'ast' (the Audio Spectrogram Transformer as audio encoder; with 'smoke' a one-layer one:
``python main.py --config configs/synthetic.py:smoke,ast --workdir DIR``); unknown words are an error
that lists the allowed ones.
The model is narrow and the frames small. With the shipped recipe (continuous warm-up for the first
300 of 1,200 steps, then the k-means codebook of K = 128 codes, no commitment term) the default job
scores val mIoU 0.4129 / 0.5419 / 0.6645 at steps 400 / 800 / 1200 in 7.0 min (Intel Xeon family 6
model 207, 2 vCPUs; another CPU model gives nearby, not identical, numbers); README, "The default job".
Training with negative audio stays off (``data.negative_fraction = 0``, the base default): on
'semantic_hard' (400 steps, seeds 0-2) 10 % negatives silenced every model under silence and noise and
halved the off-screen FPR, but cost 0.04-0.09 test mIoU and lowered G-mIoU (README, "Does it listen?").
"""
from __future__ import annotations

import ml_collections

from configs import base, common

ARGS = {'smoke': ('smoke',), 'task': ('single', 'multi', 'semantic', 'semantic_hard'), **common.AUDIO_ARGS}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = common.parse_args(arg, ARGS)
  c = base.get_base_config()
  c.name = 'synthetic'
  task = args['task'] or 'semantic'
  c.data.name = 'synthetic_avs'
  c.data.builder_config = task
  c.data.image_size = 64
  c.data.num_frames = 5
  c.data.binary = task not in ('semantic', 'semantic_hard')
  c.data.num_classes = 1 if c.data.binary else 8
  c.data.train_resize = 'warp'
  c.data.synthetic = {}            # builder overrides (clip counts, image size, seed)
  c.best_metric = 'J' if c.data.binary else 'mIoU'

  c.model.backbone.update(name='resnet18', width=16, frozen_stages=-1)
  c.model.hidden_dim = 64
  c.model.encoder.update(layers=1, heads=4, points=4, ffn_dim=128, dropout=0.0)
  c.model.audio.update(encoder='small', width=16, trainable=True)
  c.model.heads = 4
  c.model.ffn_dim = 128
  c.model.dropout = 0.0
  c.model.asd_layers = 1
  c.model.dec_layers = 3
  c.model.mask_dim = 16
  # The paper's K = 128: with 32 codes (and the rest of the shipped recipe) the full model scored 0.04
  # lower on the embedded task and used the audio less (configs.common.apply_codebook_recipe; README,
  # "Making the bottleneck carry the audio").
  c.model.codebook_size = 128
  # Cosine codebook, dead-code restarts, Eq. 9 averaged over d: measured here, the plain codebook
  # collapsed to one code and the literal Eq. 9 sum left the audio unused (configs.common.apply_codebook_recipe).
  common.apply_codebook_recipe(c)
  c.model.num_queries = 4
  # (model.box_refine stays on, as in base.py: measured here, 800 steps, val mIoU 0.43 with it and
  # 0.36 without, where every decoder layer samples around one learned point per slot.)

  # Sigmoid focal loss (α 0.25, γ 2) compresses class probabilities towards 0.5 (a class that is
  # right 80 % of the time is best predicted at p = 0.53), so few pixels reach the 0.5 score of
  # docs/DESIGN.md §3: validation mIoU stayed at the all-background 0.10 for 800 steps. γ = 0, α = 0.5
  # (binary cross-entropy, calibrated) reached 0.36 in the same 800 steps.
  c.loss.focal_gamma = 0.0
  c.loss.focal_alpha = 0.5
  c.optim.update(learning_rate=5e-4, backbone_lr_mult=1.0, weight_decay=1e-4, grad_clip=1.0, warmup_steps=50)
  c.batch_size = 8
  c.eval_batch_size = 16
  # 1,200 steps, the lr drop at 1,000: with the shipped recipe validation mIoU passes 0.6 by step 800 of a
  # 1,600-step run, and 1,600 steps took 9.7 min on the README's CPU (8 is the target); see README.
  c.total_steps = 1200
  c.lr_drop_steps = (1000,)
  c.log_every = 50
  c.eval_every = 400
  c.checkpoint_every = 400       # the saves coincide with the evaluations
  if args['smoke']:
    common.apply_smoke(c)
    c.data.synthetic = {'train_clips': 16, 'validation_clips': 8, 'test_clips': 8, 'negative_clips': 0}
  common.apply_audio(c, args['audio'], bool(args['smoke']))
  return c
