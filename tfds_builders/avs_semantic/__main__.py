"""Builds AVS-Semantic: ``python -m tfds_builders.avs_semantic --raw_dir RAW --data_dir DATA``.

``RAW`` holds ``metadata.csv``, ``label2idx.json`` and ``v1s/ v1m/ v2/`` as released;
``--config`` picks all (the AVSS benchmark, default), v1s, v1m or v2. Prints each split's build
summary (skipped clips and notes). A dataset version that ``DATA`` already holds is an error
unless ``--overwrite`` is given (then it is rebuilt).
"""
from __future__ import annotations

import argparse
import json

from qdformer_jax.data import avsbench
from tfds_builders import cli
from tfds_builders.avs_semantic.avs_semantic_dataset_builder import AvsSemantic


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Build the avs_semantic TFDS dataset (AVSS).')
  parser.add_argument('--raw_dir', required=True, help='the unpacked AVSBench AVS-Semantic release')
  parser.add_argument('--data_dir', required=True, help='TFDS data dir to write into')
  parser.add_argument('--config', choices=('all', 'v1s', 'v1m', 'v2'), default='all')
  parser.add_argument('--label_source', choices=('auto', 'rgb', 'semantic'), default='auto',
                      help='auto: labels_semantic where present, else labels_rgb')
  parser.add_argument('--strict', action='store_true',
                      help='stop at the first unusable clip instead of skipping and counting it')
  parser.add_argument('--file_format', default='array_record')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild a dataset version that --data_dir already holds (replaces it)')
  args = parser.parse_args(argv)
  builder = AvsSemantic(config=args.config, data_dir=args.data_dir, file_format=args.file_format,
                        raw_dir=args.raw_dir, label_source=args.label_source, strict=args.strict)
  if builder.is_prepared() and not args.overwrite:
    parser.exit(2, f'error: {avsbench.already_built_message([builder])}\n')
  builder.download_and_prepare(download_config=cli.download_config(args.overwrite))
  print(f'avs_semantic/{args.config}:', json.dumps(builder.info.metadata.get('build_summary', {}),
                                                   indent=2))


if __name__ == '__main__':
  main()
