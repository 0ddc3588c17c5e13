"""Converters: calibration, the Quamba/Quamba2 recipes, the simulated-quantization forward and
the checkpoint writer. Imports kernels, transformers, compressed-tensors, safetensors; never vLLM."""
