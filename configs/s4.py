"""AVSBench AVS-Object S4 (single sound source, binary masks, T = 5): the paper's recipe,
with the codebook recipe measured to keep the codebook in use (':literal' for the paper's).

Build the dataset once (docs/DESIGN.md §4.1 layout; see tfds_builders/avs_object/README.md):

  python -m tfds_builders.avs_object --raw_dir RAW --data_dir DATA --config s4

then train (ResNet-50; convert ImageNet weights with `python -m qdformer_jax.convert resnet50
--src resnet50.pth --out R50` and VGGish with `python -m qdformer_jax.convert vggish --src
vggish-10086976.pth --out VGGISH`):

  python main.py --config configs/s4.py --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=R50 --config.model.audio.pretrained=VGGISH
  python main.py --config configs/s4.py:swin_t --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=SWIN_T
  python main.py --config configs/s4.py:pvt_v2_b5 --workdir DIR --config.data.data_dir=DATA \
      --config.model.backbone.pretrained=PVT_B5 --config.model.audio.pretrained=VGGISH
  python main.py --config configs/s4.py --workdir DIR --config.data.data_dir=DATA \
      --config.mode=eval --config.eval.split=test --config.eval.checkpoint=best

Smoke run (< 2 min on 2 CPU cores) on the fake release of tfds_builders/fixtures.py:

  python -m tfds_builders.fixtures --out FIX
  python -m tfds_builders.avs_object --raw_dir FIX/avsbench_object --data_dir FIX/tfds --config s4
  python main.py --config configs/s4.py:smoke --workdir /tmp/qdf_s4_smoke --config.data.data_dir=FIX/tfds

Arguments after ':' (comma-separated): 'smoke' (configs.common.apply_smoke, 64² frames); a backbone
name from qdformer_jax.models.backbones.BACKBONE_NAMES ('swin_t', 'resnet101', 'pvt_v2_b5', ...; with
'smoke' a narrow, shallow variant of it); 'literal' (the paper's codebook recipe: plain L2 codebook, no
dead-code restarts, Eq. 9 summed over d with λ_com = 0.25, no warm-up; by default the cosine codebook
with restarts, Eq. 9 averaged over d without the commitment term, and a continuous warm-up for the
first quarter of the run, see configs.common.apply_codebook_recipe for why). Unknown words are an error that
lists the allowed ones.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  return common.avs_object_config('s4', arg)
