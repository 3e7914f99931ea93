"""matching.hungarian against scipy.optimize.linear_sum_assignment (docs/DESIGN.md §2).

Optimality is checked by the total cost (ties may give different but equally good assignments),
with a tolerance of 1e-5 relative for float costs (the solver runs in float32) and exact equality
for integer costs. 1850 random matrices in all, batched so that each shape compiles once.
The last test runs the matcher and the whole loss on a batch sharded over 8 fake CPU devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from qdformer_jax.losses.matching import hungarian

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One compiled batched solver shared by the tests (each new shape compiles once).
_SOLVE = jax.jit(jax.vmap(hungarian))


def _assert_optimal(costs: np.ndarray, rows: np.ndarray, cols: np.ndarray, rtol: float = 1e-5):
  """Every matrix: a valid assignment of min(n, m) pairs with the scipy optimum's total cost."""
  costs = np.asarray(costs, np.float64)
  rows, cols = np.asarray(rows), np.asarray(cols)
  n, m = costs.shape[-2:]
  k = min(n, m)
  assert rows.shape == cols.shape == costs.shape[:-2] + (k,)
  assert rows.dtype == cols.dtype == np.int32
  flat_costs = costs.reshape(-1, n, m)
  flat_rows, flat_cols = rows.reshape(-1, k), cols.reshape(-1, k)
  for cost, r, c in zip(flat_costs, flat_rows, flat_cols):
    assert np.all(np.diff(r) > 0), r  # rows ascending, unique
    assert len(set(c.tolist())) == k and c.min() >= 0 and c.max() < m, c
    ref_rows, ref_cols = linear_sum_assignment(cost)
    reference = cost[ref_rows, ref_cols].sum()
    np.testing.assert_allclose(cost[r, c].sum(), reference, rtol=rtol, atol=rtol)


def test_square_random_under_jit_vmap():
  costs = np.random.default_rng(0).uniform(size=(400, 5, 5)).astype(np.float32)
  rows, cols = _SOLVE(costs)
  np.testing.assert_array_equal(rows, np.broadcast_to(np.arange(5), (400, 5)))
  _assert_optimal(costs, rows, cols)


def test_rectangular_tall_and_wide():
  rng = np.random.default_rng(1)
  tall = rng.normal(size=(300, 7, 4)).astype(np.float32)  # n >= m: some rows unassigned
  rows, cols = jax.jit(hungarian)(tall)  # leading axes are batch axes
  _assert_optimal(tall, rows, cols)
  wide = rng.normal(size=(150, 4, 7)).astype(np.float32)  # n < m: every row assigned
  rows, cols = _SOLVE(wide)
  np.testing.assert_array_equal(rows, np.broadcast_to(np.arange(4), (150, 4)))
  _assert_optimal(wide, rows, cols)


def test_padded_targets_masked_columns():
  """Square problems whose last columns are padding: large constant cost (and 0, as the criterion
  uses). The valid columns must get the optimum of the rectangular problem on them alone."""
  rng = np.random.default_rng(2)
  costs = rng.uniform(size=(3, 100, 6, 6)).astype(np.float32)
  num_valid = rng.integers(1, 7, size=(3, 100))
  masked = np.arange(6)[None, None, None, :] >= num_valid[..., None, None]
  for pad_cost in (1e3, 0.0):
    padded = np.where(masked, np.float32(pad_cost), costs)
    rows, cols = _SOLVE(padded)  # vmap over axis 0; axis 1 is a batch axis of hungarian
    _assert_optimal(padded, rows, cols, rtol=1e-5 if pad_cost == 0 else 1e-6 * pad_cost)
    for index in np.ndindex(3, 100):
      v = num_valid[index]
      cost, r, c = costs[index].astype(np.float64), np.asarray(rows[index]), np.asarray(cols[index])
      keep = c < v
      assert keep.sum() == v  # every real target is matched
      ref_r, ref_c = linear_sum_assignment(cost[:, :v])
      np.testing.assert_allclose(cost[r[keep], c[keep]].sum(), cost[ref_r, ref_c].sum(),
                                 rtol=1e-4, atol=1e-4)


