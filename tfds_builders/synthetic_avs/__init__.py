"""`synthetic_avs`: the embedded procedural audio-visual segmentation dataset (docs/DESIGN.md §4.3)."""
from tfds_builders.synthetic_avs.synthetic_avs_dataset_builder import (
    BUILDER_CONFIGS,
    NEGATIVE_SPLITS,
    SPLITS,
    SyntheticAvs,
    SyntheticAvsConfig,
    build,
    make_config,
    make_example,
    negative_kind,
)

__all__ = ['BUILDER_CONFIGS', 'NEGATIVE_SPLITS', 'SPLITS', 'SyntheticAvs', 'SyntheticAvsConfig', 'build', 'make_config',
           'make_example', 'negative_kind']
