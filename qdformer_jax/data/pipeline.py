"""grain input pipelines: TFDS ArrayRecord clips -> the batch contract of docs/DESIGN.md §4.2.

One pipeline serves every dataset, because every builder writes the record layout of
``qdformer_jax.data.records``. Process p yields rows [p * b, (p + 1) * b) of every global batch
(b = ``global_batch / process_count``), reading and decoding only those clips; the training loop
assembles the global array with ``jax.make_array_from_process_local_data``. The global batches are
therefore the ones a single process would yield, whatever the process count (same clips, same
order, same augmentation), and the official per-batch metrics group the same clips.

Train iterators shuffle (differently every epoch), repeat forever and are checkpointable
(``get_state``/``set_state``; saved by Orbax through ``grain.checkpoint``). Their position is also
one number independent of the process count: the index of the next global batch (global batch k
holds the examples [k * global_batch, (k + 1) * global_batch) of the shuffled, repeated sequence).
``make_train_iterator(..., start_batch=k)`` starts every process at global batch k, so a run
checkpointed with P processes resumes with any other count at the same example. Eval iterators run one
pass and pad the last batch with copies marked ``clip_valid = False`` so shapes stay static and every
clip counts exactly once.

Noise robustness: an eval iterator given a ``noise.Condition`` (the noise sweep's evaluator passes
one per SNR) recomputes each clip's log-mel from its stored waveform with background noise mixed in
at that SNR (``qdformer_jax.data.noise``). Negative audio: an eval iterator given a
``negatives.Negative`` gives every clip silence, noise or another clip's audio and an empty target;
``data.negative_fraction`` does so for that fraction of the training clips (``qdformer_jax.data.negatives``).
"""
from __future__ import annotations

import logging
import math

import grain
import jax
import numpy as np

from qdformer_jax import sharding
from qdformer_jax.data import audio, negatives, noise, records, registry, transforms

DEVICE_KEYS = ('frames', 'log_mel', 'semantic', 'gt_valid', 'frame_valid')  # + clip_valid in eval batches


def decode_clip(record: dict, data_config, *, train: bool, rng: np.random.Generator | None,
                noise_condition: noise.Condition | None = None) -> dict:
  """One stored clip -> numpy arrays of the batch contract (one clip, no batch axis); background
  noise in its audio with a ``noise_condition`` (see ``record_log_mel``)."""
  size = int(data_config.image_size)
  num_frames = len(record['frames'])
  frame_valid = np.asarray(record['frame_valid'], bool).copy()
  gt_valid = np.asarray(record['gt_valid'], bool) & frame_valid
  frames, masks = [], []
  for t in range(num_frames):
    if not frame_valid[t] or not record['frames'][t]:
      frames.append(None)
      masks.append(None)
      frame_valid[t] = False
      continue
    frame = records.decode_image(record['frames'][t], 'RGB')
    if gt_valid[t] and record['semantic'][t]:
      mask = records.decode_image(record['semantic'][t], 'L')
    else:
      mask = np.zeros(frame.shape[:2], np.uint8)
    frames.append(frame)
    masks.append(mask)
  gt_valid &= frame_valid
  valid = [t for t in range(num_frames) if frames[t] is not None]
  if not valid:
    raise ValueError(f"clip {record.get('clip_id', b'?')!r} has no readable frame")
  clip = np.stack([frames[t] for t in valid])
  clip_masks = np.stack([masks[t] for t in valid])
  if train:
    clip, clip_masks = transforms.train_transform(
        clip, clip_masks, size, rng=rng, mode=data_config.train_resize,
        hflip=bool(data_config.hflip))
  else:
    clip, clip_masks = transforms.eval_transform(clip, clip_masks, size)
  out_frames = np.zeros((num_frames, size, size, 3), np.uint8)
  out_masks = np.zeros((num_frames, size, size), np.uint8)
  out_frames[valid] = clip
  out_masks[valid] = clip_masks
  return {
      'frames': out_frames,
      'log_mel': record_log_mel(record, data_config, noise_condition),
      'semantic': out_masks,
      'gt_valid': gt_valid,
      'frame_valid': frame_valid,
  }


