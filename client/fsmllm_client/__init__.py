"""Python client for the fsmllm server."""
