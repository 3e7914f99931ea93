"""AVSBench AVS-Object S4 (single sound source, binary masks, T = 5): the paper's recipe.

Build the dataset once (DESIGN.md §4.1 layout; see tfds_builders/avs_object/README.md):

  python -m tfds_builders.avs_object --raw_dir RAW --data_dir DATA --config s4

then train (ResNet-50; convert ImageNet weights with `python -m qdformer_jax.convert resnet50
--src resnet50.pth --out R50` and VGGish with `python -m qdformer_jax.convert vggish --src
vggish-10086976.pth --out VGGISH`):

  python main.py --config configs/s4.py --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=R50 --config.model.audio.pretrained=VGGISH
  python main.py --config configs/s4.py:swin_t --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=SWIN_T
  python main.py --config configs/s4.py --workdir DIR --config.data.data_dir=DATA \
      --config.mode=eval --config.eval.split=test --config.eval.checkpoint=best

Smoke run (< 2 min on 2 CPU cores) on the fake release of tfds_builders/fixtures.py:

  python -m tfds_builders.fixtures --out FIX
  python -m tfds_builders.avs_object --raw_dir FIX/avsbench_object --data_dir FIX/tfds --config s4
  python main.py --config configs/s4.py:smoke --workdir /tmp/qdf_s4_smoke --config.data.data_dir=FIX/tfds

Arguments after ':' (comma-separated): 'smoke' (configs.base.apply_smoke, 64² frames); a backbone
name from qdformer_jax.models.backbones.BACKBONE_NAMES ('swin_t', 'resnet101', ...; with 'smoke' a
narrow two-stage-deep variant of it). The helpers here are shared with ms3.py and avss.py.
"""
from __future__ import annotations

import ml_collections

from configs import base

BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'swin_t', 'swin_s', 'swin_b')
SMOKE_IMAGE_SIZE = 64


def parse_args(arg: str) -> tuple[bool, str | None]:
  """'smoke,swin_t' -> (smoke, backbone name or None); unknown words raise a ValueError."""
  words = [a.strip() for a in arg.split(',') if a.strip()]
  smoke, backbone = False, None
  for word in words:
    if word == 'smoke':
      smoke = True
    elif word in BACKBONES:
      if backbone is not None:
        raise ValueError(f'config argument {arg!r} names two backbones ({backbone!r}, {word!r}); give one.')
      backbone = word
    else:
      raise ValueError(f"unknown config argument {word!r} in {arg!r}: expected 'smoke' and/or one "
                       f'backbone name of {list(BACKBONES)}.')
  return smoke, backbone


def apply_variants(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies the ':smoke' and backbone arguments shared by every AVSBench task config."""
  smoke, backbone = parse_args(arg)
  if smoke:
    base.apply_smoke(c)
    c.data.image_size = SMOKE_IMAGE_SIZE
    c.data.read_threads = 1
  if backbone is not None:
    c.model.backbone.name = backbone
    if smoke and backbone.startswith('swin'):
      # apply_smoke narrows ResNets through `width`; a Swin is narrowed through its spec fields.
      c.model.backbone.embed_dim = 16
      c.model.backbone.depths = (1, 1, 1, 1)
      c.model.backbone.num_heads = (1, 1, 2, 2)
  return c


def avs_object_config(subset: str, arg: str) -> ml_collections.ConfigDict:
  """S4 or MS3 (``subset``): binary masks, T = 5, 13 epochs with the lr drop at 11 (DESIGN.md §6)."""
  c = base.get_base_config()
  c.name = subset
  c.data.name = 'avs_object'
  c.data.builder_config = subset
  c.data.image_size = 224
  c.data.num_frames = 5
  c.data.binary = True
  c.data.num_classes = 1
  c.data.train_resize = 'warp'   # S4/MS3 frames are 224x224 already; warp keeps the whole frame
  c.num_epochs = 13
  c.lr_drop_epochs = (11,)
  c.best_metric = 'J'
  return apply_variants(c, arg)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  return avs_object_config('s4', arg)