def record_log_mel(record: dict, data_config, noise_condition: noise.Condition | None = None) -> np.ndarray:
  """The clip's float32 [T, *audio.example_shape(encoder)] audio examples, encoder =
  ``data_config.audio_encoder`` (= ``model.audio.encoder``): the stored VGGish log-mel; for 'ast' the
  AST filterbanks computed here from the stored waveform, one per second, laid out as the stored
  log-mel (the first ``frame_valid`` seconds padded by the dataset's rule, zeros after). With a
  ``noise_condition``, either is recomputed from the stored waveform with background noise at its
  SNR, deterministic per (its seed, clip index) (see ``noise.py``)."""
  encoder = data_config.get('audio_encoder') or 'vggish'
  pad_mode = registry.get(data_config.name).audio_pad
  if noise_condition is not None:
    return noise.record_noisy_log_mel(
        record, float(noise_condition.snr_db), seed=int(noise_condition.seed), clip_index=item_index(record),
        noise_dir=noise_condition.noise_dir, pad_mode=pad_mode, encoder=encoder)
  if encoder != 'ast':
    return np.asarray(record['log_mel'], np.float32)
  waveform = records.decode_audio(record)
  frame_valid = np.asarray(record['frame_valid'], bool)
  if waveform.shape[0] == 0:
    raise ValueError(f"clip {record.get('clip_id', b'?')!r} has no stored waveform (audio_length = 0; built "
                     "from the released .pkl log-mel): model.audio.encoder='ast' computes its filterbanks from "
                     "the waveform; rebuild with log_mel_source='wav'")
  return audio.clip_examples(waveform, audio.SAMPLE_RATE, num_frames=frame_valid.shape[0],
                             num_real=int(frame_valid.sum()), pad_mode=pad_mode, encoder='ast')


def negative_log_mel(record, kind: str, data_config, rng, donor=None) -> np.ndarray:
  """The audio examples of ``record`` hearing negative audio ``kind`` (``donor``'s audio for 'offscreen')."""
  donor_log_mel = record_log_mel(donor, data_config) if donor is not None else None
  return negatives.negative_audio(record, kind, data_config, rng=rng, donor_log_mel=donor_log_mel)


class _DecodeTrain(grain.transforms.RandomMap):
  """A training clip; with ``data.negative_fraction`` > 0, that fraction of them negatives (drawn
  from a generator of their own, so the positives' augmentation is the same as without negatives)."""

  def __init__(self, data_config, source=None):
    self.data_config, self.source = data_config, source

  def random_map(self, record, rng):
    clip = decode_clip(record, self.data_config, train=True, rng=rng)
    if self.source is not None:
      negative_rng = np.random.default_rng(rng.integers(2 ** 63))
      drawn = negatives.draw_train_negative(record, self.data_config, self.source, negative_rng)
      if drawn is not None:
        clip = negatives.make_negative(clip, negative_log_mel(record, drawn[0], self.data_config, negative_rng,
                                                              drawn[1]))
    return clip


class _DecodeEval(grain.transforms.Map):

  def __init__(self, data_config, noise_condition, negative=None, source=None):
    self.data_config, self.noise_condition = data_config, noise_condition
    self.negative, self.source = negative, source

  def map(self, item):
    record, valid = item
    clip = decode_clip(record, self.data_config, train=False, rng=None, noise_condition=self.noise_condition)
    index = item_index(record)
    if self.negative is not None:
      kind = self.negative.kind
      donor = self.source[self.negative.donors[max(index, 0)]] if kind == 'offscreen' else None
      rng = noise.clip_rng(self.negative.seed, index, str(record.get('clip_id', '')))
      clip = negatives.make_negative(clip, negative_log_mel(record, kind, self.data_config, rng, donor))
    clip['clip_valid'] = np.asarray(valid, bool)
    clip['index'] = np.asarray(item_index(record), np.int64)
    return clip


def item_index(record) -> int:
  return int(record.get('_index', -1))


def _read_options(data_config):
  return grain.ReadOptions(num_threads=int(data_config.read_threads), prefetch_buffer_size=8)


