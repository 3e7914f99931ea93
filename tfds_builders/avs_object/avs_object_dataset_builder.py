"""AVSBench AVS-Object (S4 single source, MS3 multi source) as TFDS records, TensorFlow-free.

Reads the release as unpacked (docs/DESIGN.md §4.1, layout in README.md) and writes
``qdformer_jax.data.records.clip_features(5)``: frames as released (PNG bytes), masks binarised
(> 0 -> class id 1) as 8-bit PNGs, log-mel computed once here from the wav files (or read from the
released ``.pkl`` files with ``log_mel_source='pkl'``, which needs torch), and the wav itself as
the 16 kHz mono waveform the log-mel is computed from (``audio``, for noise-robustness evaluation).

    builder = AvsObject(config='s4', data_dir=DATA, file_format='array_record', raw_dir=RAW)
    builder.download_and_prepare()
    source = builder.as_data_source('train')

``RAW`` holds ``Single-source/`` and/or ``Multi-sources/``; instead of ``raw_dir`` the TFDS manual
dir works too (``download_config=tfds.download.DownloadConfig(manual_dir=RAW)``). Per split, what
was skipped or noted is logged and kept in ``builder.info.metadata['build_summary']``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from qdformer_jax.data import avsbench, records


@dataclasses.dataclass
class AvsObjectConfig(tfds.core.BuilderConfig):
  """``subset``: 's4' or 'ms3'."""
  subset: str = 's4'


class AvsObject(tfds.core.GeneratorBasedBuilder):
  """AVSBench S4 / MS3: T = 5 frames, binary masks, VGGish log-mel."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'S4 and MS3 from the released layout.',
                   '1.1.0': 'Adds the 16 kHz waveform (audio, audio_length) for noise-robustness evaluation.'}
  BUILDER_CONFIGS = [
      AvsObjectConfig(name='s4', subset='s4',
                      description='Single source: 3452/740/740 clips, train GT on frame 1 only.'),
      AvsObjectConfig(name='ms3', subset='ms3',
                      description='Multi sources: 296/64/64 clips, GT on all 5 frames.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request AVSBench (AVS-Object) from the authors, unpack it, and pass the folder holding
  `Single-source/` (S4) and/or `Multi-sources/` (MS3) as `raw_dir=` or as the manual dir.
  """

  def __init__(self, *, raw_dir=None, log_mel_source: str = 'wav', strict: bool = False, **kwargs):
    """``raw_dir``: the release (else the manual dir); ``log_mel_source``: 'wav' or 'pkl';
    ``strict``: stop at the first unusable clip instead of skipping and counting it."""
    if log_mel_source not in ('wav', 'pkl'):
      raise ValueError(f"log_mel_source must be 'wav' or 'pkl', got {log_mel_source!r}")
    self._raw_dir = None if raw_dir is None else Path(raw_dir)
    self._log_mel_source = log_mel_source
    self._strict = strict
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=records.clip_features(avsbench.OBJECT_FRAMES),
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/OpenNLPLab/AVSBench',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    raw_dir = self._raw_dir if self._raw_dir is not None else Path(dl_manager.manual_dir)
    lister = avsbench.list_s4 if self.builder_config.subset == 's4' else avsbench.list_ms3
    return {split: self._generate_examples(lister(raw_dir, split), split)
            for split in avsbench.SPLITS}

  def _generate_examples(self, specs, split):
    summary = avsbench.BuildSummary(f'avs_object/{self.builder_config.name}', split)
    yield from avsbench.generate_examples(specs, summary, strict=self._strict,
                                          log_mel_source=self._log_mel_source)
    self.info.metadata.setdefault('build_summary', {})[split] = summary.to_dict()
    if summary.written == 0:
      raise avsbench.ReleaseError(f'no usable clip in split {split!r}:\n{summary.report()}')
    (logging.warning if summary.written < summary.listed else logging.info)(summary.report())
