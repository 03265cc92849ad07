"""The evaluation's output folder: results.json, report.md and curves.png, rewritten after every addition."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fsmllm.evaluate.compute import AttackRow, CurvePoint
from fsmllm.evaluate.plot import plot_curves
from fsmllm.evaluate.report import report_markdown, summarise


def as_dicts(items: Sequence[Any]) -> list[dict[str, object]]:
    return [asdict(item) for item in items]


class ResultsFolder:
    """The results of an evaluation so far, rewritten to ``directory`` (results.json, report.md, curves.png)
    after each addition, so that a run that stops early leaves what it finished, and ``resume`` can go on from
    it (only with the same ``settings``)."""

    def __init__(self, directory: Path, settings: dict[str, object], resume: bool) -> None:
        self.directory = directory
        self.settings = settings
        self.points: list[CurvePoint] = []
        self.rows: list[AttackRow] = []
        saved = directory / "results.json"
        if resume and saved.exists():
            previous = json.loads(saved.read_text())
            differing = sorted(key for key, value in settings.items() if previous.get(key) != value)
            if differing:
                raise ValueError(
                    f"{saved} holds a run with other settings ({', '.join(differing)} differ): resume it with the "
                    "same settings, or write to another --out"
                )
            self.points = [CurvePoint(**point) for point in previous["curves"]]
            self.rows = [AttackRow(**row) for row in previous["attack_rows"]]
        directory.mkdir(parents=True, exist_ok=True)

    def has_curve(self, setting: str, sigma: float, n: int) -> bool:
        return any((p.setting, p.sigma, p.n) == (setting, sigma, n) for p in self.points)

    def has_attacked(self, sigma: float, image: int) -> bool:
        """Whether ``image`` was attacked at ``sigma``: then its plain-FS rows (every attack has them) are here."""
        return any((row.sigma, row.image) == (sigma, image) for row in self.rows)

    def add_curve(self, points: list[CurvePoint]) -> None:
        self.points += points
        self._write(complete=False)

    def add_attacked(self, rows: list[AttackRow]) -> None:
        self.rows += rows
        self._write(complete=False)

    def finish(self) -> dict[str, object]:
        return self._write(complete=True)

    def _write(self, complete: bool) -> dict[str, object]:
        summaries = summarise(self.rows)
        results = {
            **self.settings,
            "complete": complete,
            "attack_images": len({row.image for row in self.rows}),
            "curves": as_dicts(self.points),
            "attacks": as_dicts(summaries),
            "attack_rows": as_dicts(self.rows),
        }
        (self.directory / "results.json").write_text(json.dumps(results, indent=1))
        s = self.settings
        title = f"{s['encoder']} @ {s['image_size']}px, α={s['alpha']}, n0={s['n0']}, {s['images']} held-out images"
        if self.points:
            plot_curves(self.points, str(self.directory / "curves.png"), title)
        attack = s["attack"]
        assert isinstance(attack, dict)
        (self.directory / "report.md").write_text(report_markdown(title, attack, self.points, summaries, complete))
        return results
