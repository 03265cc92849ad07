"""The first-GPU benchmark rehearsed on the CPU: ``benchmarks/gpu_suite.py --smoke`` runs every section at tiny
sizes, as the GPU host would run it, with what the GPU host lacks (fastapi, uvicorn, pydantic, vLLM) made
unimportable, and writes a JSON with every section's numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: packages the GPU host does not have (docs/benchmarks.md, "First GPU run"); importing one fails in the child
ABSENT = ("fastapi", "uvicorn", "starlette", "pydantic", "pydantic_settings", "vllm")
SECTIONS = ("raw", "dtype", "latency", "worker", "ceiling", "concurrent", "memory", "transfer", "packing", "compile")

LAUNCH = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as on the GPU host
sys.argv = ["gpu_suite.py", "--smoke", "--out", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and not isinstance(value, bool)


def raw_batch(sections: dict, encoder: str) -> int:
    return sections["raw"][encoder]["saturating_batch"]


def test_the_smoke_run_measures_every_section_without_the_server_packages(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    code = LAUNCH.format(absent=ABSENT, out=str(out), script=str(ROOT / "benchmarks" / "gpu_suite.py"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    failed = {name: s.get("error") or s.get("reason") for name, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed
    assert report["meta"]["smoke"] is True and "random" in report["meta"]["weights"]
    assert Path(report["meta"]["fsmllm"]).is_relative_to(ROOT)  # this checkout's code, not an installed copy

    for encoder in ("dinov2", "clip"):
        raw = sections["raw"][encoder]
        assert raw["saturating_batch"] in {int(b) for b in raw["samples_per_s_by_batch"]}
        assert all(number(v) and v > 0 for v in raw["samples_per_s_by_dtype"].values())
        assert set(raw["samples_per_s_by_dtype"]) == {"float32", "bfloat16", "float16"}
        assert number(sections["worker"][encoder]["ratio"]) and sections["worker"][encoder]["ratio"] > 0
    for encoder in ("dinov2", "clip"):
        choice = sections["dtype"][encoder]
        assert set(choice["seconds_by_dtype"]) == {"float32", "bfloat16"}  # float16 is a candidate on CUDA only
        assert all(number(v) and v > 0 for v in choice["seconds_by_dtype"].values())
        assert choice["chosen"] in choice["seconds_by_dtype"] and choice["batch"] == raw_batch(sections, encoder)
        ceiling = sections["ceiling"][encoder]
        assert number(ceiling["worker_samples_per_s"]) and ceiling["worker_samples_per_s"] > 0
    latency = sections["latency"]
    assert {"float32", "bfloat16", "float16"} <= set(latency)
    serving = latency[report["meta"]["serving_dtype"]]
    assert set(serving) == {"n1000", "stop_at_fcsb_0.8", "n256"}
    assert all(number(row["seconds"]) and row["n_used"] >= 2 for row in serving.values())
    assert serving["n1000"]["stopped_by"] == "budget"
    for requests in ("8", "32"):
        row = sections["concurrent"][requests]
        assert all(number(row[key]) and row[key] > 0 for key in ("worker_s", "one_batch_s", "loop_s", "worker_over_loop"))
    memory = sections["memory"]
    assert len(memory["peak_growth_mib_by_n"]) == 2 and number(memory["largest_minus_smallest_mib"])
    assert sections["transfer"]["h2d_bytes_per_sample"] == 0 and sections["transfer"]["image_bytes"] > 0
    packing = sections["packing"]
    assert all(number(packing[d]["max_abs_diff_score_lower"]) for d in ("float32", "bfloat16", "float16"))
    assert packing["float32"]["max_abs_diff_score_lower"] <= 1e-6  # float32: the same samples, rounding only
    for encoder in ("clip", "dinov2"):
        assert number(sections["compile"][encoder]["speedup"])
    assert number(sections["compile"]["clip"]["latency_n1000"]["seconds"])
    for name in SECTIONS:  # the one table names every section
        assert f"\n{name:<11} " in result.stdout, name
