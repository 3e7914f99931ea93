"""QDFormer in JAX/Flax NNX: quantization-based semantic decomposition for audio-visual segmentation."""
