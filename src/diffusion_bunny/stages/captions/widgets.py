"""Notebook 05's widget: read and edit the captions page by page."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import polars as pl
from PIL import Image

from diffusion_bunny.errors import UserError
from diffusion_bunny.media.figures import jpeg_bytes
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.captions.stage import edit_caption
from diffusion_bunny.stages.extract.tables import frame_image_path


class CaptionEditor:
    """Captions beside their thumbnails, editable: one row per frame (a page at a time) with
    the picture, a text box, the provider and status, and a **save** button.

    Saving goes through :func:`~diffusion_bunny.stages.captions.stage.edit_caption`:
    the edit is on disk at once
    (``caption_edits`` + ``captions``), marked ``edited``, and no rerun of the stage overwrites it.
    :meth:`save` does the same from Python.
    """

    def __init__(self, run: Run, *, page_size: int = 12, thumb_px: int = 160):
        self.run = run
        self.page_size = page_size
        self.thumb_px = thumb_px
        self.page = 0
        #: Captions typed and not saved yet, by frame: a page drawn again (another row saved,
        #: another page and back) shows them, where it showed the table's and lost them.
        self.typed: dict[str, str] = {}
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
                    picture = widgets.Image(value=jpeg_bytes(img), format="jpeg")
            except OSError:
                picture = widgets.HTML(f"<i>{rec['frame_id']}: picture unreadable</i>")
            box = widgets.Textarea(
                value=self.typed.get(rec["frame_id"], rec["caption"] or ""),
                placeholder=rec["error"] or "",
                layout=widgets.Layout(width="520px", height="70px"),
            )
            box.observe(lambda c, fid=rec["frame_id"]: self.typed.__setitem__(fid, c["new"]), names="value")
            colour = {"edited": "#54A24B", "failed": "#E45756"}.get(rec["status"], "#666")
            unsaved = " · <b>not saved</b>" if rec["frame_id"] in self.typed else ""
            info = widgets.HTML(
                f"<code>{rec['frame_id']}</code><br><span style='color:{colour}'>{rec['status']}</span> · "
                f"{rec['provider'] or '-'}{unsaved}"
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
        table = edit_caption(self.run.run_dir, frame_id, caption)
        self.typed.pop(frame_id, None)
        self.status.value = f"saved {frame_id}: marked edited, kept on every rerun"
        self.go(self.page)  # the row may have left a "failed only" page
        return table
