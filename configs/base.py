"""Defaults shared by every task config (docs/DESIGN.md §1, §2, §6). Task files override what differs.

Not a task itself: use configs/{synthetic,s4,ms3,avss}.py.
"""
from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'base'
  c.mode = 'train'                 # train | eval
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic_avs'    # synthetic_avs | avs_object | avs_semantic
  c.data.builder_config = 'semantic'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: <workdir>/../tensorflow_datasets
  c.data.image_size = 224
  c.data.num_frames = 10
  c.data.num_classes = 70          # foreground classes (background is "no object")
  c.data.binary = False            # S4/MS3: one "sounding" class
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.train_resize = 'short_side_crop'
  c.data.hflip = False
  c.data.read_threads = 2
  # Training with negatives (AVSBench-Robust's remedy): this fraction of the training clips hear
  # one of negative_kinds (silence, noise at the clip's level, off-screen audio) with an empty target.
  c.data.negative_fraction = 0.0
  c.data.negative_kinds = ('silence', 'noise', 'offscreen')

  c.model = ml_collections.ConfigDict()
  c.model.dtype = 'float32'        # compute dtype; parameters stay float32
  # Rematerialisation (jax.checkpoint) of backbone blocks, encoder and decoder layers in the backward
  # pass: 'none' | 'blocks' (keep block inputs only) | 'dots_saveable' (also keep matmul/conv outputs)
  # | 'dots_no_batch'. Same values, less memory, more compute (benchmarks/memory.py measures both).
  c.model.remat = 'none'
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='resnet50', width=64, frozen_stages=1, dtype='float32',
      pretrained=ml_collections.config_dict.placeholder(str)))
  c.model.hidden_dim = 256
  c.model.num_queries = 5
  c.model.codebook_size = 128
  c.model.vq_normalize = False     # True: cosine codebook (tokens and codes on a sphere)
  c.model.vq_restart_dead = False  # True: move dead codewords onto batch tokens (in the train step)
  # The bottleneck's remedies (docs/DESIGN.md §1.6; the ablation runner's variants measure each):
  c.model.quantizer = 'vq'         # vq: learned codebook (paper) | fsq: finite scalar quantization
  c.model.fsq_levels = (4, 4, 2)   # fsq: levels per channel (K = their product)
  c.model.vq_gradient = 'ste'      # ste: identity straight-through (paper) | rotation: rotation trick
  c.model.vq_ema_decay = 0.0       # > 0: EMA codebook of the assigned global tokens (VQ-VAE-2)
  c.model.vq_warmup_steps = 0      # > 0: continuous for this many steps, then a k-means codebook
  c.model.vq_warmup_fraction = 0.0  # > 0 (and no vq_warmup_steps): that share of the run's steps
  c.model.local_audio_tokens = False   # local ASD attends over the audio encoder's time-frequency map
  c.model.query_pos_from_token = False  # decoder query positions computed from the quantized token
  c.model.num_feature_levels = 4
  c.model.encoder = ml_collections.ConfigDict(dict(layers=4, heads=8, points=4, ffn_dim=2048, dropout=0.1))
  # encoder: 'vggish' (the paper's) | 'ast' (Audio Spectrogram Transformer, AudioSet-trained; `ast` holds
  # its size, the released model's by default) | 'small' (synthetic configs).
  c.model.audio = ml_collections.ConfigDict(dict(
      encoder='vggish', width=16, trainable=False, pretrained=ml_collections.config_dict.placeholder(str),
      ast=ml_collections.ConfigDict(dict(hidden_size=768, layers=12, heads=12, mlp_dim=3072, max_frames=1024))))
  # The audio front end the pipeline computes follows the encoder (VGGish log-mel, or AST filterbanks
  # from the stored waveform): one field, referenced, so that --config.model.audio.encoder=ast is enough.
  c.data.audio_encoder = c.model.audio.get_ref('encoder')
  c.model.heads = 8
  c.model.ffn_dim = 2048
  c.model.dropout = 0.1
  c.model.asd_layers = 2
  c.model.dec_layers = 4
  c.model.decoder_points = 4
  c.model.mask_dim = 256
  c.model.dynamic_channels = 8
  # Iterative box refinement (Deformable-DETR with_box_refine; ReferFormer trains with
  # --with_box_refine): each decoder layer's box (detached) is the next layer's reference. [lineage]
  c.model.box_refine = True
  c.model.avsr_input = 'quantized'  # quantized | continuous
  # Table 2 ablation switches.
  c.model.decomposition = True
  c.model.quantize = True
  c.model.avsr = True
  c.model.local_calibration = True

  c.loss = ml_collections.ConfigDict(dict(
      cls_weight=2.0, l1_weight=5.0, giou_weight=2.0, mask_weight=2.0, dice_weight=5.0,
      focal_alpha=0.25, focal_gamma=2.0, mask_loss='bce', quant_weight=0.5, commit_weight=0.25,
      quant_reduction='sum',  # 'sum': Eq. 9 literally; 'mean': divided by d (F.mse_loss style)
      slot_entropy_weight=0.0, slot_entropy_temperature=0.1,  # slot-conditioned code entropy term
      aux_loss=True))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, backbone_lr_mult=0.5, weight_decay=5e-4, grad_clip=0.1,
      warmup_steps=0, decay_factor=0.1))
  c.batch_size = 4                  # global, clips
  # Mesh (data, fsdp): this many devices share (split) the large parameters and their Adam moments;
  # the rest is data parallel. Must divide the device count; 1 = pure data parallelism.
  c.mesh_fsdp = 1
  c.eval_batch_size = 4
  c.num_epochs = 16
  c.lr_drop_epochs = (14,)
  c.total_steps = 0                 # > 0 overrides num_epochs
  c.lr_drop_steps = ()              # with total_steps

  # JAX persistent compilation cache: '' = ~/.cache/qdformer_jax/xla, a directory, or 'off'.
  c.compilation_cache = ''
  c.log_every = 50
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.best_metric = 'mIoU'
  # Evaluations during training and in eval mode (qdformer_jax/evaluation/evals.py): name -> entry
  # (kind: segmentation | audio_use | noise; split: '' = eval.split or data.eval_split; every: 0 =
  # eval_every, -1 = eval mode only). Checkpoints are ranked on `best_metric` of entry `best_eval`.
  c.evals = ml_collections.ConfigDict({'val': {'kind': 'segmentation', 'split': '', 'every': 0}})
  c.best_eval = 'val'
  # A non-finite loss, gradient norm or updated parameter is never applied nor saved. 'error': the
  # run stops at the next log/eval/checkpoint boundary naming the step and the non-finite terms (the
  # last good checkpoint stays the latest); 'skip': such updates are skipped on the device, counted
  # and logged, and the run stops after nonfinite_max_consecutive of them in a row.
  c.nonfinite = 'error'
  c.nonfinite_max_consecutive = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.split = ml_collections.config_dict.placeholder(str)  # None: data.eval_split
  c.eval.checkpoint = 'latest'      # latest | best | <step>
  c.eval.limit = 0                  # > 0: first N clips only
  c.eval.num_overlays = 4
  c.eval.keep_padded_frames = True  # AVSS: count padded v1 frames as the official code does
  c.eval.official_batch_clips = 4   # AVSBench F per-batch mode groups this many clips
  # Post-processing threshold (docs/DESIGN.md §3): a number ('0.5'), or 'val': the threshold of
  # eval.thresholds with the best `best_metric` on the validation split, then applied to every split.
  c.eval.threshold = '0.5'
  c.eval.thresholds = (0.3, 0.4, 0.5, 0.6, 0.7)  # scored in the same eval pass (threshold_sweep)
  c.eval.shuffle_audio = False      # eval mode: also score each clip with another clip's audio (audio-use check)
  c.eval.noise_snrs = ()            # e.g. (20, 10, 5, 0, -5): noise-robustness sweep (Fig. 7)
  c.eval.noise_seed = 0
  c.eval.noise_dir = ml_collections.config_dict.placeholder(str)  # wavs (e.g. AudioSet); None: pink noise
  # Eval mode: also score the split under silence, noise and off-screen audio (AVSBench-Robust; the
  # 'negative_audio' kind). Off-screen donors: 'class_aware' (by class where masks hold class ids, else
  # by category, as AVSBench-Robust does) or 'any' other clip.
  c.eval.negative_audio = False
  c.eval.negative_seed = 0
  c.eval.offscreen = 'class_aware'
  return c
