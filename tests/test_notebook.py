"""notebooks/colab_predict.ipynb runs top to bottom against a trained smoke workdir, and is stored
without outputs.

The notebook is executed with nbclient in a fresh Python kernel, the way CI would: the environment
variables it reads point it at this checkout (QDFORMER_REPO_DIR: nothing is cloned or installed),
the session's trained workdir (QDFORMER_WORKDIR: nothing is trained) and a temporary output folder
(QDFORMER_OUTPUT_DIR). Any cell error fails the test with the cell and its traceback. Its schema and
per-cell Python syntax are checked by tests/test_inference.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs: not in `pytest -m "not slow"` (CI runs them)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / 'notebooks' / 'colab_predict.ipynb'
CELL_TIMEOUT = 300  # seconds; the whole notebook takes about 30 s here


def test_notebook_is_stored_without_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  for i, cell in enumerate(nb['cells']):
    if cell['cell_type'] == 'code':
      assert cell.get('outputs') == [] and cell.get('execution_count') is None, f'cell {i} has outputs'
  code = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code')
  for env in ('QDFORMER_REPO_DIR', 'QDFORMER_WORKDIR', 'QDFORMER_OUTPUT_DIR'):
    assert env in code
  assert 'predict.segment_video(' in code and 'registry.palette(' in code
  assert '/best/' not in code and 'overlays.palette' not in code  # the old API


def test_notebook_runs_top_to_bottom(trained_workdir, tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  monkeypatch.setenv('QDFORMER_REPO_DIR', str(REPO))
  monkeypatch.setenv('QDFORMER_WORKDIR', trained_workdir)
  monkeypatch.setenv('QDFORMER_OUTPUT_DIR', str(tmp_path / 'out'))
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError (the cell and its traceback) on the first error

  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error']
  assert not errors
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  assert 'Predictor(' in text and str(REPO) in text
  assert '7 frames in 2 windows' in text  # num_frames + 2 s of generated video
  segmented = tmp_path / 'out' / 'segmented'
  report = json.loads((segmented / 'predictions.json').read_text())
  assert report['run']['workdir'] == os.path.abspath(trained_workdir)
  assert (segmented / 'overlay.mp4').is_file() and len(list((segmented / 'overlays').glob('*.png'))) == 7
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 2  # the clip's overlay figure and the first frame of the video
