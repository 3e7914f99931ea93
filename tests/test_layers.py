"""The package's layers depend downward only, and no module imports itself round a cycle.

Layers (low to high): sharding / workdir -> data -> models -> convert, losses -> evaluation ->
training -> entry points (inference, predict, experiments). Every ``import`` of the package is read
from the source with ``ast`` (function-level imports included): a module may import its own layer
or a lower one, never a higher one, and the module graph has no cycle.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / 'qdformer_jax'

LAYERS = {  # first name below qdformer_jax -> rank
    '__init__': 0, 'sharding': 0, 'workdir': 0, 'console': 0,
    'data': 1,
    'models': 2,
    'convert': 3, 'losses': 3,
    'evaluation': 4,
    'training': 5,
    'inference': 6, 'predict': 6, 'experiments': 6, 'testing': 6,
}


def module_name(path: Path) -> str:
  parts = ('qdformer_jax',) + path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1]) if parts[-1] == '__init__' else '.'.join(parts)


def layer(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else '__init__'


def imports(path: Path, modules: set[str]) -> set[str]:
  """The package modules ``path`` imports (``from qdformer_jax.x import y`` counts module x.y when
  it exists, else x)."""
  found = set()
  me = module_name(path)
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        pkg = me.split('.') if path.name == '__init__.py' else me.split('.')[:-1]
        base = '.'.join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition('.')[0]
      if name.startswith('qdformer_jax') and name != me and name != 'qdformer_jax':
        found.add(name)
  return found


def graph() -> dict[str, set[str]]:
  files = sorted(PACKAGE.rglob('*.py'))
  modules = {module_name(f) for f in files}
  return {module_name(f): imports(f, modules) for f in files}


def test_every_module_has_a_layer():
  unknown = {m for m in graph() if layer(m) not in LAYERS}
  assert not unknown, f'modules outside the declared layers (add them to LAYERS): {sorted(unknown)}'


def test_imports_point_downward_only():
  upward = [f'{m} ({layer(m)}) imports {d} ({layer(d)})' for m, deps in graph().items() for d in sorted(deps)
            if LAYERS[layer(d)] > LAYERS[layer(m)]]
  assert not upward, 'upward imports:\n' + '\n'.join(upward)


def test_no_import_cycles():
  g = graph()
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 'open'
    for d in sorted(g.get(m, ())):
      if state.get(d) == 'open':
        cycles.append(' -> '.join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 'done'

  for m in sorted(g):
    if m not in state:
      visit(m, [m])
  assert not cycles, 'import cycles:\n' + '\n'.join(cycles)


def test_the_checker_sees_function_level_and_upward_imports(tmp_path, monkeypatch):
  """The checker itself: a function-level upward import and a two-module cycle are found."""
  pkg = tmp_path / 'qdformer_jax'
  (pkg / 'data').mkdir(parents=True)
  (pkg / 'training').mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'data' / '__init__.py').write_text('')
  (pkg / 'training' / '__init__.py').write_text('')
  (pkg / 'data' / 'a.py').write_text('def f():\n  from qdformer_jax.training import b\n')
  (pkg / 'training' / 'b.py').write_text('from qdformer_jax.data import a\n')
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  g = graph()
  assert g['qdformer_jax.data.a'] == {'qdformer_jax.training.b'}
  assert g['qdformer_jax.training.b'] == {'qdformer_jax.data.a'}
  import pytest
  with pytest.raises(AssertionError, match='upward imports'):
    test_imports_point_downward_only()
  with pytest.raises(AssertionError, match='import cycles'):
    test_no_import_cycles()
