"""Are two runs the same? Compares two workdirs bit for bit: every checkpoint step's train state
(every array, exact), its meta item, and every JSON report (all fields but wall-clock times).

  python benchmarks/compare_runs.py WORKDIR_A WORKDIR_B

Used to show that a refactor changes no number: train the smoke config before and after
(``python main.py --config configs/synthetic.py:smoke --workdir DIR``, same machine) and compare.
Prints one line per checkpoint and report, and a verdict; exit code 1 when anything differs.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import orbax.checkpoint as ocp

TIMES = ('eval_seconds',)  # wall-clock fields: differ between any two runs


def _arrays(step_dir: str) -> dict:
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, 'state'))
  flat = {}

  def walk(tree, prefix):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, f'{prefix}{k}/')
    else:
      flat[prefix[:-1]] = np.asarray(tree)
  walk(restored, '')
  return flat


def _without_times(value):
  if isinstance(value, dict):
    return {k: _without_times(v) for k, v in value.items() if k not in TIMES}
  if isinstance(value, list):
    return [_without_times(v) for v in value]
  return value


def compare(a: str, b: str) -> list[str]:
  problems = []
  steps = sorted(os.listdir(os.path.join(a, 'checkpoints')), key=lambda s: (not s.isdigit(), s))
  for step in [s for s in steps if s.isdigit()]:
    sa, sb = os.path.join(a, 'checkpoints', step), os.path.join(b, 'checkpoints', step)
    if not os.path.isdir(sb):
      problems.append(f'checkpoint {step}: missing in {b}')
      continue
    xa, xb = _arrays(sa), _arrays(sb)
    differ = [k for k in sorted(set(xa) | set(xb))
              if k not in xa or k not in xb or xa[k].dtype != xb[k].dtype or not np.array_equal(xa[k], xb[k])]
    with open(os.path.join(sa, 'meta', 'metadata')) as fa, open(os.path.join(sb, 'meta', 'metadata')) as fb:
      meta_same = json.load(fa) == json.load(fb)
    print(f'checkpoint {step}: {len(xa)} arrays, {len(differ)} differ; meta {"equal" if meta_same else "differs"}')
    problems += [f'checkpoint {step}: {k}' for k in differ[:5]] + ([] if meta_same else [f'checkpoint {step}: meta'])
  ra, rb = os.path.join(a, 'reports'), os.path.join(b, 'reports')
  for name in sorted(f for f in os.listdir(ra) if f.endswith('.json')):
    if not os.path.exists(os.path.join(rb, name)):
      problems.append(f'report {name}: missing in {b}')
      continue
    with open(os.path.join(ra, name)) as fa, open(os.path.join(rb, name)) as fb:
      same = _without_times(json.load(fa)) == _without_times(json.load(fb))
    print(f'report {name}: {"equal" if same else "differs"}')
    if not same:
      problems.append(f'report {name}')
  return problems


def main(argv) -> int:
  if len(argv) != 3:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  problems = compare(argv[1], argv[2])
  print('the same, bit for bit' if not problems else 'DIFFERENT: ' + '; '.join(problems))
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
