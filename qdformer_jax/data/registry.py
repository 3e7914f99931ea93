"""The datasets the project knows, one entry each: how to open a split, how its audio is padded, its
class names and colours. Everything that depends on which dataset a config names reads this table
(the input pipeline, noise evaluation, overlays, the predictor).

Adding a dataset = a TFDS builder writing the record layout of ``records.py`` + one entry here +
a config file.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable

import numpy as np

from qdformer_jax.data import classes, first_use

BINARY_CLASS_NAMES = ('background', 'sounding')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset.

  name: ``config.data.name``.
  builder_module: the module defining (and registering) its TFDS builder, imported when a split is
    opened (datasets are opened by name, so the reader never depends on build-time code).
  audio_pad: how a clip whose audio holds fewer 0.96 s examples than real frames is padded, as its
    builder does ('repeat' the last example, or 'zeros'); the predictor and noise evaluation follow it.
  semantic_names: class names by semantic id (0 = background) for semantic configs, given
    ``data.num_classes``; None: the dataset is binary only.
  build_on_first_use: the builder is cheap and needs no download (the synthetic dataset): opening a
    split builds it under ``data_dir`` when it is missing, once however many processes open it at
    the same time (``first_use``: a lock beside the dataset; process 0 first in a multi-process run).
  """
  name: str
  builder_module: str
  audio_pad: str
  semantic_names: Callable[[int], tuple[str, ...]] | None = None
  build_on_first_use: bool = False


def _synthetic_names(num_classes: int) -> tuple[str, ...]:
  from qdformer_jax.data import synthetic
  return ('background',) + tuple(synthetic.class_names(num_classes))


DATASETS = {spec.name: spec for spec in (
    DatasetSpec('synthetic_avs', 'tfds_builders.synthetic_avs.synthetic_avs_dataset_builder', 'repeat',
                semantic_names=_synthetic_names, build_on_first_use=True),
    DatasetSpec('avs_object', 'tfds_builders.avs_object.avs_object_dataset_builder', 'repeat'),
    DatasetSpec('avs_semantic', 'tfds_builders.avs_semantic.avs_semantic_dataset_builder', 'zeros',
                semantic_names=lambda num_classes: classes.AVSS_CLASS_NAMES),
)}


def get(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f'data.name must be one of {sorted(DATASETS)}, got {name!r}')
  return DATASETS[name]


def open_source(data_config, split: str):
  """The random-access TFDS source of ``split`` (building the dataset first when its entry says so)."""
  builder = _builder(data_config)
  if isinstance(split, str) and split.split('[', 1)[0] not in builder.info.splits and '+' not in split:
    raise ValueError(f'{builder.name}/{data_config.builder_config} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


def splits(data_config) -> tuple[str, ...]:
  """The names of the dataset's built splits (e.g. synthetic_avs's negative splits 'test_silence', ...)."""
  return tuple(_builder(data_config).info.splits)


def _builder(data_config):
  """The prepared TFDS builder of ``data_config`` (built first when its entry says so)."""
  spec = get(data_config.name)
  module = importlib.import_module(spec.builder_module)
  if spec.build_on_first_use:
    overrides = dict(image_size=int(data_config.image_size), num_frames=int(data_config.num_frames))
    overrides.update(dict(data_config.get('synthetic', None) or {}))
    # Several processes may open it at once: the builder's lock lets one build; in a multi-process
    # run process 0 builds first and the others wait for it (first_use).
    what = (f'{spec.name}/{data_config.builder_config} under {data_config.data_dir} '
            f'{json.dumps(overrides, sort_keys=True, default=str)}')
    builder = first_use.process_zero_first(
        lambda: module.build(data_config.builder_config, data_config.data_dir, quiet=True, **overrides), what)
  else:
    import tensorflow_datasets as tfds
    builder = tfds.builder(f'{spec.name}/{data_config.builder_config}', data_dir=data_config.data_dir)
    if not builder.is_prepared():
      package = spec.builder_module.rsplit('.', 1)[0]
      raise FileNotFoundError(
          f'{spec.name}/{data_config.builder_config} is not built under {data_config.data_dir!r}: build it '
          f'first with `python -m {package} --raw_dir <AVSBench release> --data_dir {data_config.data_dir}`')
  return builder


def class_names(data_config) -> tuple[str, ...]:
  """Names by output class id (index 0 = 'background') for the dataset ``data_config`` describes."""
  if data_config.binary:
    return BINARY_CLASS_NAMES
  spec = get(data_config.name)
  if spec.semantic_names is None:
    raise ValueError(f'{spec.name} is a binary dataset: set data.binary = True')
  names = tuple(spec.semantic_names(int(data_config.num_classes)))
  if len(names) != int(data_config.num_classes) + 1:
    raise ValueError(f'data.num_classes = {data_config.num_classes} but {spec.name} has '
                     f'{len(names) - 1} foreground classes')
  return names


def palette(num_ids: int) -> np.ndarray:
  """uint8 [num_ids, 3]: the colour of every class id (the PASCAL-VOC palette, as AVSS draws it)."""
  return classes.voc_palette(max(int(num_ids), 1))
