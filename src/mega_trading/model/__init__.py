"""The decoder: the Llama-style Transformer, its fused decode step and C kernels, checkpoints, HF export."""
