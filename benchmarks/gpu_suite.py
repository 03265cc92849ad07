"""Everything GPU-bound in one command: prints one table, writes one JSON (docs/benchmarks.md, "First GPU run").

    python3 benchmarks/gpu_suite.py --out gpu_suite.json           # on the GPU host, ≤ 8 minutes
    python3 benchmarks/gpu_suite.py --smoke --out smoke.json        # the same code at tiny sizes on a CPU (CI)

The encoders are built from their transformers configs with **random weights** (no weights travel to the GPU host,
and throughput does not depend on weight values): DINOv2-S/14 at 224 px ([CLS] + 4 x 4 pooled patches) and CLIP
ViT-L/14 at 336 px as LLaVA-1.5 reads it (second-to-last layer, CLS dropped: 576 x 1024). Certificates of
random-weight encoders are not meaningful; their costs are.

Sections (each guarded: a failing one is reported and the others still run; a global ``--budget-s`` skips what
no longer fits, least important last):

* ``raw``: encoder samples/s against batch size (doubling until < 10 % more, or out of memory) in the serving
  dtype; the saturating batch is the smallest within 10 % of the best; then every dtype at that batch.
* ``dtype``: what ``--dtype auto`` chooses on this device for each tower at its saturating batch (one batch timed
  per candidate precision: float32, bfloat16, and float16 on CUDA; a reduced one only if ≥ 1.5x faster), with the
  timings; timed afresh (a temporary cache).
* ``latency``: one certificate of the ViT-L/14-336 tower through the device worker at n0 = 100, n = 1000, per
  dtype; with ``stop-at-fcsb 0.8`` at radius 0.1 (budget n = 1000); and at n = 256 (the median a stopped
  certificate used on real DINOv2-S weights, docs/benchmarks.md "Early stopping").
* ``worker``: one job through the worker vs the raw encoder on the same samples (goal ≥ 0.9).
* ``ceiling``: the worker's own ceiling: samples/s of one job through it with a zero-cost encoder (a view of the
  noisy input) at each tower's image size and saturating batch: what noise, sums and bookkeeping allow.
* ``concurrent``: 8 and 32 certifications of DINOv2-S submitted at once to the worker vs the same runs packed
  into one batched run vs a per-request batched loop (goal ≥ 3x the loop).
* ``memory``: device memory of one certification against n (must be flat).
* ``transfer``: host-to-device and device-to-host bytes per sample of one certification (the noise is drawn on the
  device: a few hundred bytes a sample, against one image's bytes had it been copied).
* ``packing``: how far batch packing moves a certificate in each dtype (float32: rounding only).
* ``compile``: torch.compile in the serving dtype: compile seconds, samples/s against eager, the ViT-L latency.

Imports only torch, transformers, numpy, scipy, Pillow, tqdm and fsmllm's engine, certify and encoders (no
fastapi, uvicorn or pydantic: tests/benchmarks/test_gpu_suite.py runs it with those blocked).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "server")]  # runs from a bare checkout, nothing installed

import torch  # noqa: E402
import transformers  # noqa: E402

import fsmllm  # noqa: E402
from common import machine, timed  # noqa: E402
from concurrent_requests import batched_vs_loop  # noqa: E402
from encoder_precision import cosine, in_precision, noisy_batch, packing_drift, side_by_side, throughput  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model  # noqa: E402
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from worker_throughput import certify_through, worker_vs_raw, zero_cost  # noqa: E402

from fsmllm.certify import SmoothingConfig, StopRule  # noqa: E402
from fsmllm.encoders import VisionEncoder  # noqa: E402
from fsmllm.encoders.dinov2_imgfocus import Dinov2Encoder, dinov2_config  # noqa: E402
from fsmllm.encoders.hf_vision import HFVisionEncoder  # noqa: E402
from fsmllm.encoders.precision import PRECISIONS, compiled, timing_trial  # noqa: E402
from fsmllm.engine.worker import DeviceWorker  # noqa: E402
from fsmllm.fastest_dtype import MARGIN, choose, fastest, measure_trials  # noqa: E402
from fsmllm.images import load_image, to_pixels  # noqa: E402

GOALS = {
    "latency_n1000_s": 1.0,  # ViT-L/14-336, n = 1000, H100-class
    "latency_stopped_s": 0.3,  # the same with early stopping
    "worker_over_raw": 0.9,
    "concurrent_over_loop": 3.0,
}


@dataclass(frozen=True)
class Sizes:
    """Everything the full run and the smoke run do differently."""

    dinov2: Dinov2Config
    dinov2_image: int
    dinov2_grid: int
    clip: CLIPVisionConfig
    batch_start: int
    batch_max: int
    seconds: float  # each throughput figure is timed over at least this
    n0: int
    n: int
    stopped_n: int  # the proxy for an early-stopped certificate
    requests: tuple[int, ...]
    memory_n: tuple[int, ...]
    packing_batch: int  # compared with the saturating batch
    budget_s: float
    need_scale: float  # how a section's estimated seconds scale (smoke: almost nothing)
    compile_backend: str


FULL = Sizes(
    dinov2=dinov2_config(), dinov2_image=224, dinov2_grid=4,
    clip=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768),
    batch_start=32, batch_max=2048, seconds=1.5, n0=100, n=1000, stopped_n=256, requests=(8, 32),
    memory_n=(1000, 10_000, 50_000), packing_batch=7, budget_s=420.0, need_scale=1.0, compile_backend="inductor",
)
SMOKE = Sizes(
    dinov2=Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, mlp_ratio=1, patch_size=14,
                        image_size=28),  # Dinov2Encoder's token width is ViT-S's 384
    dinov2_image=28, dinov2_grid=2,
    clip=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=28, patch_size=14, projection_dim=16),
    batch_start=2, batch_max=8, seconds=0.02, n0=4, n=12, stopped_n=8, requests=(8, 32), memory_n=(32, 128),
    packing_batch=3, budget_s=120.0, need_scale=0.02, compile_backend="eager",
)


def build_encoders(sizes: Sizes, device: str) -> dict[str, VisionEncoder]:
    """The two towers with random weights (seeded), float32, on ``device``."""
    torch.manual_seed(0)
    dinov2 = Dinov2Encoder(sizes.dinov2_image, pooled_grid=sizes.dinov2_grid, model=Dinov2Model(sizes.dinov2))
    clip = HFVisionEncoder(
        CLIPVisionModel(sizes.clip), image_size=sizes.clip.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        native_image_size=sizes.clip.image_size, feature_layer=-2, drop_cls=True,
        name=f"clip-vit-{sizes.clip.num_hidden_layers}l-{sizes.clip.image_size}",
    )
    return {"dinov2": dinov2.to(device).eval(), "clip": clip.to(device).eval()}


class Suite:
    """The sections, their shared state (encoders, saturating batches) and the budget; results go to ``self.out``."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args, self.sizes, self.device = args, sizes, args.device
        self.dtype = args.dtype
        self.deadline = time.monotonic() + (args.budget_s or sizes.budget_s)
        self.started = time.monotonic()
        self.results: dict[str, object] = {"meta": self.meta(), "sections": {}}
        self.encoders = build_encoders(sizes, self.device)
        self.serving = {name: in_precision(encoder, self.dtype) for name, encoder in self.encoders.items()}
        self.pixels = {name: to_pixels(load_image("sample:chelsea"), e.image_size) for name, e in self.encoders.items()}
        self.batch = {name: 4 * sizes.batch_start for name in self.encoders}  # until `raw` finds the saturating one

    def meta(self) -> dict[str, object]:
        cuda = self.device.startswith("cuda")
        return {
            "device": machine(self.device),
            "memory_gib": torch.cuda.get_device_properties(self.device).total_memory / 2**30 if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "serving_dtype": self.args.dtype, "smoke": self.args.smoke,
            "weights": "random (built from transformers configs), timings only", "fsmllm": fsmllm.__file__,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, needs_s: float) -> bool:
        """Whether ``needs_s`` seconds (a full-size estimate, scaled down for the smoke run) are left."""
        return self.left() >= needs_s * self.sizes.need_scale

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = time.monotonic() - self.started  # type: ignore[index]
        path = Path(self.args.out)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.results, indent=2, default=str))
        temporary.replace(path)

    def run(self, name: str, section: Callable[[], dict[str, object]], needs_s: float) -> None:
        """Run one section unless fewer than ``needs_s`` seconds are left; record what it returned or how it failed."""
        sections: dict[str, object] = self.results["sections"]  # type: ignore[assignment]
        if not self.fits(needs_s):
            sections[name] = {"status": "skipped", "reason": f"{self.left():.0f} s left of the budget, needs {needs_s:.0f}"}
        else:
            start = time.monotonic()
            try:
                sections[name] = {"status": "ok", **section()}
            except Exception as error:  # noqa: BLE001 - reported, and the next section still runs
                sections[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc(limit=6)}
            sections[name]["seconds"] = time.monotonic() - start  # type: ignore[index]
            self.release()
        print(f"[{time.monotonic() - self.started:6.1f} s] {name}: {sections[name]['status']}", file=sys.stderr, flush=True)
        self.save()

    def release(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- the sections ---------------------------------------------------------------------------------
    def raw(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, encoder in self.serving.items():
            curve: dict[int, float] = {}
            batch = self.sizes.batch_start
            while batch <= self.sizes.batch_max and self.fits(60):
                try:
                    curve[batch] = throughput(encoder, noisy_batch(self.pixels[name], batch, self.device), self.sizes.seconds)
                except torch.OutOfMemoryError:
                    self.release()
                    break
                if len(curve) > 1 and curve[batch] < 1.1 * curve[batch // 2]:
                    break
                batch *= 2
            best = max(curve.values())
            self.batch[name] = min(b for b, speed in curve.items() if speed >= 0.9 * best)
            per_dtype = {}
            for precision in PRECISIONS:
                model = self.serving[name] if precision == self.dtype else in_precision(self.encoders[name], precision)
                try:
                    per_dtype[precision] = throughput(model, noisy_batch(self.pixels[name], self.batch[name], self.device),
                                                      self.sizes.seconds)
                except torch.OutOfMemoryError as error:
                    per_dtype[precision] = f"out of memory: {str(error).splitlines()[0]}"
                del model
                self.release()
            out[name] = {"image_size": encoder.image_size, "feature_dim": encoder.feature_dim,
                         "samples_per_s_by_batch": curve, "saturating_batch": self.batch[name],
                         "samples_per_s_by_dtype": per_dtype}
        return out

    def certificate_seconds(self, encode: Callable[[torch.Tensor], torch.Tensor], name: str, n: int,
                            stop: StopRule | None = None) -> dict[str, object]:
        """One certification of sample:chelsea through a fresh device worker: seconds, samples used, why it stopped."""
        worker = DeviceWorker(encode, device=self.device, batch_size=self.batch[name], capacity=4)
        worker.start()
        config = SmoothingConfig(sigma=0.25, n0=self.sizes.n0, n=n)
        try:
            certify_through(worker, self.pixels[name], SmoothingConfig(sigma=0.25, n0=2, n=2), [1])  # warm-up
            result: list = []
            seconds = timed(lambda: result.extend(certify_through(worker, self.pixels[name], config, [0], [0.1], stop)),
                            self.device)
        finally:
            worker.stop()
        return {"seconds": seconds, "n_used": result[0].n, "stopped_by": result[0].stopped_by,
                "batch": self.batch[name]}

    def dtype_choice(self) -> dict[str, object]:
        out: dict[str, object] = {"margin": MARGIN}
        with tempfile.TemporaryDirectory() as folder:
            for name, encoder in self.encoders.items():
                trial = timing_trial(encoder, self.batch[name])
                choice = fastest(f"{name} batch {self.batch[name]}", self.device, measure_trials(trial, self.device),
                                 Path(folder) / "fastest-dtype.json")
                assert choice.precision == choose(choice.seconds) and not choice.cached
                out[name] = {"chosen": choice.precision, "batch": self.batch[name], "seconds_by_dtype": choice.seconds,
                             "speedup_over_float32": {p: choice.seconds["float32"] / s for p, s in choice.seconds.items()}}
                self.release()
        return out

    def latency(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for precision in dict.fromkeys([self.dtype, *PRECISIONS]):  # the serving dtype first
            if not self.fits(45):
                out[precision] = "skipped: budget"
                continue
            model = self.serving["clip"] if precision == self.dtype else in_precision(self.encoders["clip"], precision)
            try:
                row = {"n1000": self.certificate_seconds(model, "clip", self.sizes.n)}
                if precision == self.dtype:
                    stop = StopRule(fcsb=0.8, radii=(0.1,))
                    row["stop_at_fcsb_0.8"] = self.certificate_seconds(model, "clip", self.sizes.n, stop)
                    row["n256"] = self.certificate_seconds(model, "clip", self.sizes.stopped_n)
                out[precision] = row
            except torch.OutOfMemoryError as error:  # float32 at the 16-bit saturating batch may not fit
                out[precision] = f"out of memory: {str(error).splitlines()[0]}"
            del model
            self.release()
        return out

    def worker(self) -> dict[str, object]:
        return {name: worker_vs_raw(encoder, self.pixels[name], self.device, self.batch[name], 4 * self.batch[name], 2)
                for name, encoder in self.serving.items()}

    def ceiling(self) -> dict[str, object]:
        return {name: worker_vs_raw(zero_cost(), self.pixels[name], self.device, self.batch[name], 8 * self.batch[name],
                                    3) for name in self.encoders}

    def concurrent(self) -> dict[str, object]:
        out: dict[str, object] = {}
        encoder, pixels, batch = self.serving["dinov2"], self.pixels["dinov2"], self.batch["dinov2"]
        config = SmoothingConfig(sigma=0.25, n0=self.sizes.n0, n=self.sizes.n)
        worker = DeviceWorker(encoder, device=self.device, batch_size=batch, capacity=max(self.sizes.requests))
        worker.start()
        try:
            certify_through(worker, pixels, config, [0])  # warm-up
            for requests in self.sizes.requests:
                worker_s = timed(lambda: certify_through(worker, pixels, config, range(requests)), self.device)
                one_batch_s, loop_s = batched_vs_loop(encoder, pixels, config, requests, batch, self.device)
                samples = requests * (self.sizes.n0 + self.sizes.n)
                out[str(requests)] = {"samples": samples, "batch": batch, "worker_s": worker_s, "one_batch_s": one_batch_s,
                                      "loop_s": loop_s, "worker_over_one_batch": one_batch_s / worker_s,
                                      "worker_over_loop": loop_s / worker_s}
        finally:
            worker.stop()
        return out

    def memory(self) -> dict[str, object]:
        cuda = self.device.startswith("cuda")
        encoder, pixels = self.serving["dinov2"], self.pixels["dinov2"]
        worker = DeviceWorker(encoder, device=self.device, batch_size=self.batch["dinov2"], capacity=2)
        worker.start()
        growth: dict[int, float] = {}
        try:
            certify_through(worker, pixels, SmoothingConfig(sigma=0.25, n0=self.sizes.n0, n=self.sizes.n0), [0])  # warm-up
            for n in self.sizes.memory_n:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                else:
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                certify_through(worker, pixels, SmoothingConfig(sigma=0.25, n0=self.sizes.n0, n=n), [1])
                peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                growth[n] = (peak - before) / 2**20
        finally:
            worker.stop()
        values = list(growth.values())
        return {"measure": "peak device memory allocated above the baseline" if cuda else "peak RSS growth (CPU)",
                "peak_growth_mib_by_n": growth, "largest_minus_smallest_mib": values[-1] - values[0]}

    def transfer(self) -> dict[str, object]:
        encoder, pixels = self.serving["dinov2"], self.pixels["dinov2"]
        image_bytes = pixels.numel() * pixels.element_size()
        config = SmoothingConfig(sigma=0.25, n0=self.sizes.n0, n=self.sizes.n)
        worker = DeviceWorker(encoder, device=self.device, batch_size=self.batch["dinov2"], capacity=2)
        worker.start()
        try:
            certify_through(worker, pixels, config, [0])  # warm-up outside the profile
            if not self.device.startswith("cuda"):
                return {"h2d_bytes_per_sample": 0.0, "d2h_bytes_per_sample": 0.0, "image_bytes": image_bytes,
                        "note": "CPU: host and device are the same memory"}
            copies = profile_copies(lambda: certify_through(worker, pixels, config, [1]))
        finally:
            worker.stop()
        samples = config.n0 + config.n
        return {"h2d_bytes_per_sample": copies["HtoD"] / samples, "d2h_bytes_per_sample": copies["DtoH"] / samples,
                "image_bytes": image_bytes, "copies": copies}

    def packing(self) -> dict[str, object]:
        out: dict[str, object] = {}
        features: dict[str, torch.Tensor] = {}
        sizes = [self.batch["dinov2"], self.sizes.packing_batch]
        for precision in PRECISIONS:
            if not self.fits(20):
                out[precision] = "skipped: budget"
                continue
            model = in_precision(self.encoders["dinov2"], precision)
            drift, features[precision] = packing_drift(model, self.pixels["dinov2"], self.device, sizes, self.sizes.n0,
                                                       self.sizes.n)
            out[precision] = {"batch_sizes": sizes, **drift,
                              "cos_to_float32_feature": cosine(features[precision], features.get("float32", features[precision]))}
            del model
            self.release()
        return out

    def compile(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in ("clip", "dinov2"):
            if not self.fits(90):
                out[name] = "skipped: budget"
                continue
            model = compiled(self.serving[name], backend=self.args.compile_backend or self.sizes.compile_backend)
            batch = noisy_batch(self.pixels[name], self.batch[name], self.device)
            speeds = side_by_side({"compiled": model, "eager": self.serving[name]}, batch, self.sizes.seconds)
            (speed, first), eager = speeds["compiled"], speeds["eager"][0]
            row: dict[str, object] = {"dtype": self.dtype, "backend": self.args.compile_backend or self.sizes.compile_backend,
                                      "compile_s": first,
                                      "samples_per_s": speed, "eager_samples_per_s": eager, "speedup": speed / eager}
            if name == "clip" and self.fits(30):
                row["latency_n1000"] = self.certificate_seconds(model, name, self.sizes.n)
            out[name] = row
            del model
            self.release()
        return out


def profile_copies(fn: Callable[[], object]) -> dict[str, float]:
    """Bytes copied host-to-device and device-to-host while ``fn`` runs, from the CUDA profiler's memcpy events
    (``kernels``: the GPU kernels it saw, so that zero copies cannot mean an empty profile)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    copies = {"HtoD": 0.0, "DtoH": 0.0, "HtoD_count": 0.0, "DtoH_count": 0.0, "kernels": 0.0}
    for event in events:
        copies["kernels"] += event.get("cat") == "kernel"
        if event.get("cat") != "gpu_memcpy":
            continue
        for kind in ("HtoD", "DtoH"):
            if kind in event.get("name", ""):
                copies[kind] += float(event.get("args", {}).get("bytes", 0))
                copies[f"{kind}_count"] += 1
    return copies


def table(results: dict[str, object]) -> str:
    """The one table: a line per figure, with the goal where there is one."""
    sections: dict[str, dict] = results["sections"]  # type: ignore[assignment]
    lines = [f"device: {results['meta']['device']}; serving dtype {results['meta']['serving_dtype']}; "  # type: ignore[index]
             f"random weights; {results['meta'].get('elapsed_s', 0):.0f} s", ""]  # type: ignore[union-attr]
    lines.append(f"{'section':<11} {'measure':<58} {'value':>12}  goal")

    def line(section: str, measure: str, value: object, goal: str = "") -> None:
        if isinstance(value, float):
            text = f"{value:12.2e}" if 0 < abs(value) < 0.01 else f"{value:12.3f}"
        else:
            text = f"{value!s:>12}"
        lines.append(f"{section:<11} {measure:<58} {text}  {goal}")

    for name, section in sections.items():
        if section.get("status") != "ok":
            line(name, (section.get("error") or section.get("reason", "")).splitlines()[0][:58], section["status"].upper())
            continue
        if name == "raw":
            for encoder, row in section.items():
                if isinstance(row, dict):
                    line(name, f"{encoder}: saturating batch", row["saturating_batch"])
                    for precision, speed in row["samples_per_s_by_dtype"].items():
                        line(name, f"{encoder}: {precision} samples/s", speed)
        elif name == "dtype":
            for encoder, row in section.items():
                if isinstance(row, dict):
                    speedups = ", ".join(f"{p} {x:.2f}x" for p, x in row["speedup_over_float32"].items() if p != "float32")
                    line(name, f"{encoder}: auto chooses ({speedups})", row["chosen"], f"≥ {MARGIN}x for 16-bit")
        elif name == "ceiling":
            for encoder, row in section.items():
                if isinstance(row, dict):
                    line(name, f"{encoder}: worker samples/s, zero-cost encoder", row["worker_samples_per_s"],
                         "≫ the raw encoder's")
        elif name == "latency":
            for precision, row in section.items():
                if isinstance(row, dict):
                    for key, value in row.items():
                        goal = {"n1000": "≤ 1.0 s", "stop_at_fcsb_0.8": "≤ 0.3 s", "n256": "≤ 0.3 s"}[key]
                        line(name, f"clip {precision} {key} (n used {value['n_used']}, {value['stopped_by']}) s",
                             value["seconds"], goal)
        elif name == "worker":
            for encoder, row in section.items():
                if isinstance(row, dict):
                    line(name, f"{encoder}: worker / raw samples/s", row["ratio"], "≥ 0.9")
        elif name == "concurrent":
            for requests, row in section.items():
                if isinstance(row, dict):
                    line(name, f"{requests} requests: worker vs one batched run", row["worker_over_one_batch"], "≥ 0.9")
                    line(name, f"{requests} requests: worker vs per-request loop (x)", row["worker_over_loop"], "≥ 3")
        elif name == "memory":
            for n, mib in section["peak_growth_mib_by_n"].items():
                line(name, f"n = {n}: peak growth MiB", mib)
            line(name, "largest n minus smallest n, MiB", section["largest_minus_smallest_mib"], "≈ 0 (flat)")
        elif name == "transfer":
            line(name, "host-to-device bytes per sample", section["h2d_bytes_per_sample"],
                 f"≪ {section['image_bytes']} (one image)")
            line(name, "device-to-host bytes per sample", section["d2h_bytes_per_sample"])
            if "copies" in section:
                line(name, "GPU kernels in the profile (0: the profile is empty)", section["copies"]["kernels"])
        elif name == "packing":
            for precision, row in section.items():
                if isinstance(row, dict):
                    line(name, f"{precision}: |Δ score bound| across batch sizes", row["max_abs_diff_score_lower"],
                         "≤ 1e-6" if precision == "float32" else "≤ 1e-4 (docs/method.md)")
                    if precision != "float32":
                        line(name, f"{precision}: 1 - cos(F̂, float32 F̂)", 1 - row["cos_to_float32_feature"])
        elif name == "compile":
            for encoder, row in section.items():
                if isinstance(row, dict):
                    line(name, f"{encoder}: compiled / eager samples/s ({row['compile_s']:.0f} s to compile)", row["speedup"])
                    if "latency_n1000" in row:
                        line(name, "clip compiled n1000 certificate s", row["latency_n1000"]["seconds"], "≤ 1.0 s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU-friendly (CI runs this)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None,
                        help="serving dtype of the worker sections (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 420, smoke 120)")
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor, smoke eager)")
    parser.add_argument("--sections", nargs="+", default=None, help="run only these sections")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        suite = Suite(args, SMOKE if args.smoke else FULL)
    except Exception:  # nothing can be measured: say why, in the JSON too
        Path(args.out).write_text(json.dumps({"setup_error": traceback.format_exc()}, indent=2))
        raise
    plan = [("raw", suite.raw, 60), ("dtype", suite.dtype_choice, 15), ("latency", suite.latency, 45),
            ("worker", suite.worker, 20), ("ceiling", suite.ceiling, 15), ("concurrent", suite.concurrent, 40), ("memory", suite.memory, 20), ("transfer", suite.transfer, 15),
            ("packing", suite.packing, 20), ("compile", suite.compile, 90)]
    for name, section, needs_s in plan:
        if args.sections is None or name in args.sections:
            suite.run(name, section, needs_s)
    suite.save()
    print(table(suite.results))
    failed = [name for name, s in suite.results["sections"].items() if s["status"] == "failed"]  # type: ignore[union-attr]
    print(f"\nwrote {args.out}; failed sections: {', '.join(failed) or 'none'}")


if __name__ == "__main__":
    main()
