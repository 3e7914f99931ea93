"""Public inference entry point (docs/DESIGN.md §8): restore a trained model anywhere and segment clips.

  from qdformer_jax import inference
  predictor = inference.load('/path/to/workdir')            # best checkpoint, else the latest
  out = predictor.predict(frames, waveform, sample_rate=44100)
  out['labels']        # int32 [B,T,H,W] class ids at the input resolution (semantic configs)
  out['probability']   # float32 [B,T,H,W] foreground probability (binary configs), out['mask'] > threshold

``load`` accepts a workdir written by ``train_and_evaluate`` (``config.json`` plus Orbax checkpoints
under ``checkpoints/<step>/``, see ``qdformer_jax.workdir``) or one checkpoint step directory (holding
``state/``). It restores only the model, never the optimizer, onto one local device, whatever mesh
the checkpoint was saved from (8 TPU chips -> one Colab GPU or a laptop CPU):

* the abstract model comes from ``nnx.eval_shape(build_model(config))`` (no initialisation is run),
  each leaf given a single-device sharding, PRNG keys as raw key data (as the checkpoint stores them);
* the checkpoint's ``state`` item is the pure dict of ``nnx.state((model, optimizer))``, so the model
  is its key ``'0'``. We restore that subtree alone with Orbax's partial restore
  (``PyTreeRestore(partial_restore=True)``): the optimizer moments are neither read nor described.
  That is the robust choice: restoring the whole dict would need the exact abstract optimizer state,
  which depends on the optimizer code and config of the run (schedule, masks, optax version) and
  would read about three times the bytes. A checkpoint holding the model state alone (no ``'0'``
  key) restores too. Shapes and dtypes are checked against the checkpoint metadata first, so a
  config that does not describe the checkpoint fails with the mismatching names.

``Predictor.predict`` does the evaluation pipeline of one clip: frames warped to the config's
``image_size`` (``transforms.eval_transform``, PIL bilinear), audio as VGGish log-mel
(``waveform_to_log_mel`` + ``pad_examples``: one 0.96 s example per frame; AST filterbanks, one per
second, when the run's ``model.audio.encoder`` is 'ast'), the model in eval mode,
then docs/DESIGN.md §3 post-processing with the mask logits upsampled bilinearly to the input resolution
(``qdformer_jax.evaluation.postprocess``, the evaluator's own code).
The model runs in one jitted program per model-input shape (B, T) and the post-processing in one per
output size, so clips of many resolutions share the model's compilation.
"""
from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import audio as audio_lib
from qdformer_jax.data import registry, transforms
from qdformer_jax.evaluation.postprocess import postprocess
from qdformer_jax.training import checkpoint
from qdformer_jax.training.state import abstract_model

# -- config ----------------------------------------------------------------------------------------

config_from_json = workdir_lib.config_from_json  # the one reader of a run's config.json


def class_names(config) -> tuple[str, ...] | None:
  """Names by output class id (0 = background) for the dataset the config was trained on, or None."""
  try:
    return registry.class_names(config.data)
  except ValueError:
    return None


# -- checkpoint lookup -----------------------------------------------------------------------------

def _is_step_dir(path: epath.Path) -> bool:
  return (path / workdir_lib.STATE_ITEM).is_dir()


def _find_in_workdir(workdir: epath.Path, config, step: int | None, which: str | None):
  """(step directory, step) of the checkpoint a workdir holds for ``step`` / ``which``."""
  directory = epath.Path(workdir_lib.checkpoints_dir(workdir))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    steps = sorted(manager.all_steps())
    if step is not None:
      chosen = step if step in steps else None
    else:
      best = checkpoint.best_step(manager, config.best_metric or None, 'max')
      latest = manager.latest_step()
      chosen = latest if which == 'latest' else best if which == 'best' else (best if best is not None else latest)
  finally:
    manager.close()
  if chosen is None:
    wanted = f'step {step}' if step is not None else f'a {which} checkpoint' if which else 'a checkpoint'
    raise FileNotFoundError(
        f'{wanted} not found in {workdir} ({workdir_lib.CHECKPOINTS}/: {steps or "none"}). Pass a workdir '
        f'written by train_and_evaluate ({workdir_lib.CHECKPOINTS}/<step>/{workdir_lib.STATE_ITEM}) or a '
        f'checkpoint step directory holding {workdir_lib.STATE_ITEM}/.')
  return directory / str(chosen), int(chosen)


