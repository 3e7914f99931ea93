"""AVSBench AVS-Semantic (70 classes + background, T = 10, v1s + v1m + v2): the paper's recipe,
with the codebook recipe of configs/s4.py (':literal' for the paper's).

Build the dataset once (see tfds_builders/avs_semantic/README.md):

  python -m tfds_builders.avs_semantic --raw_dir RAW --data_dir DATA --config all

then train (ResNet-50 and VGGish weights converted as in configs/s4.py):

  python main.py --config configs/avss.py --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=R50 --config.model.audio.pretrained=VGGISH
  python main.py --config configs/avss.py:swin_t --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=SWIN_T --config.model.audio.pretrained=VGGISH
  python main.py --config configs/avss.py:pvt_v2_b5 --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=PVT_B5 --config.model.audio.pretrained=VGGISH
  python main.py --config configs/avss.py --workdir DIR --config.data.data_dir=DATA \
      --config.mode=eval --config.eval.split=test --config.eval.checkpoint=best

Smoke run (< 2 min on 2 CPU cores) on the fake release of tfds_builders/fixtures.py:

  python -m tfds_builders.fixtures --out FIX
  python -m tfds_builders.avs_semantic --raw_dir FIX/avsbench_semantic --data_dir FIX/tfds --config all
  python main.py --config configs/avss.py:smoke --workdir /tmp/qdf_avss_smoke --config.data.data_dir=FIX/tfds

Arguments after ':' as in configs/s4.py: 'smoke', a backbone name ('swin_t', 'pvt_v2_b5', ...), 'literal'.
"""
from __future__ import annotations

import ml_collections

from configs import base, common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base.get_base_config()
  c.name = 'avss'
  c.data.name = 'avs_semantic'
  c.data.builder_config = 'all'
  c.data.image_size = 224
  c.data.num_frames = 10
  c.data.binary = False
  c.data.num_classes = 70
  c.data.train_resize = 'short_side_crop'   # AVSS frames come at their video's size
  c.num_epochs = 16
  c.lr_drop_epochs = (14,)
  c.best_metric = 'mIoU'
  return common.apply_variants(c, arg)
