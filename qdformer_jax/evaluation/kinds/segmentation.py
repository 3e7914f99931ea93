"""The split's metrics at the run's threshold: ``eval_<split>_<step>.json`` and overlays."""
from __future__ import annotations

from qdformer_jax.evaluation import evals, reports

REPORT_PREFIX = reports.SEGMENTATION_PREFIX


def check(config, name: str) -> None:
  del config, name  # needs nothing beyond the split


def run(context, name: str, split: str) -> dict:
  results = context.segmentation(split, overlay=True)
  evals.log_metrics(name, split, context.step, results)
  return results
