"""``benchmarks/certificate_cost.py`` runs (tiny sizes): both issuers answer, the issuer's own time is measured, and
the recorded samples come as float32, 4 bytes a value."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cost_benchmark_runs_and_reports_its_ratios() -> None:
    command = [sys.executable, "certificate_cost.py", "--encoder", "tiny-cnn", "--image-size", "16", "--pairs", "1",
               "--size-n", "300"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"ratio\s+\d+\.\d{4}", out) and re.search(r"issuer's own time\s+\d+\.\d+ ms", out), out
    assert "with record_samples" in out and "(float32-le-base64, shape [300, 1])" in out
    sizes = {name: int(value.replace(",", "")) for name, value in re.findall(r"(without|with|added)\w* *(?:record_samples)? +([\d,]+) bytes", out)}
    assert sizes["added"] == sizes["with"] - sizes["without"] >= 4 * 300 * 4 // 3  # 300 float32 in base64
