"""In CI the PyTorch references must be importable: a missing one would turn parity tests into skips.

Outside CI (the ``CI`` environment variable unset) the parity tests skip cleanly without them.
"""
from __future__ import annotations

import importlib
import os

import pytest

# Module -> what imports it (each parity test skips through importorskip when it is missing).
REFERENCES = {
    'torch': 'every PyTorch parity test',
    'transformers': 'ResNet / Swin / AST parity and the AST front end (tests/test_backbones.py, '
                    'tests/test_convert.py, tests/test_audio.py)',
    'safetensors': 'the HF safetensors converter test (tests/test_convert.py)',
    'torchvggish': 'VGGish parity (tests/test_backbones.py, tests/test_convert.py; needs soundfile)',
    'torchvggish.vggish_input': 'log-mel parity (tests/test_audio.py; needs soundfile)',
    'resampy': 'resampling parity (tests/test_audio.py)',
    'nbformat': 'the notebook schema test (tests/test_inference.py)',
    'nbclient': 'running the Colab notebook (tests/test_notebook.py)',
    'ipykernel': 'the kernel the notebook runs in (tests/test_notebook.py)',
    'av': 'video decoding and writing (tests/test_video.py, tests/test_predict.py)',
}


@pytest.mark.skipif(not os.environ.get('CI'), reason='only CI must have the references installed')
@pytest.mark.parametrize('module', sorted(REFERENCES))
def test_reference_is_installed(module):
  try:
    importlib.import_module(module)
  except ImportError as e:
    pytest.fail(f'{module} is not importable ({e}); without it {REFERENCES[module]} would skip. '
                'Install requirements-test.txt.')