def make_train_iterator(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, split: str | None = None, start_batch: int = 0):
  """Infinite, shuffled, checkpointable iterator of per-process batches, starting at global batch
  ``start_batch`` (its first batch is this process's block of that global batch)."""
  if global_batch_size % process_count:
    raise ValueError(f'batch_size {global_batch_size} does not divide over {process_count} processes')
  source = registry.open_source(data_config, split or data_config.train_split)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  with_negatives = float(data_config.negative_fraction) > 0.0
  ds = ds.random_map(_DecodeTrain(data_config, source if with_negatives else None))  # lazy: a process decodes only the clips it takes
  # Global batch k is per-process batch k * process_count + p of every process p, in process order.
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)[process_index::process_count]
  it = iter(ds.to_iter_dataset(_read_options(data_config)))
  if start_batch:
    # Element k of this process's dataset is its block of global batch k, whatever the process count.
    grain.experimental.set_next_index(it, int(start_batch))
  return it


def make_eval_iterator(data_config, split: str, *, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, limit: int | None = None,
                       noise_condition: noise.Condition | None = None,
                       negative: negatives.Negative | None = None):
  """One pass over ``split``; every process yields the same number of batches; padding clips
  carry ``clip_valid = False`` and ``index = -1``; with ``noise_condition``, background noise in every
  clip's audio; with ``negative``, negative audio and empty targets for every clip. Returns
  (iterator, number of real clips)."""
  source = registry.open_source(data_config, split)
  total = len(source) if not limit else min(len(source), int(limit))
  per_process = global_batch_size // process_count
  if global_batch_size % process_count:
    raise ValueError(f'eval batch_size {global_batch_size} does not divide over {process_count} processes')
  steps = max(1, math.ceil(total / global_batch_size))
  # Process p takes rows [p * per_process, (p + 1) * per_process) of every global batch.
  indices = grain.MapDataset.range(steps * per_process).map(
      lambda j: (j // per_process) * global_batch_size + process_index * per_process + j % per_process)

  def fetch(i):
    i = int(i)
    record = dict(source[i if i < total else 0])
    record['_index'] = i if i < total else -1
    return record, i < total

  decode = _DecodeEval(data_config, noise_condition, negative, source)
  ds = indices.map(fetch).map(decode).batch(per_process, drop_remainder=True)
  logging.info('eval %s: %d clips in %d batches of %d', split, total, steps, global_batch_size)
  return iter(ds.to_iter_dataset(_read_options(data_config))), total


def batch_spec(data_config, global_batch_size: int, mesh) -> dict:
  """Shapes, dtypes and shardings of a global train batch (the ``device_batch`` keys), known before
  any record is read: what the train step is compiled for."""
  b, t, s = int(global_batch_size), int(data_config.num_frames), int(data_config.image_size)
  shapes = {'frames': ((b, t, s, s, 3), np.uint8),
            'log_mel': ((b, t) + audio.example_shape(data_config.get('audio_encoder') or 'vggish'), np.float32),
            'semantic': ((b, t, s, s), np.uint8), 'gt_valid': ((b, t), np.bool_), 'frame_valid': ((b, t), np.bool_)}
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in shapes.items()}


def check_batch(batch: dict, spec: dict, data_config) -> None:
  """A clear error when the data's clips do not have the shapes the config compiled the step for."""
  for key, want in spec.items():
    got = np.asarray(batch[key])
    local = (got.shape[0],) + tuple(want.shape[1:])  # each process holds its rows of the global batch
    if got.shape != local or got.dtype != want.dtype:
      raise ValueError(
          f'data {data_config.name}/{data_config.builder_config}: batch field {key!r} is {got.dtype}'
          f'{list(got.shape)}, the config compiled the step for {np.dtype(want.dtype)}{list(local)} '
          f'(data.num_frames={data_config.num_frames}, data.image_size={data_config.image_size}); set them to '
          "the dataset's clip length and size")


def device_batch(batch: dict) -> dict:
  """The keys the jitted steps consume (host-only keys such as clip ids stay behind)."""
  return {k: v for k, v in batch.items() if k in DEVICE_KEYS or k == 'clip_valid'}


def to_global(batch: dict, mesh) -> dict:
  """Per-process numpy arrays -> global jax arrays sharded over the mesh's batch axes: each process
  contributes its rows, ``jax.make_array_from_process_local_data`` joins them. Pass
  ``device_batch(batch)`` for a step's input (host-only keys stay behind)."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in batch.items()}
