"""AVSBench AVS-Semantic (AVSS: v1s, v1m, v2) as TFDS records, TensorFlow-free.

Reads the release as unpacked (docs/DESIGN.md §4.1, layout in README.md) and writes
``qdformer_jax.data.records.clip_features(10)``: frames as released (JPEG bytes, b'' for the 5
padded frames of v1 clips, ``frame_valid`` False there), masks as 8-bit PNGs of class ids 0..70
(background 0 = label2idx - 1), from ``labels_semantic`` where present and otherwise from
``labels_rgb`` by exact PASCAL-VOC palette match; log-mel computed once here from ``audio.wav``
and zero-padded to 10 examples, and ``audio.wav`` itself as the 16 kHz mono waveform the log-mel is
computed from (``audio``, zero-padded to 10 s, for noise-robustness evaluation). v1s train clips have ground truth on frame 0 only.

    builder = AvsSemantic(config='all', data_dir=DATA, file_format='array_record', raw_dir=RAW)
    builder.download_and_prepare()
    source = builder.as_data_source('train')

``RAW`` holds ``metadata.csv``, ``label2idx.json`` and ``v1s/ v1m/ v2/``; instead of ``raw_dir``
the TFDS manual dir works too. Per split, what was skipped or noted is logged and kept in
``builder.info.metadata['build_summary']``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from qdformer_jax.data import avsbench, records


@dataclasses.dataclass
class AvsSemanticConfig(tfds.core.BuilderConfig):
  """``labels``: which AVSS subsets (metadata ``label`` values) the dataset holds."""
  labels: tuple[str, ...] = avsbench.AVSS_LABELS


class AvsSemantic(tfds.core.GeneratorBasedBuilder):
  """AVSBench AVS-Semantic: T = 10 frames (v1 clips padded), 71 class ids, VGGish log-mel."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'AVSS from the released layout.',
                   '1.1.0': 'Adds the 16 kHz waveform (audio, audio_length) for noise-robustness evaluation.'}
  BUILDER_CONFIGS = [
      AvsSemanticConfig(name='all', labels=avsbench.AVSS_LABELS,
                        description='The AVSS benchmark: v1s + v1m + v2, 8498/1304/1554 clips.'),
      AvsSemanticConfig(name='v1s', labels=('v1s',), description='v1s clips only.'),
      AvsSemanticConfig(name='v1m', labels=('v1m',), description='v1m clips only.'),
      AvsSemanticConfig(name='v2', labels=('v2',), description='v2 clips only.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request AVSBench (AVS-Semantic) from the authors, unpack it, and pass the folder holding
  `metadata.csv`, `label2idx.json`, `v1s/`, `v1m/` and `v2/` as `raw_dir=` or as the manual dir.
  """

  def __init__(self, *, raw_dir=None, label_source: str = 'auto', strict: bool = False, **kwargs):
    """``raw_dir``: the release (else the manual dir); ``label_source``: 'auto' (labels_semantic
    where present, else labels_rgb), 'rgb' or 'semantic'; ``strict``: stop at the first unusable
    clip instead of skipping and counting it."""
    if label_source not in ('auto', 'rgb', 'semantic'):
      raise ValueError(f"label_source must be 'auto', 'rgb' or 'semantic', got {label_source!r}")
    self._raw_dir = None if raw_dir is None else Path(raw_dir)
    self._label_source = label_source
    self._strict = strict
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=records.clip_features(avsbench.AVSS_FRAMES),
        metadata=tfds.core.MetadataDict(class_names=list(avsbench.AVSS_CLASS_NAMES)),
        homepage='https://github.com/OpenNLPLab/AVSBench',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    raw_dir = self._raw_dir if self._raw_dir is not None else Path(dl_manager.manual_dir)
    class_names = avsbench.read_label2idx(raw_dir / 'label2idx.json')
    if class_names != avsbench.AVSS_CLASS_NAMES:
      raise avsbench.ReleaseError(
          f"{raw_dir / 'label2idx.json'}: the class index differs from the released AVSS one "
          f'({len(class_names)} classes); this builder and the model assume the released 71')
    return {split: self._generate_examples(
        avsbench.list_avss(raw_dir, split, self.builder_config.labels, self._label_source), split)
            for split in avsbench.SPLITS}

  def _generate_examples(self, specs, split):
    summary = avsbench.BuildSummary(f'avs_semantic/{self.builder_config.name}', split)
    yield from avsbench.generate_examples(specs, summary, strict=self._strict)
    self.info.metadata.setdefault('build_summary', {})[split] = summary.to_dict()
    if summary.written == 0:
      raise avsbench.ReleaseError(f'no usable clip in split {split!r}:\n{summary.report()}')
    (logging.warning if summary.written < summary.listed else logging.info)(summary.report())
