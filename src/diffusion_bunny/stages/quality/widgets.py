"""Notebook 02's widget: one control per quality threshold over the stored scores (exposure
relative to the film, blur, text and subtitles, duplicates)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import polars as pl
from pydantic import ValidationError

from diffusion_bunny.media.figures import chart_png, jpeg_bytes
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.pipeline.settings import dotted_overrides, overridden_note, save_from_widget
from diffusion_bunny.stages.quality.rules import (
    apply_quality_rules,
    exposure_thresholds,
    reason_counts,
    sharpness_threshold,
    with_text_columns,
)
from diffusion_bunny.stages.quality.settings import QualitySettings
from diffusion_bunny.stages.quality.text import unchecked_kept


def _sliders(cfg: QualitySettings, *, top_sharp: float) -> dict[str, Any]:
    """One control per threshold, named as its ``quality`` setting and set to ``cfg``'s value;
    the sharpness slider is logarithmic up to a little over the sharpest frame (``top_sharp``)."""
    style = {"description_width": "120px"}
    layout = widgets.Layout(width="480px")

    def slider(cls: type, name: str, **kw: Any) -> Any:
        return cls(description=name, continuous_update=False, style=style, layout=layout, **kw)

    def share(name: str, value: float) -> Any:
        return slider(widgets.FloatSlider, name, value=value, min=0, max=1, step=0.01)

    def level(name: str, value: float) -> Any:
        # Between the film's black floor and white ceiling: under the floor (or over the ceiling)
        # the settings refuse the value, so the slider would offer what cannot be saved.
        return slider(
            widgets.FloatSlider, name, value=value, min=cfg.black_floor, max=cfg.white_ceiling, step=1
        )

    return {
        "min_sharpness": slider(
            widgets.FloatLogSlider,
            "min sharpness",
            value=max(cfg.min_sharpness, 0.1),
            base=10,
            min=-1,
            # Up to the film's sharpest frame, and never under the setting: a slider clamps a value
            # outside its range, and "use these thresholds" would save the clamped one.
            max=round(math.log10(max(top_sharp, 10.0, cfg.min_sharpness)) + 0.3, 2),
            step=0.02,
        ),
        "min_brightness": level("min brightness", cfg.min_brightness),
        "max_brightness": level("max brightness", cfg.max_brightness),
        "max_clipped": share("max clipped", cfg.max_clipped),
        # 0: brightness alone decides (the setting's null).
        "exposure_detail": slider(
            widgets.FloatSlider,
            "exposure detail",
            value=cfg.exposure_detail or 0.0,
            min=0,
            max=max(500, cfg.exposure_detail or 0.0),
            step=5,
        ),
        "dup_distance": slider(
            widgets.IntSlider, "dup distance", value=cfg.dup_distance, min=0, max=max(32, cfg.dup_distance)
        ),
        "best_per_batch": slider(
            widgets.IntSlider,
            "best per batch",
            value=cfg.best_per_batch or 0,
            min=0,
            max=max(20, cfg.best_per_batch or 0),
        ),
        "relative_brightness": widgets.Checkbox(
            value=cfg.relative_brightness,
            description="brightness relative to the film",
            style=style,
            layout=layout,
        ),
        "text_filter": widgets.Checkbox(
            value=cfg.text_filter, description="text rules", style=style, layout=layout
        ),
        "max_text_share": share("max text share", cfg.max_text_share),
        "max_text_area": share("max text area", cfg.max_text_area),
        "subtitles": widgets.Dropdown(
            options=["crop", "drop", "keep"], value=cfg.subtitles, description="subtitles", style=style
        ),
    }


class QualityThresholdExplorer:
    """One slider per threshold of stage 02 over the stored ``quality`` scores: the counts, the
    histograms and the kept/rejected grid follow every move, and no frame is read again (the rules
    are a pure function of the table; only the thumbnails of the grid are opened)."""

    def __init__(
        self,
        run: Run,
        cfg: QualitySettings,
        *,
        max_per_group: int = 24,
        config_root: Path | None = None,
        config_path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        self.run = run
        self.base = cfg
        #: The notebook's own layers over the saved file (its ``config_path`` and ``overrides``,
        #: as ``bunny run --config/--set``): a threshold they set wins over "use these thresholds".
        # with the last bunny run's settings; the overrides in any form a notebook takes them
        self.layers = run.layers(config_path, dotted_overrides(overrides))[:2]
        self.scores = run.read_table("quality")
        self.frames = run.read_table("frames")
        self.max_per_group = max_per_group
        self.config_root = config_root
        self.sliders = _sliders(cfg, top_sharp=float(self.scores["sharpness"].max() or 1000.0))
        self.counts = widgets.HTML()
        # Image widgets, not Output widgets: headless executors (nbclient) hang on a cell that
        # shows images inside an Output widget (see MotionThresholdExplorer).
        self.plot_img = widgets.Image(format="png", layout=widgets.Layout(max_width="900px"))
        self.sheet_img = widgets.Image(format="jpeg", layout=widgets.Layout(max_width="1000px"))
        self.text_img = widgets.Image(format="jpeg", layout=widgets.Layout(max_width="1000px"))
        self.save_button = widgets.Button(
            description="use these thresholds",
            icon="save",
            layout=widgets.Layout(width="auto", min_width="190px", flex="0 0 auto"),
        )
        self.saved = widgets.HTML()
        self._hold = False
        for s in self.sliders.values():
            s.observe(lambda change: self._update(), names="value")
            # A moved slider makes the last "saved to" line untrue of what is shown.
            s.observe(lambda change: setattr(self.saved, "value", ""), names="value")
        self.save_button.on_click(lambda _: self.save())
        batch = "shot" if cfg.batch == "shot" else f"{cfg.batch} consecutive frames"
        self.widget = widgets.VBox(
            [
                *self.sliders.values(),
                widgets.HTML(
                    f"best per batch: 0 keeps all; a batch is a {batch} (<code>quality.batch</code>)"
                ),
                # The button keeps its width: a long saved line beside it squeezed its label.
                widgets.HBox([self.save_button, self.saved]),
                self.counts,
                self.plot_img,
                self.sheet_img,
                self.text_img,
            ]
        )
        self._update()

    @property
    def values(self) -> dict[str, Any]:
        """The slider values as ``quality`` settings (best per batch 0 means keep all: null)."""
        out = {name: s.value for name, s in self.sliders.items()}
        for name in ("max_text_share", "max_text_area", "max_clipped"):
            out[name] = round(float(out[name]), 4)
        out["dup_distance"] = int(out["dup_distance"])
        out["best_per_batch"] = int(out["best_per_batch"]) or None
        out["exposure_detail"] = float(out["exposure_detail"]) or None
        # A slider's bottom holds a configured value it cannot show: min_sharpness 0 (the log
        # slider starts at 0.1), exposure_detail 0 (any detail keeps a frame; the bottom is
        # otherwise null, brightness alone). Saved untouched, they were saved changed.
        if out["min_sharpness"] <= 0.1 and self.base.min_sharpness < 0.1:
            out["min_sharpness"] = self.base.min_sharpness
        if out["exposure_detail"] is None and self.base.exposure_detail == 0:
            out["exposure_detail"] = 0.0
        return out

    @property
    def quality(self) -> QualitySettings:
        """The base config with the sliders' values; raises ValueError for an impossible
        combination (minimum brightness over the maximum)."""
        return QualitySettings.model_validate({**self.base.model_dump(), **self.values})

    def set_thresholds(self, **values: Any) -> None:
        """Move sliders from Python (same path as a person dragging them), redrawing once."""
        unknown = set(values) - set(self.sliders)
        if unknown:
            raise KeyError(f"no slider for {sorted(unknown)} (sliders: {', '.join(self.sliders)})")
        self._hold = True
        try:
            for name, value in values.items():
                empty = name in ("best_per_batch", "exposure_detail") and value is None
                self.sliders[name].value = 0 if empty else value
        finally:
            self._hold = False
        self._update()

    def table(self) -> pl.DataFrame:
        """The quality table under the current sliders."""
        return apply_quality_rules(self.scores, self.frames, self.quality)

    @property
    def summary(self) -> dict[str, int]:
        """``{"kept": n, "<reason>": n}`` under the current sliders."""
        return reason_counts(self.table())

    def _update(self) -> None:
        if self._hold:
            return
        from diffusion_bunny.stages.quality.plots import (  # lazy: pulls in plotnine (0.44 s)
            quality_histograms,
            quality_sheet,
            text_sheet,
        )

        try:
            cfg = self.quality
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            self.counts.value = f"<b style='color:#C0392B'>{message}</b>"
            return
        table = apply_quality_rules(self.scores, self.frames, cfg)
        counts = reason_counts(table)
        rejected = ", ".join(f"{n} {reason}" for reason, n in counts.items() if reason != "kept")
        exposure = exposure_thresholds(with_text_columns(self.scores), cfg)
        if exposure.film_brightness is not None:
            film = (
                f"this film's median brightness is {exposure.film_brightness:.0f} (reference "
                f"{cfg.reference_brightness:.0f}): too dark under {exposure.min_brightness:.1f}, too "
                f"bright over {exposure.max_brightness:.1f}, clipped over {exposure.max_clipped:.2f}"
            )
        else:
            film = (
                f"too dark under {exposure.min_brightness:.1f}, too bright over "
                f"{exposure.max_brightness:.1f}, clipped over {exposure.max_clipped:.2f} (as configured)"
            )
        if cfg.exposure_detail is not None:
            film += f"; kept whatever their brightness from {cfg.exposure_detail:.0f} detail"
        blur = sharpness_threshold(with_text_columns(self.scores), cfg)
        if blur.film_scale < 1.0:
            film += (
                f"; a flat film (median contrast {blur.film_contrast:.0f}, reference "
                f"{cfg.reference_contrast:.0f}): blurry under {blur.min_sharpness * blur.film_scale**2:.1f} "
                "detail (sharpness less its noise)"
            )
        unchecked = unchecked_kept(table).len() if cfg.text_filter else 0
        text = (
            f"<br><span style='color:#C0392B'>{unchecked} kept frame(s) were never looked at for text "
            "(these thresholds keep frames the stage dropped); rerun stage 02 to look at them</span>"
            if unchecked
            else ""
        )
        self.counts.value = (
            f"<b>{counts['kept']}</b> of {table.height} frames kept; rejected: {rejected or 'none'}"
            f"<br>{film}{text}"
        )
        self.plot_img.value = chart_png(quality_histograms(table, cfg, self.frames))
        sheet = quality_sheet(self.run.run_dir, table, self.frames, max_per_group=self.max_per_group)
        self.sheet_img.value = jpeg_bytes(sheet)
        sheet = text_sheet(self.run.run_dir, table, self.frames, max_per_group=self.max_per_group // 2)
        self.text_img.value = jpeg_bytes(sheet)

    def save(self) -> Path | None:
        """Write the thresholds to ``config/local_thresholds.yaml``: the next run (notebook or
        ``bunny run``) applies them, so a headless rerun reproduces this choice."""
        try:
            cfg = self.quality
        except ValidationError as exc:  # min over max, a floor over a minimum: said, not raised
            # A button's traceback goes to JupyterLab's log console: the line under it, the last
            # save's "saved to", was all a person saw, though nothing was written.
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            self.saved.value = f"<span style='color:#C0392B'>not saved: {html.escape(message)}</span>"
            return None
        keys = (
            "min_sharpness",
            "min_brightness",
            "max_brightness",
            "max_clipped",
            "exposure_detail",
            "dup_distance",
            "relative_brightness",
            "text_filter",
            "max_text_share",
            "max_text_area",
            "subtitles",
        )
        settings = {key: getattr(cfg, key) for key in keys}
        settings["min_sharpness"] = round(settings["min_sharpness"], 3)
        settings["best_per_batch"] = cfg.best_per_batch
        path, self.saved.value = save_from_widget("thresholds", {"quality": settings}, self.config_root, "02")
        if path is None:
            return None
        self.saved.value += overridden_note("quality", settings, *self.layers, same=_same_setting)
        return path


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Whether two values of a quality setting mean the same (read by the settings' own model:
    ``best_per_batch`` 0 is null); as written where either does not read."""
    try:
        return getattr(QualitySettings(**{key: a}), key) == getattr(QualitySettings(**{key: b}), key)
    except (ValidationError, TypeError):
        return a == b
