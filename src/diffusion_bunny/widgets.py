"""Notebook widgets that move a threshold over scores already computed.

The widget logic is a plain class whose state can be set from Python (``set_threshold``,
``set_thresholds``), so tests drive it exactly as a slider would, and a headless run can build it
without a browser.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import polars as pl
import yaml
from pydantic import ValidationError

from diffusion_bunny.config import FilteringConfig, workspace_root
from diffusion_bunny.errors import UserError
from diffusion_bunny.run import Run, atomic_write_bytes, frame_image_path
from diffusion_bunny.stages.extract import classify_shots, select_keyframes
from diffusion_bunny.stages.quality import apply_quality_rules, reason_counts


def save_local_settings(name: str, settings: dict[str, dict[str, Any]], root: Path | None = None) -> Path:
    """Merge ``settings`` into ``config/local_<name>.yaml`` (git-ignored), the layer that makes
    a headless rerun reproduce what a person chose in a widget."""
    root = root if root is not None else workspace_root()
    path = root / "config" / f"local_{name}.yaml"
    current: dict[str, Any] = {}
    if path.is_file():
        current = yaml.safe_load(path.read_text()) or {}
    for section, values in settings.items():
        current.setdefault(section, {}).update(values)
    atomic_write_bytes(path, yaml.safe_dump(current, sort_keys=True).encode())
    return path


class MotionThresholdExplorer:
    """Slider over the per-shot motion score: re-classifies shots and shows which keyframes each
    would give, from the stored candidates and thumbnails, without decoding the movie again."""

    def __init__(self, run: Run, threshold: float, *, max_shots: int = 30, config_root: Path | None = None):
        self.run = run
        self.shots = run.read_table("shots")
        self.candidates = run.read_table("keyframe_candidates")
        self.max_shots = max_shots
        self.config_root = config_root
        top = max(5.0, float(self.shots["motion"].max() or 0.0) * 1.1)
        self.slider = widgets.FloatSlider(
            value=threshold,
            min=0.0,
            max=round(top, 1),
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
        import io

        import matplotlib.pyplot as plt

        from diffusion_bunny.plots import contact_sheet, motion_plot

        s = self.summary
        self.counts.value = (
            f"<b>{s['static']}</b> static shots, <b>{s['dynamic']}</b> dynamic shots, "
            f"<b>{s['keyframes']}</b> keyframes"
        )
        fig = motion_plot(self.shots, self.threshold).draw()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72)
        plt.close(fig)
        self.plot_img.value = buf.getvalue()
        sheet = contact_sheet(self.run.run_dir, self.picks(), self.classified(), max_shots=self.max_shots)
        buf = io.BytesIO()
        sheet.save(buf, format="JPEG", quality=85)
        self.sheet_img.value = buf.getvalue()

    def save(self) -> Path:
        """Write the threshold to ``config/local_extraction.yaml``; the next run re-extracts with it."""
        path = save_local_settings(
            "extraction", {"extraction": {"motion_threshold": self.threshold}}, self.config_root
        )
        self.saved.value = f"saved to <code>{path}</code>; rerun stage 01 to extract with it"
        return path


class QualityThresholdExplorer:
    """One slider per threshold of stage 02 over the stored ``quality`` scores: the counts, the
    histograms and the kept/rejected grid follow every move, and no frame is read again (the rules
    are a pure function of the table; only the thumbnails of the grid are opened)."""

    def __init__(
        self,
        run: Run,
        cfg: FilteringConfig,
        *,
        max_per_group: int = 24,
        config_root: Path | None = None,
    ):
        self.run = run
        self.base = cfg
        self.scores = run.read_table("quality")
        self.frames = run.read_table("frames")
        self.max_per_group = max_per_group
        self.config_root = config_root
        top_sharp = float(self.scores["sharpness"].max() or 1000.0)
        style = {"description_width": "120px"}
        layout = widgets.Layout(width="480px")

        def slider(cls: type, name: str, **kw: Any) -> Any:
            return cls(description=name, continuous_update=False, style=style, layout=layout, **kw)

        self.sliders: dict[str, Any] = {
            "min_sharpness": slider(
                widgets.FloatLogSlider,
                "min sharpness",
                value=max(cfg.min_sharpness, 0.1),
                base=10,
                min=-1,
                max=round(math.log10(max(top_sharp, 10.0)) + 0.3, 2),
                step=0.02,
            ),
            "min_brightness": slider(
                widgets.FloatSlider, "min brightness", value=cfg.min_brightness, min=0, max=255, step=1
            ),
            "max_brightness": slider(
                widgets.FloatSlider, "max brightness", value=cfg.max_brightness, min=0, max=255, step=1
            ),
            "max_clipped": slider(
                widgets.FloatSlider, "max clipped", value=cfg.max_clipped, min=0, max=1, step=0.01
            ),
            "dup_distance": slider(widgets.IntSlider, "dup distance", value=cfg.dup_distance, min=0, max=32),
            "best_per_batch": slider(
                widgets.IntSlider, "best per batch", value=cfg.best_per_batch or 0, min=0, max=20
            ),
        }
        self.counts = widgets.HTML()
        # Image widgets, not Output widgets: headless executors (nbclient) hang on a cell that
        # shows images inside an Output widget (see MotionThresholdExplorer).
        self.plot_img = widgets.Image(format="png", layout=widgets.Layout(max_width="900px"))
        self.sheet_img = widgets.Image(format="jpeg", layout=widgets.Layout(max_width="1000px"))
        self.save_button = widgets.Button(
            description="use these thresholds", icon="save", layout=widgets.Layout(width="auto")
        )
        self.saved = widgets.HTML()
        self._hold = False
        for s in self.sliders.values():
            s.observe(lambda change: self._update(), names="value")
        self.save_button.on_click(lambda _: self.save())
        batch = "shot" if cfg.batch == "shot" else f"{cfg.batch} consecutive frames"
        self.widget = widgets.VBox(
            [
                *self.sliders.values(),
                widgets.HTML(
                    f"best per batch: 0 keeps all; a batch is a {batch} (<code>filtering.batch</code>)"
                ),
                widgets.HBox([self.save_button, self.saved]),
                self.counts,
                self.plot_img,
                self.sheet_img,
            ]
        )
        self._update()

    @property
    def values(self) -> dict[str, Any]:
        """The slider values as ``filtering`` settings (best per batch 0 means keep all: null)."""
        out = {name: s.value for name, s in self.sliders.items()}
        out["dup_distance"] = int(out["dup_distance"])
        out["best_per_batch"] = int(out["best_per_batch"]) or None
        return out

    @property
    def filtering(self) -> FilteringConfig:
        """The base config with the sliders' values; raises ValueError for an impossible
        combination (minimum brightness over the maximum)."""
        return FilteringConfig.model_validate({**self.base.model_dump(), **self.values})

    def set_thresholds(self, **values: Any) -> None:
        """Move sliders from Python (same path as a person dragging them), redrawing once."""
        unknown = set(values) - set(self.sliders)
        if unknown:
            raise KeyError(f"no slider for {sorted(unknown)} (sliders: {', '.join(self.sliders)})")
        self._hold = True
        try:
            for name, value in values.items():
                self.sliders[name].value = 0 if name == "best_per_batch" and value is None else value
        finally:
            self._hold = False
        self._update()

    def table(self) -> pl.DataFrame:
        """The quality table under the current sliders."""
        return apply_quality_rules(self.scores, self.frames, self.filtering)

    @property
    def summary(self) -> dict[str, int]:
        """``{"kept": n, "<reason>": n}`` under the current sliders."""
        return reason_counts(self.table())

    def _update(self) -> None:
        if self._hold:
            return
        import io

        import matplotlib.pyplot as plt

        from diffusion_bunny.plots import quality_histograms, quality_sheet

        try:
            cfg = self.filtering
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            self.counts.value = f"<b style='color:#C0392B'>{message}</b>"
            return
        table = apply_quality_rules(self.scores, self.frames, cfg)
        counts = reason_counts(table)
        rejected = ", ".join(f"{n} {reason}" for reason, n in counts.items() if reason != "kept")
        self.counts.value = (
            f"<b>{counts['kept']}</b> of {table.height} frames kept; rejected: {rejected or 'none'}"
        )
        fig = quality_histograms(table, cfg).draw()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72)
        plt.close(fig)
        self.plot_img.value = buf.getvalue()
        sheet = quality_sheet(self.run.run_dir, table, self.frames, max_per_group=self.max_per_group)
        buf = io.BytesIO()
        sheet.save(buf, format="JPEG", quality=85)
        self.sheet_img.value = buf.getvalue()

    def save(self) -> Path:
        """Write the thresholds to ``config/local_thresholds.yaml``: the next run (notebook or
        ``bunny run``) applies them, so a headless rerun reproduces this choice."""
        cfg = self.filtering
        keys = ("min_sharpness", "min_brightness", "max_brightness", "max_clipped", "dup_distance")
        settings = {key: getattr(cfg, key) for key in keys}
        settings["min_sharpness"] = round(settings["min_sharpness"], 3)
        settings["best_per_batch"] = cfg.best_per_batch
        path = save_local_settings("thresholds", {"filtering": settings}, self.config_root)
        self.saved.value = f"saved to <code>{path}</code>; rerun stage 02 to apply them"
        return path


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ClusterNamer:
    """Name the characters stage 03 could not: one row per cluster of unknown faces (largest
    first) with its faces, a text box and a **name** button.

    Naming copies the cluster's best faces into the reference folder (``characters.reference_dir``,
    or the run's own ``references/``) and re-labels the run from the stored encodings (no face is
    detected again), then the rows are rebuilt: faces of other clusters that the new references
    now match leave the list too. :meth:`name` does the same from Python.
    """

    def __init__(
        self,
        run: Run,
        *,
        config_path: str | None = None,
        overrides: dict[str, Any] | None = None,
        max_clusters: int = 12,
        max_faces: int = 16,
    ):
        self.run = run
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.max_clusters = max_clusters
        self.max_faces = max_faces
        self.status = widgets.HTML()
        self.rows = widgets.VBox()
        self.widget = widgets.VBox([self.status, self.rows])
        self.named: list[dict[str, Any]] = []
        self.refresh()

    def clusters(self) -> pl.DataFrame:
        """``cluster, faces, frames`` of the unknown faces, largest cluster first."""
        faces = self.run.read_table("faces")
        return (
            faces.filter(pl.col("cluster").is_not_null())
            .group_by("cluster")
            .agg(pl.len().alias("faces"), pl.col("frame_id").n_unique().alias("frames"))
            .sort(["faces", "cluster"], descending=[True, False])
        )

    def refresh(self) -> None:
        """Rebuild one row per cluster from the faces table as it is on disk now."""
        from diffusion_bunny.plots import face_sheet

        faces = self.run.read_table("faces")
        frames = self.run.read_table("frames")
        clusters = self.clusters()
        children: list[Any] = []
        for row in clusters.head(self.max_clusters).iter_rows(named=True):
            cluster = row["cluster"]
            members = faces.filter(pl.col("cluster") == cluster)
            sheet = face_sheet(
                self.run.run_dir, members, frames, group="cluster", max_per_group=self.max_faces, columns=8
            )
            text = widgets.Text(placeholder="character name", layout=widgets.Layout(width="220px"))
            button = widgets.Button(description="name", icon="tag", layout=widgets.Layout(width="90px"))
            button.on_click(lambda _, c=cluster, t=text: self.name(c, t.value))
            children.append(
                widgets.VBox(
                    [
                        widgets.HTML(f"<b>{cluster}</b>: {row['faces']} faces in {row['frames']} frames"),
                        widgets.Image(
                            value=_png(sheet), format="png", layout=widgets.Layout(max_width="900px")
                        ),
                        widgets.HBox([text, button]),
                    ]
                )
            )
        if clusters.height > self.max_clusters:
            children.append(widgets.HTML(f"... and {clusters.height - self.max_clusters} smaller clusters"))
        if not children:
            children.append(widgets.HTML("every face found has a name; no cluster is left to name"))
        self.rows.children = children

    def name(self, cluster: str, name: str) -> dict[str, Any] | None:
        """Name ``cluster`` (as the button does); the result, or None after a user error (shown)."""
        from diffusion_bunny.errors import UserError
        from diffusion_bunny.stages.characters import name_cluster

        try:
            result = name_cluster(
                self.run.run_dir, cluster, name, config_path=self.config_path, overrides=self.overrides
            )
        except UserError as exc:
            self.status.value = f"<span style='color:#C0392B'>{exc}</span>"
            return None
        self.named.append(result)
        self.status.value = (
            f"named {cluster} <b>{result['character']}</b>: {len(result['references_added'])} reference "
            f"image(s) added; {result['named_faces']} faces are now {result['character']}"
        )
        self.refresh()
        return result


class CaptionEditor:
    """Captions beside their thumbnails, editable: one row per frame (a page at a time) with
    the picture, a text box, the provider and status, and a **save** button.

    Saving goes through :func:`diffusion_bunny.captions.edit_caption`: the edit is on disk at once
    (``caption_edits`` + ``captions``), marked ``edited``, and no rerun of the stage overwrites it.
    :meth:`save` does the same from Python.
    """

    def __init__(self, run: Run, *, page_size: int = 12, thumb_px: int = 160):
        self.run = run
        self.page_size = page_size
        self.thumb_px = thumb_px
        self.page = 0
        self.status = widgets.HTML()
        self.rows = widgets.VBox()
        self.prev_button = widgets.Button(description="◀ previous", layout=widgets.Layout(width="110px"))
        self.next_button = widgets.Button(description="next ▶", layout=widgets.Layout(width="110px"))
        self.page_label = widgets.HTML()
        self.only_failed = widgets.Checkbox(description="failed only", value=False, indent=False)
        self.prev_button.on_click(lambda _b: self.go(self.page - 1))
        self.next_button.on_click(lambda _b: self.go(self.page + 1))
        self.only_failed.observe(lambda _c: self.go(0), names="value")
        nav = widgets.HBox([self.prev_button, self.page_label, self.next_button, self.only_failed])
        self.widget = widgets.VBox([nav, self.status, self.rows])
        self.refresh()

    def table(self) -> pl.DataFrame:
        """The captions as on disk, with each frame's path (failed ones only when ticked)."""
        captions = self.run.read_table("captions")
        frames = self.run.read_table("frames").select("frame_id", "path")
        table = captions.join(frames, on="frame_id", how="left").sort("frame_id")
        if self.only_failed.value:
            table = table.filter(pl.col("status") == "failed")
        return table

    def pages(self) -> int:
        return max(1, -(-self.table().height // self.page_size))

    def go(self, page: int) -> None:
        self.page = min(max(0, page), self.pages() - 1)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the rows of the current page from the tables on disk."""
        from PIL import Image

        table = self.table()
        start = self.page * self.page_size
        chunk = table.slice(start, self.page_size)
        self.page_label.value = f"&nbsp;page {self.page + 1} of {self.pages()} ({table.height} frames)&nbsp;"
        rows = []
        for rec in chunk.iter_rows(named=True):
            path = frame_image_path(self.run.run_dir, rec["frame_id"], rec["path"])
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    img.thumbnail((self.thumb_px, self.thumb_px))
                    picture = widgets.Image(value=_png(img), format="png")
            except OSError:
                picture = widgets.HTML(f"<i>{rec['frame_id']}: picture unreadable</i>")
            box = widgets.Textarea(
                value=rec["caption"] or "",
                placeholder=rec["error"] or "",
                layout=widgets.Layout(width="520px", height="70px"),
            )
            colour = {"edited": "#54A24B", "failed": "#E45756"}.get(rec["status"], "#666")
            info = widgets.HTML(
                f"<code>{rec['frame_id']}</code><br><span style='color:{colour}'>{rec['status']}</span> · "
                f"{rec['provider'] or '-'}"
            )
            button = widgets.Button(description="save", layout=widgets.Layout(width="70px"))
            button.on_click(lambda _b, fid=rec["frame_id"], tb=box: self._save_from(fid, tb))
            rows.append(widgets.HBox([picture, widgets.VBox([info, box, button])]))
        self.rows.children = rows

    def _save_from(self, frame_id: str, box: Any) -> None:
        try:
            self.save(frame_id, box.value)
        except UserError as exc:
            self.status.value = f"<span style='color:#E45756'>{exc}</span>"

    def save(self, frame_id: str, caption: str) -> pl.DataFrame:
        """Keep a person's caption for ``frame_id`` (see the class docstring); returns the table."""
        from diffusion_bunny.captions import edit_caption

        table = edit_caption(self.run.run_dir, frame_id, caption)
        self.status.value = f"saved {frame_id}: marked edited, kept on every rerun"
        self.go(self.page)  # the row may have left a "failed only" page
        return table
