"""TFDS builders of QDFormer-JAX; importing this package registers them with TFDS."""
from tfds_builders import avs_object, avs_semantic, synthetic_avs  # noqa: F401
