"""fsmllm: certified multimodal inference with Feature-space Smoothing."""
