"""Pool the attack rows of several ``fsmllm evaluate`` runs (on disjoint held-out images: other seeds) into one
attack table, with the success counts and their exact 95 % intervals.

    python benchmarks/pool_attacks.py docs/eval/attacks/results.json docs/eval/attacks-seed1/results.json
"""

from __future__ import annotations

import argparse
import json

from fsmllm.evaluate import AttackRow, markdown_attacks, summarise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files written by fsmllm evaluate")
    args = parser.parse_args()
    rows = []
    for path in args.results:
        with open(path) as file:
            saved = json.load(file)
        rows += [AttackRow(**row) for row in saved["attack_rows"]]
    print(markdown_attacks(summarise(rows)))


if __name__ == "__main__":
    main()
