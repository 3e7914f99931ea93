"""Input-pipeline throughput on this machine: clips/s at 224x224 for T = 5 (S4) and T = 10 (AVSS).

    python benchmarks/input_pipeline.py [--raw_object DIR] [--raw_semantic DIR] [--seconds 8]

Builds ``avs_object/s4`` and ``avs_semantic/all`` (from the fake releases of
``tfds_builders.fixtures``, train splits replicated ``--copies`` times, unless real releases are
given) into a temporary TFDS dir, then times

* ``direct``: one thread reading records from the ArrayRecord data source, decoding frames and
  masks (PIL) and applying the transforms (``qdformer_jax.data.transforms``), train (short side
  224 + centre crop + random flip) and eval (warp to 224x224);
* ``grain train``: the project's grain train iterator (``qdformer_jax.data.pipeline
  .make_train_iterator``, 2 read threads, shuffled, random flips), batches of ``--batch`` clips,
  when that module is present.

Prints a table and a JSON line (also written to ``--json``). Frame sizes are those of the data
read (the fixtures: S4 224x224 PNG; AVSS 224x224 JPEG for v1 clips, 90-160 px for v2 clips; the
``src px`` column), so numbers on the real AVSS release, with larger v2 frames, will be lower. The
temporary dir is removed at the end.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdformer_jax.data import records, transforms  # noqa: E402
from tfds_builders import fixtures  # noqa: E402
from tfds_builders.avs_object import AvsObject  # noqa: E402
from tfds_builders.avs_semantic import AvsSemantic  # noqa: E402

SIZE = 224


def _decode(record):
  """Record -> (frames [n,H,W,3], masks [n,H,W]) of its real frames."""
  valid = [t for t, f in enumerate(record['frames']) if f and record['frame_valid'][t]]
  frames = np.stack([records.decode_image(record['frames'][t], 'RGB') for t in valid])
  masks = np.stack([
      records.decode_image(record['semantic'][t], 'L') if record['semantic'][t]
      else np.zeros(frames.shape[1:3], np.uint8) for t in valid])
  return frames, masks


def _link(src: Path, dst: Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def replicate_train_clips(raw_object: Path, raw_semantic: Path, copies: int) -> None:
  """Grows the train splits of fake S4 and AVSS releases ``copies``-fold (renamed hard links).

  grain's global shuffle is slow on splits of a few clips (tens of ms per index below ~100
  indices), so the pipeline is timed on train splits of realistic length.
  """
  s4 = raw_object / 'Single-source'
  with open(s4 / 's4_meta_data.csv', newline='') as f:
    rows = list(csv.reader(f))
  data = s4 / 's4_data'
  extra = []
  for name, start, category, split in rows[1:]:
    if split != 'train':
      continue
    rel = Path(split) / category
    for k in range(1, copies):
      new = f'{name}_copy{k}'
      extra.append([new, start, category, split])
      for kind in ('visual_frames', 'gt_masks'):
        for src in (data / kind / rel / name).iterdir():
          _link(src, data / kind / rel / new / src.name.replace(name, new, 1))
      _link(data / 'audio_wav' / rel / f'{name}.wav', data / 'audio_wav' / rel / f'{new}.wav')
      _link(data / 'audio_log_mel' / rel / f'{name}.pkl', data / 'audio_log_mel' / rel / f'{new}.pkl')
  with open(s4 / 's4_meta_data.csv', 'a', newline='') as f:
    csv.writer(f).writerows(extra)

  with open(raw_semantic / 'metadata.csv', newline='') as f:
    rows = list(csv.reader(f))
  extra = []
  for vid, uid, s_min, s_sec, a_obj, split, label in rows[1:]:
    if split != 'train':
      continue
    for k in range(1, copies):
      new = f'{uid}_copy{k}'
      extra.append([vid, new, s_min, s_sec, a_obj, split, label])
      for src in (raw_semantic / label / uid).rglob('*'):
        if src.is_file():
          _link(src, raw_semantic / label / new / src.relative_to(raw_semantic / label / uid))
  with open(raw_semantic / 'metadata.csv', 'a', newline='') as f:
    csv.writer(f).writerows(extra)


def time_direct(source, train: bool, seconds: float, seed: int = 0) -> dict:
  """Single-thread decode + transform rate over the source, cycled for ``seconds``."""
  rng = np.random.default_rng(seed)
  clips = frames_done = 0
  pixels = []
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    for i in range(len(source)):
      frames, masks = _decode(source[i])
      pixels.append(frames.shape[1] * frames.shape[2])
      if train:
        frames, masks = transforms.train_transform(frames, masks, SIZE, rng=rng, hflip=True)
      else:
        frames, masks = transforms.eval_transform(frames, masks, SIZE)
      assert frames.shape[1:3] == (SIZE, SIZE)
      clips += 1
      frames_done += frames.shape[0]
  elapsed = time.perf_counter() - start
  return {'clips_per_s': clips / elapsed, 'frames_per_s': frames_done / elapsed,
          'clips': clips, 'mean_source_pixels': float(np.mean(pixels))}


def time_pipeline(name: str, config: str, data_dir: str, batch: int, seconds: float) -> dict | None:
  """Clips/s of the project's grain train iterator (None when it is not there)."""
  try:
    from qdformer_jax.data import pipeline
  except ImportError:
    return None
  if not hasattr(pipeline, 'make_train_iterator'):
    return None
  import ml_collections

  data_config = ml_collections.ConfigDict({
      'name': name, 'builder_config': config, 'data_dir': data_dir, 'image_size': SIZE,
      'train_split': 'train', 'train_resize': 'short_side_crop', 'hflip': True,
      'read_threads': 2, 'negative_fraction': 0.0})
  iterator = pipeline.make_train_iterator(data_config, global_batch_size=batch, seed=0)
  first = next(iterator)  # warm-up: threads started, first records read
  assert first['frames'].shape[1:] == (len(first['gt_valid'][0]), SIZE, SIZE, 3)
  batches = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  elapsed = time.perf_counter() - start
  del iterator
  return {'clips_per_s': batches * batch / elapsed, 'clips': batches * batch, 'batch': batch,
          'read_threads': 2}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--raw_object', help='AVS-Object release (default: write the fixtures)')
  parser.add_argument('--raw_semantic', help='AVS-Semantic release (default: the fixtures)')
  parser.add_argument('--seconds', type=float, default=8.0, help='timing window per measurement')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--copies', type=int, default=30,
                      help='copies of each fixture train clip (not used with real releases)')
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args(argv)

  work = tempfile.mkdtemp(prefix='qdformer_bench_')
  try:
    if not (args.raw_object and args.raw_semantic):
      fake = fixtures.write_fixtures(Path(work) / 'raw')
      replicate_train_clips(fake['avs_object'], fake['avs_semantic'], args.copies)
    raw_object = args.raw_object or fake['avs_object']
    raw_semantic = args.raw_semantic or fake['avs_semantic']
    data_dir = os.path.join(work, 'tfds')
    datasets = [
        ('avs_object', 's4', 5, AvsObject(config='s4', data_dir=data_dir,
                                          file_format='array_record', raw_dir=raw_object)),
        ('avs_semantic', 'all', 10, AvsSemantic(config='all', data_dir=data_dir,
                                                file_format='array_record', raw_dir=raw_semantic)),
    ]
    rows = []
    load_before = os.getloadavg()[0]
    for *_, builder in datasets:
      builder.download_and_prepare()
    # Direct measurements first: a live grain iterator keeps prefetching in background threads.
    for name, config, T, builder in datasets:
      train, val = builder.as_data_source('train'), builder.as_data_source('val')
      for mode, source, is_train in (('direct train', train, True), ('direct eval', val, False)):
        result = time_direct(source, is_train, args.seconds)
        rows.append({'dataset': f'{name}/{config}', 'T': T, 'mode': mode, **result})
    for name, config, T, _ in datasets:
      result = time_pipeline(name, config, data_dir, args.batch, args.seconds)
      gc.collect()  # drop the iterator (and its threads) before the next measurement
      if result is not None:
        rows.append({'dataset': f'{name}/{config}', 'T': T, 'mode': 'grain train', **result})
  finally:
    shutil.rmtree(work, ignore_errors=True)

  load_after = os.getloadavg()[0]
  print(f"\ninput pipeline at {SIZE}x{SIZE} on {os.cpu_count()} CPUs "
        f"(1-min load average {load_before:.1f} before, {load_after:.1f} after)")
  print(f"{'dataset':<20} {'T':>3} {'mode':<13} {'clips/s':>9} {'frames/s':>9} {'src px':>8}")
  for r in rows:
    frames_per_s = '' if 'frames_per_s' not in r else f"{r['frames_per_s']:.1f}"
    pixels = '' if 'mean_source_pixels' not in r else f"{r['mean_source_pixels']:.0f}"
    print(f"{r['dataset']:<20} {r['T']:>3} {r['mode']:<13} {r['clips_per_s']:>9.1f} "
          f"{frames_per_s:>9} {pixels:>8}")
  result = {'image_size': SIZE, 'cpus': os.cpu_count(),
            'load_average': [load_before, load_after], 'rows': rows}
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2))
  return result


if __name__ == '__main__':
  main()