def _locate(path, step, which, config):
  """-> (step directory, step or None, config)."""
  if which not in (None, 'best', 'latest'):
    raise ValueError(f"which must be 'best', 'latest' or None (best if present, else latest), got {which!r}")
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: pass a training workdir or a checkpoint step directory')
  if path.name == workdir_lib.STATE_ITEM and _is_step_dir(path.parent):
    path = path.parent
  if _is_step_dir(path):
    if step is not None or which is not None:
      raise ValueError(f'{path} is a checkpoint step directory; step= and which= select a checkpoint '
                       'inside a workdir, pass the workdir instead')
    if ocp.path.step.is_tmp_checkpoint(path):
      raise FileNotFoundError(f'{path} is an unfinished checkpoint (still being written or aborted)')
    if config is None:
      config = config_from_json(path.parent.parent / workdir_lib.CONFIG_FILE)
    number = int(path.name) if path.name.isdigit() else None
    return path, number, config
  if not path.is_dir():
    raise FileNotFoundError(f'{path} is not a directory: pass a training workdir or a checkpoint step directory')
  if not (path / workdir_lib.CHECKPOINTS).is_dir():
    raise FileNotFoundError(
        f'no checkpoints in {path}: expected a workdir written by train_and_evaluate (with '
        f'{workdir_lib.CHECKPOINTS}/) or a checkpoint step directory holding {workdir_lib.STATE_ITEM}/')
  if config is None:
    config = config_from_json(path / workdir_lib.CONFIG_FILE)
  step_dir, number = _find_in_workdir(path, config, None if step is None else int(step), which)
  return step_dir, number, config


# -- restore ---------------------------------------------------------------------------------------

def restore_model_state(state_dir, config, device=None):
  """(graphdef, model nnx.State on ``device``) restored from an Orbax ``state`` item directory."""
  device = device or jax.local_devices()[0]
  graphdef, abstract_state = abstract_model(config)
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                abstract_state)
  return graphdef, checkpoint.restore_model(state_dir, abstract_state)


def load(path, *, step: int | None = None, which: str | None = None, config=None, device=None) -> Predictor:
  """A :class:`Predictor` for the model a training workdir or checkpoint step directory holds.

  Args:
    path: a workdir written by ``train_and_evaluate`` (its ``config.json`` is read) or a checkpoint
      step directory such as ``WORKDIR/checkpoints/1000`` (the config is read
      from ``WORKDIR/config.json``). Local paths or any path Orbax reads (``gs://...``).
    step: in a workdir, this step.
    which: in a workdir, ``'best'`` (best by ``config.best_metric``), ``'latest'`` or None: best if
      the workdir has one, else latest.
    config: the run's ConfigDict (or a dict), instead of reading ``config.json``.
    device: where the model lives and runs; default the first local device.
  """
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  step_dir, number, config = _locate(path, step, which, config)
  device = device or jax.local_devices()[0]
  graphdef, state = restore_model_state(step_dir / workdir_lib.STATE_ITEM, config, device)
  logging.info('restored the model of %s (step %s) onto %s', step_dir, number, device)
  return Predictor(graphdef, state, config, step=number, checkpoint_dir=str(step_dir), device=device)


def _forward(graphdef, state, frames, log_mel, frame_valid) -> dict:
  """The model in eval mode; the final decoder layer's per-slot outputs (and VQ indices)."""
  model = nnx.merge(graphdef, state)
  outputs = model(frames, log_mel, frame_valid, train=False)
  raw = {k: outputs[k] for k in ('pred_logits', 'pred_boxes', 'pred_masks')}
  if outputs.get('vq') is not None:
    raw.update({k: v for k, v in outputs['vq'].items() if k.endswith('_indices')})
  return raw


# -- the predictor ---------------------------------------------------------------------------------

