"""Evaluation kinds, one module each: ``config.evals.<name>.kind`` names the module (see ``evals.py``
for the interface a module provides)."""