def test_integer_costs_with_ties_exact():
  costs = np.random.default_rng(3).integers(0, 4, size=(400, 5, 5)).astype(np.float32)
  rows, cols = _SOLVE(costs)
  _assert_optimal(costs, rows, cols, rtol=0.0)


def test_assignment_carries_no_gradient():
  """Differentiating through the solver works (the cost is under stop_gradient: the while loops
  are never differentiated); the gradient of the matched total cost is the assignment matrix."""
  cost = jnp.asarray(np.random.default_rng(4).uniform(size=(4, 4)), jnp.float32)

  def matched_total(c):
    rows, cols = hungarian(c)
    return c[rows, cols].sum()

  grad = jax.jit(jax.grad(matched_total))(cost)
  rows, cols = hungarian(cost)
  expected = np.zeros((4, 4), np.float32)
  expected[np.asarray(rows), np.asarray(cols)] = 1.0
  np.testing.assert_array_equal(grad, expected)


def test_nonfinite_costs_still_give_an_assignment():
  """NaN / inf entries must not hang the solver's loops: each matrix still gets a permutation."""
  costs = np.random.default_rng(5).uniform(size=(400, 5, 5)).astype(np.float32)
  costs[0, 0, 0] = costs[0, 2, 3] = np.nan
  costs[1, :, 1] = np.inf
  costs[2, 3, :] = -np.inf
  costs[3] = np.nan
  rows, cols = _SOLVE(costs)
  np.testing.assert_array_equal(rows, np.broadcast_to(np.arange(5), (400, 5)))
  for c in np.asarray(cols[:4]):
    assert sorted(c.tolist()) == [0, 1, 2, 3, 4]
  _assert_optimal(costs[4:], rows[4:], cols[4:])


_SHARDED_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
    from qdformer_jax.losses.matching import hungarian
    from test_losses import FIXTURE_PROBLEM, loss_fn, random_problem
    assert jax.device_count() == 8, jax.devices()
    params, indices, batch = random_problem(**FIXTURE_PROBLEM)
    costs = np.random.default_rng(0).uniform(size=(8, 5, 5)).astype(np.float32)
    solve, loss = jax.jit(hungarian), jax.jit(loss_fn)
    results = {'single': {'cols': np.asarray(solve(costs)[1]).tolist(),
                          'loss': jax.tree.map(float, loss(params, indices, batch))}}
    for mode in ('Explicit', 'Auto'):
      mesh = jax.make_mesh((8,), ('data',), axis_types=(getattr(AxisType, mode),))
      put = lambda spec: (lambda x: jax.device_put(x, NamedSharding(mesh, spec)))
      results[mode] = {'cols': np.asarray(solve(put(P('data'))(costs))[1]).tolist()}
    # The loss in the jax.make_mesh default mode (explicit axes).
    mesh = jax.make_mesh((8,), ('data',))
    put = lambda spec: (lambda x: jax.device_put(x, NamedSharding(mesh, spec)))
    batch_axis = {'logits': 1, 'boxes': 1, 'masks': 1, 'codebook': None, 'g': 0, 'l': 0}
    sharded_params = {k: put(P() if a is None else P(*[None] * a, 'data'))(v)
                      for k, v in params.items() for a in [batch_axis[k]]}
    sharded_batch = jax.tree.map(put(P('data')), batch)
    assert len(sharded_batch['semantic'].sharding.device_set) == 8
    results['default'] = {'loss': jax.tree.map(
        float, loss(sharded_params, jax.tree.map(put(P('data')), indices), sharded_batch))}
    print(json.dumps(results))
''')


def test_sharded_over_8_devices_equals_single_device():
  """Matcher and loss on a batch split over 8 fake CPU devices equal the single-device results:
  the same assignment (mesh axes explicit and auto), and for the loss (jax.make_mesh default mesh)
  the loss and every term within 1e-5 relative, the normalisation summing over the global batch."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  proc = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT, REPO], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  single = results['single']
  for mode in ('Explicit', 'Auto'):
    assert results[mode]['cols'] == single['cols'], mode
  loss, terms = single['loss']
  sharded_loss, sharded_terms = results['default']['loss']
  assert terms['num_target_frames'] > 0
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
  assert set(sharded_terms) == set(terms)
  for key, value in terms.items():
    np.testing.assert_allclose(sharded_terms[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
