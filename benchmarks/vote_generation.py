"""The cost of a certified answer's votes in the language model: batched greedy decoding against one generation
at a time, and the shared-prefix cache, measured side by side on fsmllm-demo (SmolLM2-135M).

    python benchmarks/vote_generation.py --rows 32 --max-tokens 12      # docs/benchmarks.md

The rows are the demo prompt with random unit visual tokens (17 x 384), as votes are. "no prefix cache" feeds the
same rows with their first position made distinct, so that nothing is shared; its answers are not compared.
Also counts the rows whose batched answer differs from the one generated alone (docs/method.md, "Votes as i.i.d.
draws": a vote's answer should not depend on what it is batched with).
"""

import argparse
import time

import torch
from common import machine

from fsmllm.lm.base import SamplingParams
from fsmllm.lm.models import load_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rows", type=int, default=32)
parser.add_argument("--max-tokens", type=int, default=12)
args = parser.parse_args()

model = load_model("fsmllm-demo")
generator = torch.Generator().manual_seed(0)
features = torch.randn(args.rows, model.num_tokens * model.token_dim, generator=generator)
tokens = torch.nn.functional.normalize(features, dim=1).reshape(args.rows, model.num_tokens, model.token_dim)
params = SamplingParams(max_tokens=args.max_tokens)
embeds = torch.stack([model.prompt_embeds(row, "What is this?") for row in tokens])
distinct = embeds.clone()
distinct[:, 0] += 1e-3 * torch.randn(distinct[:, 0].shape, generator=generator)


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


answers: dict[str, list[str]] = {}
batched = seconds(lambda: answers.setdefault("batched", [g.text for g in model.backend.generate_batch(embeds, params)]))
uncached = seconds(lambda: model.backend.generate_batch(distinct, params))
single = seconds(lambda: answers.setdefault("single", [model.backend.generate(row, params).text for row in embeds]))
differ = sum(a != b for a, b in zip(answers["batched"], answers["single"]))
print(f"{machine('cpu')}: {args.rows} votes, max {args.max_tokens} tokens")
print(f"one at a time   {single:7.2f} s  ({single / args.rows:.3f} s/vote)")
print(f"batched, no prefix cache {uncached:7.2f} s  ({single / uncached:.2f}x)")
print(f"batched + prefix cache   {batched:7.2f} s  ({single / batched:.2f}x; prefix cache {uncached / batched:.2f}x)")
print(f"answers that differ, batched against alone: {differ} of {args.rows}")
