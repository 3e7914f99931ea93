"""The `avs_semantic` TFDS builder: AVSBench AVS-Semantic (see README.md)."""
from tfds_builders.avs_semantic.avs_semantic_dataset_builder import AvsSemantic

__all__ = ['AvsSemantic']
