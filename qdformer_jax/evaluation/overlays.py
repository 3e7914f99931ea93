"""PNG overlays of evaluation clips: frames with coloured masks, ground truth beside prediction.

One PNG per clip: a row per real frame, the ground-truth mask on the left and the prediction on the
right, each drawn over the frame in the colour of its class id (the PASCAL-VOC palette, as AVSS
``labels_rgb`` uses), and a legend naming the classes that appear in the clip. The legend names are
also stored in the PNG as a text chunk (key ``Legend``, a JSON list) so tools can read them back.
Drawn with Matplotlib's Agg canvas (no display, no pyplot state); the same images go to
TensorBoard when a writer is given.

``render_frame`` draws one predicted frame (no ground truth) with its legend, for the overlays of
``python -m qdformer_jax.predict``.

Class names and colours by semantic id (0 = background) come from the dataset registry
(``qdformer_jax.data.registry``).
"""
from __future__ import annotations

import json
import os

import numpy as np

from qdformer_jax.data import registry

MASK_ALPHA = 0.55
PANEL_INCHES = 2.0
DPI = 100


def blend(frame: np.ndarray, labels: np.ndarray, colours: np.ndarray,
          alpha: float = MASK_ALPHA) -> np.ndarray:
  """uint8 [H,W,3]: ``frame`` with every pixel of class id > 0 tinted by its palette colour."""
  frame = np.asarray(frame, np.float32)
  labels = np.asarray(labels)
  if labels.size and labels.max() >= colours.shape[0]:
    raise ValueError(f'class id {int(labels.max())} has no colour (palette of {colours.shape[0]})')
  tint = colours[labels].astype(np.float32)
  fg = (labels > 0)[..., None]
  out = np.where(fg, (1 - alpha) * frame + alpha * tint, frame)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_clip(frames, gt, pred, gt_valid, frame_valid, names, title: str = ''):
  """A Matplotlib Figure (Agg canvas) of one clip; returns (figure, legend names).

  frames uint8 [T,H,W,3]; gt, pred int class ids [T,H,W]; gt_valid, frame_valid bool [T]. Padded
  frames are left out; frames without ground truth show the bare frame on the left.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  names = tuple(names)
  colours = registry.palette(len(names))
  shown = [t for t in range(len(frames)) if frame_valid[t]]
  if not shown:
    raise ValueError(f'clip {title!r} has no real frame to draw')
  present = sorted({int(c) for t in shown for c in np.unique(pred[t])}
                   | {int(c) for t in shown if gt_valid[t] for c in np.unique(gt[t])})
  present = [c for c in present if c > 0]
  for c in present:
    if c >= len(names):
      raise ValueError(f'class id {c} in clip {title!r} is outside the {len(names)} class names')
  legend = [names[c] for c in present]

  legend_rows = max(1, int(np.ceil(len(present) / 2)))
  fig = Figure(figsize=(2 * PANEL_INCHES, PANEL_INCHES * len(shown) + 0.35 + 0.22 * legend_rows),
               dpi=DPI)
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(shown), 2, squeeze=False)
  for row, t in enumerate(shown):
    left = blend(frames[t], gt[t], colours) if gt_valid[t] else np.asarray(frames[t], np.uint8)
    right = blend(frames[t], pred[t], colours)
    for ax, image, label in ((axes[row, 0], left, 'ground truth' if gt_valid[t] else 'no ground truth'),
                             (axes[row, 1], right, 'prediction')):
      ax.imshow(image, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f'frame {t}: {label}', fontsize=8)
  handles = [Patch(facecolor=colours[c] / 255.0, edgecolor='black', label=f'{c} {names[c]}')
             for c in present]
  if not handles:
    handles = [Patch(facecolor='white', edgecolor='black', label='no foreground')]
  fig.legend(handles=handles, loc='lower center', ncol=2, fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.1) / fig.get_figheight(), 1, 1))
  return fig, legend


FRAME_INCHES = (4.0, 8.0)  # render_frame: the narrowest and widest frame panel (400 / 800 px at DPI)
LEGEND_ENTRY_INCHES = 1.8   # render_frame: legend columns get about this much width each


def render_frame(frame, labels, names, title: str = '', *, inches: tuple[float, float] = FRAME_INCHES):
  """A Matplotlib Figure (Agg canvas) of one predicted frame; returns (figure, legend names).

  frame uint8 [H,W,3]; labels int class ids [H,W] (binary: 0/1 with names ('background',
  'sounding')). The frame is drawn with the classes blended in (:func:`blend`, the palette of
  ``render_clip``) at its own aspect ratio and its pixel width clipped to ``inches`` (min, max) at
  ``DPI``, with a legend of the classes present below it and ``title`` above.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  names = tuple(names)
  colours = registry.palette(len(names))
  frame = np.asarray(frame, np.uint8)
  labels = np.asarray(labels)
  if frame.ndim != 3 or labels.shape != frame.shape[:2]:
    raise ValueError(f'frame [H,W,3] and labels [H,W] must match, got {frame.shape} and {labels.shape}')
  present = [int(c) for c in np.unique(labels) if c > 0]
  for c in present:
    if c >= len(names):
      raise ValueError(f'class id {c} in frame {title!r} is outside the {len(names)} class names')
  legend = [names[c] for c in present]

  height, width = frame.shape[:2]
  width_in = float(np.clip(width / DPI, *inches))
  image_in = width_in * height / width
  columns = max(1, min(max(1, len(present)), int(width_in // LEGEND_ENTRY_INCHES)))
  legend_rows = max(1, -(-len(present) // columns))
  legend_in, title_in = 0.1 + 0.2 * legend_rows, (0.3 if title else 0.0)
  fig_h = image_in + legend_in + title_in
  fig = Figure(figsize=(width_in, fig_h), dpi=DPI)
  FigureCanvasAgg(fig)
  ax = fig.add_axes((0, legend_in / fig_h, 1, image_in / fig_h))
  ax.imshow(blend(frame, labels, colours), interpolation='nearest')
  ax.set_axis_off()
  handles = [Patch(facecolor=colours[c] / 255.0, edgecolor='black', label=f'{c} {names[c]}')
             for c in present]
  if not handles:
    handles = [Patch(facecolor='white', edgecolor='black', label='no foreground')]
  fig.legend(handles=handles, loc='lower center', ncol=columns, fontsize=8, frameon=False,
             borderaxespad=0.1)
  if title:
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / fig_h, va='top')
  return fig, legend


def save_figure(fig, path: str, legend) -> str:
  """Saves a figure of :func:`render_clip` / :func:`render_frame` as a PNG with its legend names in
  the text chunk ``Legend`` (a JSON list); returns the path."""
  fig.savefig(path, dpi=DPI, metadata={'Legend': json.dumps(list(legend)), 'Software': 'qdformer_jax'})
  return path


def figure_to_array(fig) -> np.ndarray:
  """uint8 [H,W,3] RGB pixels of a Figure drawn on an Agg canvas."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_overlays(overlay_dir: str, collected, config, *, limit: int, writer=None, tag: str = 'overlays',
                   step: int = 0) -> list[str]:
  """Draws up to ``limit`` valid clips of ``collected`` into ``overlay_dir/clip_<index>.png``.

  collected: (host_batch, preds) pairs as the evaluator gathers them: host_batch the numpy batch of
  the eval pipeline (frames, semantic, gt_valid, frame_valid, clip_valid, index), preds the
  predicted class ids [b,T,S,S] of its first b clips (binary: 0/1). With a TensorBoard ``writer``
  each image is also added as ``{tag}/clip_<index>`` at ``step``. Returns the PNG paths.
  """
  names = registry.class_names(config.data)
  clips = [(host_batch, np.asarray(preds), i) for host_batch, preds in collected
           for i in range(np.shape(preds)[0]) if bool(host_batch['clip_valid'][i])][:limit]
  os.makedirs(overlay_dir, exist_ok=True)
  paths = []
  for host_batch, preds, i in clips:
    index = int(host_batch['index'][i])
    name = f'clip_{index:05d}'
    fig, legend = render_clip(host_batch['frames'][i], host_batch['semantic'][i], preds[i],
                              host_batch['gt_valid'][i], host_batch['frame_valid'][i], names,
                              title=f'{config.data.name}/{config.data.builder_config} clip {index}')
    path = os.path.join(overlay_dir, f'{name}.png')
    fig.savefig(path, dpi=DPI, metadata={'Legend': json.dumps(legend), 'Software': 'qdformer_jax'})
    if writer is not None:
      writer.add_image(f'{tag}/{name}', figure_to_array(fig), step, dataformats='HWC')
    paths.append(path)
  if writer is not None:
    writer.flush()
  return paths
