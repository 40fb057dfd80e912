"""Notebook 01's widget: the motion-threshold slider that re-classifies shots and shows the
keyframes at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import polars as pl

from diffusion_bunny.media.figures import chart_png, jpeg_bytes
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.pipeline.settings import dotted_overrides, overridden_note, save_from_widget
from diffusion_bunny.stages.extract.keyframes import classify_shots, select_keyframes


class MotionThresholdExplorer:
    """Slider over the per-shot motion score: re-classifies shots and shows which keyframes each
    would give, from the stored candidates and thumbnails, without decoding the movie again."""

    def __init__(
        self,
        run: Run,
        threshold: float,
        *,
        max_shots: int = 30,
        config_root: Path | None = None,
        config_path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        self.run = run
        self.shots = run.read_table("shots")
        self.candidates = run.read_table("keyframe_candidates")
        self.max_shots = max_shots
        self.config_root = config_root
        #: The notebook's own layers over the saved file: a threshold they set wins over "use this
        #: threshold", which then says so (as notebook 02's widget does).
        # with the last bunny run's settings; the overrides in any form a notebook takes them
        self.layers = run.layers(config_path, dotted_overrides(overrides))[:2]
        facts = (run.read_manifest("extract") or {}).get("facts") or {}
        #: The film's size: the sheet draws each frame's picture box (bars) as the notebook's does.
        self.frame_size = (
            (facts["width"], facts["height"]) if facts.get("width") and facts.get("height") else None
        )
        # the configured threshold always inside the range (ipywidgets clamps a value above it,
        # and "use this threshold" then saved the clamped one)
        top = max(5.0, float(self.shots["motion"].max() or 0.0) * 1.1, float(threshold))
        self.slider = widgets.FloatSlider(
            value=threshold,
            min=0.0,
            max=math.ceil(top * 10) / 10,
            step=0.05,
            description="motion",
            continuous_update=False,
        )
        self.counts = widgets.HTML()
        # Image widgets updated in place rather than Output widgets: the picture travels as one
        # binary buffer, and headless executors (nbclient) were seen to hang until their timeout
        # on a cell that displays images inside an Output widget.
        self.plot_img = widgets.Image(format="png", layout=widgets.Layout(max_width="720px"))
        self.sheet_img = widgets.Image(format="jpeg", layout=widgets.Layout(max_width="900px"))
        self.save_button = widgets.Button(
            description="use this threshold", icon="save", layout=widgets.Layout(width="auto")
        )
        self.saved = widgets.HTML()
        self.slider.observe(lambda change: self._update(), names="value")
        self.save_button.on_click(lambda _: self.save())
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.slider, self.save_button]),
                self.counts,
                self.saved,
                self.plot_img,
                self.sheet_img,
            ]
        )
        self._update()

    @property
    def threshold(self) -> float:
        return float(self.slider.value)

    def set_threshold(self, value: float) -> None:
        """Move the slider from Python (same path as a person dragging it)."""
        self.slider.value = value

    def classified(self) -> pl.DataFrame:
        """Shots with ``kind`` under the current threshold."""
        return classify_shots(self.shots, self.threshold)

    def picks(self) -> pl.DataFrame:
        """Keyframe candidates that the current threshold would keep."""
        return select_keyframes(self.candidates, self.shots, self.threshold)

    @property
    def summary(self) -> dict[str, int]:
        shots = self.classified()
        return {
            "static": int((shots["kind"] == "static").sum()),
            "dynamic": int((shots["kind"] == "dynamic").sum()),
            "keyframes": self.picks().height,
        }

    def _update(self) -> None:
        from diffusion_bunny.stages.extract.plots import (  # lazy: pulls in plotnine (0.44 s)
            contact_sheet,
            motion_plot,
        )

        s = self.summary
        self.counts.value = (
            f"<b>{s['static']}</b> static shots, <b>{s['dynamic']}</b> dynamic shots, "
            f"<b>{s['keyframes']}</b> keyframes"
        )
        self.plot_img.value = chart_png(motion_plot(self.shots, self.threshold))
        sheet = contact_sheet(
            self.run.run_dir,
            self.picks(),
            self.classified(),
            max_shots=self.max_shots,
            frame_size=self.frame_size,
        )
        self.sheet_img.value = jpeg_bytes(sheet)

    def save(self) -> Path | None:
        """Write the threshold to ``config/local_extract.yaml``; the next run re-extracts with it."""
        settings = {"extract": {"motion_threshold": self.threshold}}
        path, self.saved.value = save_from_widget("extract", settings, self.config_root, "01")
        if path is not None:
            self.saved.value += overridden_note("extract", settings["extract"], *self.layers)
        return path
