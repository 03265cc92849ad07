"""fsmllm: certified multimodal inference with Feature-space Smoothing."""

__version__ = "0.1.0"
