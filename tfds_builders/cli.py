"""What the builders' command lines (``python -m tfds_builders.<name>``) share."""
from __future__ import annotations

import tensorflow_datasets as tfds


def download_config(overwrite: bool) -> tfds.download.DownloadConfig:
  """Rebuild the dataset with ``--overwrite`` (raw files are read again); otherwise reuse it."""
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  return tfds.download.DownloadConfig(download_mode=mode)
