"""AVSBench AVS-Object MS3 (multiple sound sources, binary masks, T = 5): the paper's recipe,
with the codebook recipe of configs/s4.py (':literal' for the paper's).

Build the dataset once (see tfds_builders/avs_object/README.md):

  python -m tfds_builders.avs_object --raw_dir RAW --data_dir DATA --config ms3

then train (pretrained weights as in configs/s4.py):

  python main.py --config configs/ms3.py --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=R50 --config.model.audio.pretrained=VGGISH
  python main.py --config configs/ms3.py:swin_t --workdir DIR --config.data.data_dir=DATA
  python main.py --config configs/ms3.py --workdir DIR --config.data.data_dir=DATA \
      --config.mode=eval --config.eval.split=test --config.eval.checkpoint=best

Smoke run on the fake release:

  python -m tfds_builders.fixtures --out FIX
  python -m tfds_builders.avs_object --raw_dir FIX/avsbench_object --data_dir FIX/tfds --config ms3
  python main.py --config configs/ms3.py:smoke --workdir /tmp/qdf_ms3_smoke --config.data.data_dir=FIX/tfds

Arguments after ':' as in configs/s4.py: 'smoke', a backbone name ('swin_t', 'pvt_v2_b5', ...), 'literal'.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  return common.avs_object_config('ms3', arg)
