"""Builds AVS-Object: ``python -m tfds_builders.avs_object --raw_dir RAW --data_dir DATA``.

``RAW`` holds ``Single-source/`` and/or ``Multi-sources/`` as released; ``--config`` picks s4, ms3
or both (default). Prints each split's build summary (skipped clips and notes). A dataset version that ``DATA`` already holds is an error
unless ``--overwrite`` is given (then it is rebuilt).
"""
from __future__ import annotations

import argparse
import json

from qdformer_jax.data import avsbench
from tfds_builders import cli
from tfds_builders.avs_object.avs_object_dataset_builder import AvsObject


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Build the avs_object TFDS dataset (S4, MS3).')
  parser.add_argument('--raw_dir', required=True, help='the unpacked AVSBench AVS-Object release')
  parser.add_argument('--data_dir', required=True, help='TFDS data dir to write into')
  parser.add_argument('--config', choices=('s4', 'ms3', 'all'), default='all')
  parser.add_argument('--log_mel_source', choices=('wav', 'pkl'), default='wav',
                      help="'pkl' reads the released log-mel files (needs torch)")
  parser.add_argument('--strict', action='store_true',
                      help='stop at the first unusable clip instead of skipping and counting it')
  parser.add_argument('--file_format', default='array_record')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild a dataset version that --data_dir already holds (replaces it)')
  args = parser.parse_args(argv)
  builders = [AvsObject(config=config, data_dir=args.data_dir, file_format=args.file_format,
                        raw_dir=args.raw_dir, log_mel_source=args.log_mel_source, strict=args.strict)
              for config in (('s4', 'ms3') if args.config == 'all' else (args.config,))]
  existing = [b for b in builders if b.is_prepared()]
  if existing and not args.overwrite:
    parser.exit(2, f'error: {avsbench.already_built_message(existing)}\n')
  for builder in builders:
    builder.download_and_prepare(download_config=cli.download_config(args.overwrite))
    print(f'avs_object/{builder.builder_config.name}:',
          json.dumps(builder.info.metadata.get('build_summary', {}), indent=2))


if __name__ == '__main__':
  main()