class Predictor:
  """A restored model with its config: ``predict(frames, audio)`` -> per-pixel predictions.

  Attributes: ``config``, ``graphdef`` and ``state`` (the model's NNX state on ``device``), ``step``,
  ``checkpoint_dir``, ``binary``, ``image_size`` (the model's input size), ``num_frames`` (the
  training clip length; other lengths work too), ``class_names`` (by output class id, 0 =
  background; None when unknown), ``audio_pad`` (how a short waveform is padded: 'zeros' for
  AVS-Semantic, 'repeat' otherwise, as the datasets do).
  """

  def __init__(self, graphdef, state, config, *, step: int | None = None, checkpoint_dir: str | None = None,
               device=None):
    self.graphdef, self.state, self.config = graphdef, state, config
    self.step, self.checkpoint_dir = step, checkpoint_dir
    self.device = device or jax.local_devices()[0]
    self.binary = bool(config.data.binary)
    self.image_size = int(config.data.image_size)
    self.num_frames = int(config.data.num_frames)
    self.class_names = class_names(config)
    self.audio_pad = registry.get(config.data.name).audio_pad
    self.audio_encoder = config.model.audio.encoder  # picks the front end (data.audio)
    self._forward = jax.jit(functools.partial(_forward, graphdef))
    self._postprocess = jax.jit(postprocess, static_argnames=('height', 'width', 'binary'))

  def __repr__(self) -> str:
    kind = 'binary' if self.binary else f'{self.config.data.num_classes} classes'
    return (f'Predictor({self.config.get("name", "?")}, {kind}, {self.image_size}px, step {self.step}, '
            f'{self.checkpoint_dir}, on {self.device})')

  @property
  def model(self):
    """The restored model as an NNX module (call it with ``train=False``)."""
    return nnx.merge(self.graphdef, self.state)

  # -- inputs --

  def _clip_log_mel(self, audio, num_frames: int, sample_rate, clip: int) -> np.ndarray:
    where = f'audio[{clip}]' if clip >= 0 else 'audio'
    a = np.asarray(audio)
    encoder = self.audio_encoder
    if sample_rate is None:
      shape = audio_lib.example_shape(encoder)
      if a.shape != (num_frames, *shape):
        kind = 'AST filterbanks' if encoder == 'ast' else 'VGGish log-mel'
        raise ValueError(
            f'{where}: without sample_rate audio must be {kind} [{num_frames}, {shape[0]}, {shape[1]}] (one '
            f'example per frame), got shape {a.shape}; for a waveform pass sample_rate=')
      return a.astype(np.float32)
    examples = audio_lib.waveform_to_examples(a, sample_rate, encoder)
    if examples.shape[0] == 0:
      example = 'one 25 ms AST frame' if encoder == 'ast' else 'one 0.96 s VGGish example'
      raise ValueError(f'{where}: the waveform ({a.shape[0]} samples at {sample_rate} Hz) is shorter than '
                       f'{example}; pass about 1 s of audio per frame')
    return audio_lib.pad_examples(examples, num_frames, self.audio_pad)

  def _log_mel(self, audio, batch: int, num_frames: int, sample_rate) -> np.ndarray:
    if isinstance(audio, (list, tuple)):
      if len(audio) != batch:
        raise ValueError(f'audio is a list of {len(audio)} clips but frames hold {batch}')
      return np.stack([self._clip_log_mel(a, num_frames, sample_rate, i) for i, a in enumerate(audio)])
    a = np.asarray(audio)
    if sample_rate is None and a.ndim == 4:
      if a.shape[0] != batch:
        raise ValueError(f'log-mel audio of shape {a.shape} holds {a.shape[0]} clips but frames hold {batch}')
      return np.stack([self._clip_log_mel(x, num_frames, None, i) for i, x in enumerate(a)])
    if batch != 1:
      raise ValueError(f'frames hold {batch} clips but audio is one clip: pass a list of {batch} waveforms '
                       'or log-mel [B,T,96,64]')
    return self._clip_log_mel(a, num_frames, sample_rate, -1)[None]

  def preprocess(self, frames, audio, *, sample_rate: float | None = None, frame_valid=None):
    """The model's inputs: (frames uint8 [B,T,S,S,3], log_mel float32 [B,T,96,64], frame_valid bool
    [B,T]) with S = image_size; see :meth:`predict` for what ``frames`` and ``audio`` may be."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
      raise ValueError(f'frames must be uint8 RGB (0..255), got dtype {frames.dtype}; convert floats in '
                       '[0, 1] with np.clip(np.round(x * 255), 0, 255).astype(np.uint8)')
    if frames.ndim == 4:
      frames = frames[None]
    if frames.ndim != 5 or frames.shape[-1] != 3 or 0 in frames.shape:
      raise ValueError(f'frames must be [T,H,W,3] or [B,T,H,W,3] RGB, got shape {frames.shape}')
    batch, num_frames = frames.shape[:2]
    size = self.image_size
    empty = np.zeros(frames.shape[1:4], np.uint8)
    model_frames = np.stack([transforms.eval_transform(clip, empty, size)[0] for clip in frames])
    log_mel = self._log_mel(audio, batch, num_frames, sample_rate)
    valid = np.ones((batch, num_frames), bool) if frame_valid is None else np.asarray(frame_valid, bool)
    if valid.shape not in ((num_frames,), (batch, num_frames)):
      raise ValueError(f'frame_valid must be bool [T] or [B,T] = [{batch}, {num_frames}], got shape '
                       f'{valid.shape}')
    valid = np.ascontiguousarray(np.broadcast_to(valid, (batch, num_frames)))
    return model_frames, log_mel, valid

  # -- prediction --

  def predict(self, frames, audio, *, sample_rate: float | None = None, frame_valid=None,
              threshold: float = 0.5, output_size: tuple[int, int] | None = None,
              return_raw: bool = False) -> dict:
    """Segments clips of frames with their audio.

    Args:
      frames: uint8 RGB [T,H,W,3] (one clip) or [B,T,H,W,3], any H×W: warped to image_size for the
        model like evaluation does; predictions come back at H×W.
      audio: VGGish log-mel [T,96,64] / [B,T,96,64], or with ``sample_rate`` a waveform (1-D or
        [n, channels]; int16 or float), or a list of B of either. A waveform becomes one 0.96 s
        example per frame (``waveform_to_log_mel``; with an AST run, AST filterbanks [T,98,128],
        one per second); a short one is padded (``audio_pad``), a long one trimmed to T examples.
      sample_rate: the waveform's rate in Hz (any rate: resampled to 16 kHz). None: audio is log-mel.
      frame_valid: optional bool [T] or [B,T]; False marks padding frames (excluded from fusion).
      threshold: 0.5 in docs/DESIGN.md §3.
      output_size: (height, width) of the predictions instead of the input's H×W.
      return_raw: also return ``raw``: the model's final-layer per-slot outputs ``pred_logits``
        [B,T,N,C], ``pred_boxes`` [B,T,N,4], ``pred_masks`` [B,T,N,S/4,S/4] (logits) and the VQ
        code indices when the model quantizes.

    Returns a dict of NumPy arrays, always with the batch axis: semantic configs ``labels`` int32
    [B,T,H,W] (0 = background, c = class c) and ``scores`` float32 [B,T,H,W]; binary configs
    ``probability`` float32 [B,T,H,W] and ``mask`` bool [B,T,H,W]; ``class_names`` (by class id,
    or None), and ``raw`` on request.
    """
    model_frames, log_mel, valid = self.preprocess(frames, audio, sample_rate=sample_rate, frame_valid=frame_valid)
    bad = ~np.isfinite(log_mel).all(axis=(2, 3))  # [B, T]: a frame's audio example holds NaN or inf
    if bad.any():
      clip = int(np.flatnonzero(bad.any(axis=1))[0])
      where = f'audio[{clip}]' if log_mel.shape[0] > 1 else 'audio'
      raise ValueError(f'{where} holds non-finite values (NaN or inf) in {int(bad[clip].sum())} of {bad.shape[1]} '
                       'frames; the model cannot segment with it: replace them (e.g. np.nan_to_num) or pass clean audio')
    height, width = np.shape(frames)[-3:-1] if output_size is None else output_size
    if int(height) < 1 or int(width) < 1:
      raise ValueError(f'output_size must be (height, width) of positive ints, got {output_size}')
    put = functools.partial(jax.device_put, device=self.device)
    raw = self._forward(self.state, put(model_frames), put(log_mel), put(valid))
    result = self._postprocess(raw, np.float32(threshold), height=int(height), width=int(width),
                               binary=self.binary)
    result = {k: np.asarray(v) for k, v in jax.device_get(result).items()}
    result['class_names'] = self.class_names
    if return_raw:
      result['raw'] = {k: np.asarray(v) for k, v in jax.device_get(raw).items()}
    return result
