"""Models: backbones, deformable transformer, audio encoders and the QDFormer head."""


def build_model(config, rngs_or_seed, num_classes=None):
  """The model a config describes (see qdformer_jax.models.qdformer.build_model)."""
  from qdformer_jax.models.qdformer import build_model as _build_model
  return _build_model(config, rngs_or_seed, num_classes)
