"""`python -m qdformer_jax.convert ARCH --src FILE --out DIR`: convert PyTorch backbone weights.

See `qdformer_jax.convert` for the accepted files. Prints a one-line summary (architecture,
parameter count, output directory) and any notes; exits with status 2 and a message on bad input.
"""

from __future__ import annotations

import argparse
import sys

from qdformer_jax.convert import ARCHS, convert_file


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m qdformer_jax.convert',
      description='Convert PyTorch backbone weights (torchvision/HF ResNet, official/HF Swin, '
                  'official/timm PVT-v2, torchvggish VGGish, HF/official AST) into a directory load_converted() reads.')
  parser.add_argument('arch', choices=ARCHS,
                      help="architecture; 'resnet'/'swin' accept any size the file holds")
  parser.add_argument('--src', required=True, help='PyTorch weight file (.pth/.pt/.bin/.safetensors)')
  parser.add_argument('--out', required=True, help='output directory (created if needed)')
  args = parser.parse_args(argv)
  try:
    meta = convert_file(args.arch, args.src, args.out)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'converted {args.arch} from {args.src}: {meta["params"]:,} parameters -> {args.out}')
  for note in meta.get('notes', []):
    print(f'note: {note}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
