"""pytest plugin for .ci/mutation: run a mutant's tests fastest first.

mutmut hands pytest the tests that reach a mutant in no particular order and stops at the first failure (-x);
ordering them by the durations mutmut recorded (``mutmut-stats.json``, in the directory pytest runs in) lets a
quick test kill a mutant before the slow statistical tests run. Killed or survived, the verdict is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    stats = Path("mutmut-stats.json")
    if stats.exists():
        durations: dict[str, float] = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
