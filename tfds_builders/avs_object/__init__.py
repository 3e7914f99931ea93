"""The `avs_object` TFDS builder: AVSBench S4 and MS3 (see README.md)."""
from tfds_builders.avs_object.avs_object_dataset_builder import AvsObject

__all__ = ['AvsObject']
