"""Notebook 03's widgets: name the clusters of unknown faces, fix an appearance, preview a detector,
add a still from the film as a reference picture, or confirm a likely sighting as one."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import polars as pl
from jupyter_bbox_widget import BBoxWidget
from scenedetect import FrameTimecode

from diffusion_bunny.errors import UserError
from diffusion_bunny.media.figures import jpeg_bytes
from diffusion_bunny.media.images import read_rgb
from diffusion_bunny.models.face_detect import detector_names
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.pipeline.settings import RunConfig
from diffusion_bunny.stages.characters.sightings import likely_sightings
from diffusion_bunny.stages.characters.stage import (
    add_still,
    fix_appearance,
    name_cluster,
    promoted_picture,
    undo_fix,
)
from diffusion_bunny.stages.characters.tables import naming_dir


def _error(message: str) -> str:
    """A status line that says something went wrong."""
    return f"<span style='color:#C0392B'>{message}</span>"


class ClusterNamer:
    """Name the characters stage 03 could not: one row per cluster of unknown faces (largest
    first) with its faces, a text box and a **name** button.

    Naming copies the cluster's best faces into the reference folder (``characters.reference_dir``,
    or the run's own ``references/``) and re-labels the run from the stored encodings (no face is
    detected again), then the rows are rebuilt: faces of other clusters that the new references
    now match leave the list too. :meth:`name` does the same from Python. ``then``: called after
    each naming, so that a widget drawn from the faces table before it (notebook 03's fixer,
    whose list of characters lacked the one just named) is drawn again.
    """

    def __init__(
        self,
        run: Run,
        cfg: RunConfig,
        *,
        max_clusters: int = 12,
        max_faces: int = 16,
        then: Callable[[], Any] | None = None,
    ):
        self.run = run
        self.cfg = cfg
        self.then = then
        self.max_clusters = max_clusters
        self.max_faces = max_faces
        self.status = widgets.HTML()
        self.rows = widgets.VBox()
        self.widget = widgets.VBox([self.status, self.rows])
        self.named: list[dict[str, Any]] = []
        #: cluster -> the faces its row shows: naming checks the cluster still holds them.
        self.shown: dict[str, frozenset[str]] = {}
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
        from diffusion_bunny.stages.characters.plots import face_sheet  # lazy: pulls in plotnine (0.44 s)

        faces = self.run.read_table("faces")
        frames = self.run.read_table("frames")
        clusters = self.clusters()
        children: list[Any] = []
        self.shown = {}
        for row in clusters.head(self.max_clusters).iter_rows(named=True):
            cluster = row["cluster"]
            members = faces.filter(pl.col("cluster") == cluster)
            self.shown[cluster] = frozenset(members["face_id"].to_list())
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
                            value=jpeg_bytes(sheet), format="jpeg", layout=widgets.Layout(max_width="900px")
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
        """Name ``cluster`` (as the button does); the result, or None after a user error (shown).

        The rows are checked against the faces table first: a fix in the fixer, or a cluster named
        elsewhere, relabels the run and numbers its clusters again, so a row drawn before could
        name another cluster's faces under its id, or none. Then the rows are redrawn instead."""
        if cluster in self.shown:
            now = self.run.read_table("faces").filter(pl.col("cluster") == cluster)["face_id"]
            if frozenset(now.to_list()) != self.shown[cluster]:
                self.refresh()
                self.status.value = _error(
                    f"the unknown faces were grouped again since this list was drawn (a fix, or a "
                    f"cluster named elsewhere), so {cluster} is not the faces shown: the list is "
                    "redrawn, name them there"
                )
                return None
        try:
            result = name_cluster(self.run.run_dir, cluster, name, self.cfg)
        except UserError as exc:
            self.status.value = _error(str(exc))
            return None
        self.named.append(result)
        self.status.value = (
            f"named {cluster} <b>{result['character']}</b>: {len(result['references_added'])} reference "
            f"image(s) added; {result['named_faces']} faces are now {result['character']}"
        )
        self.refresh()
        if self.then is not None:
            self.then()
        return result


class DetectorPreview:
    """Switch the face detector and see what it finds on a few frames: a drop-down of
    ``characters.detector``'s choices over :func:`~.plots.detector_preview`. It only previews; to
    use a detector for the run, set ``characters.detector`` (``overrides`` or config) and rerun."""

    def __init__(self, run: Run, frames: pl.DataFrame, frame_ids: list[str], settings: Any):
        self.run, self.frames, self.frame_ids, self.settings = run, frames, frame_ids, settings
        self.choice = widgets.Dropdown(
            options=list(detector_names()), value=settings.detector_name, description="detector"
        )
        self.image = widgets.Image(format="jpeg")
        self.status = widgets.HTML()
        self.choice.observe(lambda change: self.show(change["new"]), names="value")
        self.widget = widgets.VBox([self.choice, self.status, self.image])
        self.show(settings.detector_name)

    def show(self, detector: str) -> None:
        """Draw the faces ``detector`` finds on the preview frames."""

        from diffusion_bunny.stages.characters.plots import (  # lazy: pulls in plotnine (0.44 s)
            detector_preview,
        )

        self.status.value = f"<i>searching with {detector} ...</i>"
        # The configured detector with its configured settings; another with its defaults.
        chosen = (
            self.settings
            if detector == self.settings.detector_name
            else replace(self.settings, detector=detector)
        )
        picture = detector_preview(self.run.run_dir, self.frames, self.frame_ids, chosen)
        self.image.value = jpeg_bytes(picture)
        self.status.value = (
            f"faces found by <b>{detector}</b> (set characters.detector to use it for the run)"
        )


class AppearanceFixer:
    """Fix a wrong appearance by hand: pick a character, see its appearances numbered as
    :func:`~.plots.face_sheet` numbers them, type a number and the right name (empty: none of
    the characters, for a false sighting) and press **fix**. The fix is kept in the run's
    ``appearance_edits`` and re-applied after every rerun (:func:`~.stage.fix_appearance`).

    The strip shows ``per_page`` appearances at a time, surest first; **previous** and **next**
    turn the pages, and a number typed anywhere in 1 to the character's count turns to its page.
    The strip held the first 24 alone: past them, the least sure appearances, the ones most
    likely wrong, could be neither seen nor fixed. The line under the number names the face
    typed (its ``face_id``, for :func:`~.stage.fix_appearance` from Python)."""

    def __init__(self, run: Run, cfg: RunConfig | None = None, *, per_page: int = 24):
        self.run = run
        #: The run's settings: a name typed is spelt as a character of ``characters.reference_dir``;
        #: **undo fix** labels the run again with them.
        self.cfg = cfg
        self.characters = cfg.characters if cfg is not None else None
        self.per_page = max(1, per_page)
        #: The character whose strip is shown, and its page (0: the first).
        self.showing: str | None = None
        self.page = 0
        self.character = widgets.Dropdown(description="character")
        self.part = widgets.HTML()
        self.previous = widgets.Button(description="previous", icon="arrow-left")
        self.next = widgets.Button(description="next", icon="arrow-right")
        self.image = widgets.Image(format="jpeg", layout=widgets.Layout(max_width="900px"))
        self.number = widgets.BoundedIntText(value=1, min=1, max=1, description="number")
        self.face = widgets.HTML()
        self.new_name = widgets.Text(placeholder="right name (empty: none of them)")
        self.button = widgets.Button(description="fix", icon="check", layout=widgets.Layout(width="90px"))
        self.undo = widgets.Button(description="undo fix", icon="undo", layout=widgets.Layout(width="110px"))
        self.status = widgets.HTML()
        self._drawing = False  # the number box set while a strip is drawn turns no page
        self.character.observe(lambda change: self.show(change["new"], page=0), names="value")
        self.previous.on_click(lambda _: self.turn(-1))
        self.next.on_click(lambda _: self.turn(1))
        self.number.observe(lambda change: self._typed(change["new"]), names="value")
        self.button.on_click(lambda _: self.fix(self.character.value, self.number.value, self.new_name.value))
        self.undo.on_click(lambda _: self.unfix(self.character.value, self.number.value))
        self.widget = widgets.VBox(
            [
                self.character,
                widgets.HBox([self.previous, self.next, self.part]),
                self.image,
                widgets.HBox([self.number, self.new_name, self.button, self.undo]),
                self.face,
                self.status,
            ]
        )
        #: All the appearances of each character as its strip was last drawn, in its numbering: a
        #: number typed is one of them, even when the table changed since (a cluster named below
        #: in the notebook labels again, and a number read afresh fixed another face).
        self.shown: dict[str, list[str]] = {}
        self.refresh()

    def members(self, character: str) -> pl.DataFrame:
        """Every appearance of ``character`` (``unknown``: those without a name), numbered order."""
        from diffusion_bunny.stages.characters.plots import (  # lazy: pulls in plotnine (0.44 s)
            UNKNOWN,
            sheet_order,
        )

        faces = self.run.read_table("faces").with_columns(pl.col("character").fill_null(UNKNOWN))
        return sheet_order(faces.filter(pl.col("character") == character))

    def refresh(self) -> None:
        from diffusion_bunny.stages.characters.plots import UNKNOWN  # lazy: pulls in plotnine (0.44 s)

        names = self.run.read_table("faces")["character"]
        options = sorted(set(names.drop_nulls().to_list())) + ([UNKNOWN] if names.null_count() else [])
        current = (
            self.character.value if self.character.value in options else (options[0] if options else None)
        )
        self.character.options = options
        self.character.value = current
        self.show(current)

    def show(self, character: str | None, page: int | None = None) -> None:
        """Draw page ``page`` of ``character``'s strip (None: the page shown, or the last one when
        the character has fewer appearances now; another character's first); the number box then
        covers all its appearances and points into the page."""
        from diffusion_bunny.stages.characters.plots import face_sheet  # lazy: pulls in plotnine (0.44 s)

        if character is None:
            self.status.value = "no appearance found"
            return
        members = self.members(character)
        pages = max(1, -(-members.height // self.per_page))
        if page is None:
            page = self.page if character == self.showing else 0
        self.page = min(max(0, page), pages - 1)
        self.showing = character
        first = self.page * self.per_page + 1
        last = min(members.height, first + self.per_page - 1)
        sheet = face_sheet(
            self.run.run_dir,
            members,
            self.run.read_table("frames"),
            group="character",
            max_per_group=self.per_page,
            columns=8,
            first=first,
        )
        self.image.value = jpeg_bytes(sheet)
        self.shown[character] = members["face_id"].to_list()
        # Ordered by distance where there is one (faces named after a reference); not the others.
        ordered = "distance" in members.columns and members["distance"].is_not_null().any()
        self.part.value = (
            f"appearances {first}-{last} of {members.height}{', least sure last' if ordered else ''} "
            f"(page {self.page + 1} of {pages})"
        )
        self.previous.disabled, self.next.disabled = self.page == 0, self.page == pages - 1
        self._drawing = True
        try:
            self.number.max = max(1, members.height)
            if not first <= self.number.value <= last:
                self.number.value = first
        finally:
            self._drawing = False
        self._name_face(self.number.value)

    def turn(self, step: int) -> None:
        """Show the page ``step`` pages on (back when negative), as **next** and **previous** do."""
        self.show(self.showing, page=self.page + step)

    def _typed(self, number: int) -> None:
        """A number typed off the page shown turns to its page (a number is fixed as seen)."""
        if self._drawing:
            return
        page = (number - 1) // self.per_page
        if page != self.page:
            self.show(self.showing, page=page)
        else:
            self._name_face(number)

    def _name_face(self, number: int) -> None:
        """The line under the number box: the face_id of appearance ``number`` of the strip shown."""
        shown = self.shown.get(self.showing or "") or []
        if not 1 <= number <= len(shown):
            self.face.value = ""
            return
        face_id = shown[number - 1]
        self.face.value = f"#{number} is <code>{html.escape(face_id)}</code>"

    def fix(self, character: str, number: int, name: str) -> pl.DataFrame | None:
        """Give appearance ``number`` of ``character``'s strip, as it was drawn, the name ``name``
        (as the button does); the updated faces table, or None after a user error (shown). An
        appearance that is no longer ``character``'s (stage 03 labelled again since the strip was
        drawn) is not fixed: the strip is drawn again to check the number on."""
        from diffusion_bunny.stages.characters.plots import UNKNOWN  # lazy: pulls in plotnine (0.44 s)

        shown = self.shown.get(character)
        if shown is None:
            shown = self.members(character)["face_id"].to_list()
        if not 1 <= number <= len(shown):
            self.status.value = _error(f"{character} has no appearance #{number}")
            return None
        face_id = shown[number - 1]
        now = self.run.read_table("faces").filter(pl.col("face_id") == face_id)
        if now.is_empty() or (now["character"][0] or UNKNOWN) != character:
            self.refresh()
            self.status.value = _error(
                f"appearance #{number} of {character} changed since its strip was drawn (stage 03 "
                "labelled again); the strip is drawn again: check the number and fix again"
            )
            return None
        was = now["character"][0]
        picture = promoted_picture(self.run, self.characters, face_id, was) if was else None
        try:
            faces = fix_appearance(self.run.run_dir, face_id, name.strip() or None, self.characters)
        except UserError as exc:
            self.status.value = _error(str(exc))
            return None
        saved = faces.filter(pl.col("face_id") == face_id)["character"][0]  # as spelt in the table
        self.status.value = f"{face_id} is now <b>{html.escape(saved or 'none of the characters')}</b>"
        if picture is not None and saved != was:
            gone = (
                "removed" if not picture.exists() else "kept (the character's only picture, or not writable)"
            )
            self.status.value += f"; its picture among {html.escape(was)}'s references {gone}"
        self.refresh()
        return faces

    def unfix(self, character: str, number: int) -> pl.DataFrame | None:
        """Take back the fixes of appearance ``number`` of ``character``'s strip, as it was drawn
        (as **undo fix** does; :func:`~.stage.undo_fix`): the run is labelled again and the
        appearance is what stage 03 makes of it. The updated faces table, or None after a user
        error (shown). A face marked a false sighting by mistake is in the ``unknown`` strip."""
        shown = self.shown.get(character) or self.members(character)["face_id"].to_list()
        if not 1 <= number <= len(shown):
            self.status.value = _error(f"{character} has no appearance #{number}")
            return None
        if self.cfg is None:
            self.status.value = _error("undo needs the run's settings: AppearanceFixer(run, cfg)")
            return None
        face_id = shown[number - 1]
        self.status.value = f"labelling the run again without the fixes of {face_id} ..."
        try:
            faces = undo_fix(self.run.run_dir, face_id, self.cfg)
        except UserError as exc:
            self.status.value = _error(str(exc))
            return None
        row = faces.filter(pl.col("face_id") == face_id)
        now = "gone from the faces table" if row.is_empty() else (row["character"][0] or row["cluster"][0])
        self.status.value = f"fixes of {face_id} taken back: it is now <b>{html.escape(now or 'unknown')}</b>"
        self.refresh()
        return faces


class StillPicker:
    """Add a still from the film as a reference picture of a character: pick a frame with the
    slider, or go to a time of the film (``1:30``, ``0:01:30.5``, ``90.5s``), a frame number or a
    shot (``shot 12``), drag a box around the character on the picture (drag its edges or corners
    to adjust it), type or pick its name and press **add still**. Each box drawn on the frame goes to the
    reference folder (:func:`~.stage.add_still`) under its name; the next run of stage 03 fits on
    it.

    The boxes are drawn with jupyter_bbox_widget's ``BBoxWidget`` (an anywidget made for boxing
    things in pictures), shown the frame's own file, so a box comes back in the frame's
    full-resolution pixels. A box takes the name chosen among its labels (the known characters)
    or, without one, the name typed.

    For the characters the pictures a user has at hand miss: one still per character found the
    held-out 3D creatures in all 11 shots the stills were not taken from, not 3
    (docs/characters.md). :meth:`add` does the same from Python."""

    def __init__(self, run: Run, cfg: RunConfig):
        self.run, self.cfg = run, cfg
        self.frames = run.read_table("frames").sort("frame_index")
        # The movie's frame rate (stage 01's manifest): times typed in go_to and shown per frame.
        self.fps = float(((run.read_manifest("extract") or {}).get("facts") or {}).get("fps") or 25.0)
        last = max(0, self.frames.height - 1)
        self.frame = widgets.IntSlider(value=0, min=0, max=last, description="frame", continuous_update=False)
        # A film has thousands of extracted frames: a user who saw the character at 12:34 in a
        # player goes there rather than dragging the slider over them.
        self.go = widgets.Text(
            placeholder="go to 1:30, 90.5s, a frame number or shot 12",
            continuous_update=False,
            layout=widgets.Layout(width="320px"),
        )
        self.name = widgets.Combobox(placeholder="character name")
        self.boxes = BBoxWidget(hide_buttons=True)
        self._offer_names()
        self.button = widgets.Button(
            description="add still", icon="plus", layout=widgets.Layout(width="110px")
        )
        self.status = widgets.HTML()
        # The characters the last run of stage 03 found in no frame: the ones a still is for.
        facts = (run.read_manifest("characters") or {}).get("facts") or {}
        self.missing = list(facts.get("characters_not_found") or [])
        self.still_added: set[str] = set()
        self.hint = widgets.HTML()
        self._hint()
        self.frame.observe(lambda _: self.show(), names="value")
        self.go.observe(lambda change: self.go_to(change["new"]), names="value")
        self.name.observe(lambda change: self._typed(change["new"]), names="value")
        self.button.on_click(lambda _: self.add_boxes())
        self.widget = widgets.VBox(
            [
                self.hint,
                widgets.HBox([self.frame, self.go]),
                self.boxes,
                widgets.HBox([self.name, self.button]),
                self.status,
            ]
        )
        if self.frames.height:
            self.show()
            if self.missing:  # the first of them typed in: a box drawn is a still of it
                self.name.value = self.missing[0]
        else:
            self.status.value = "no frames: run stages extract and quality first"

    def _hint(self) -> None:
        """The line above the frame naming the characters found in no frame (those given a still
        here since are marked), or nothing when there are none."""
        if not self.missing:
            self.hint.value = ""
            return
        names = ", ".join(
            f"<b>{n}</b>" + (" (still added)" if n in self.still_added else "") for n in self.missing
        )
        self.hint.value = (
            f"Found in no frame by the last run of stage 03: {names}. Go to where you saw one, box it and "
            "add a still (a person where the face looks toward the camera); then rerun stage characters."
        )

    def known_names(self) -> list[str]:
        """The characters that have a reference folder (or a name in the faces table)."""
        folder = naming_dir(self.run.run_dir, self.cfg.characters)
        names = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
        if self.run.has_table("faces"):
            names |= set(self.run.read_table("faces")["character"].drop_nulls().to_list())
        return sorted(names)

    def frame_id(self) -> str:
        return self.frames["frame_id"][self.frame.value]

    def go_to(self, where: str) -> bool:
        """Show the extracted frame nearest to ``where``: a time of the film or a frame number, as
        PySceneDetect's ``FrameTimecode`` reads them (``1:30``, ``0:01:30.5``, ``90.5s``, ``2250``),
        or ``shot N`` (its first extracted frame). False, with the reason in the status, when
        there is no such place."""
        where = where.strip()
        if not where or not self.frames.height:
            return False
        shot = re.fullmatch(r"shot\s*(\d+)", where, flags=re.IGNORECASE)
        if shot:
            rows = np.flatnonzero(self.frames["shot_id"].to_numpy() == int(shot.group(1)))
            if not len(rows):
                self.status.value = _error(f"no frame of shot {shot.group(1)} was extracted")
                return False
            index = int(rows[0])
        else:
            try:
                place = FrameTimecode(where, fps=self.fps)
            except (ValueError, TypeError):
                self.status.value = _error(
                    f"{where!r} is not a time (1:30, 0:01:30.5, 90.5s), a frame number or 'shot N'"
                )
                return False
            # A time by the frames' own times: frame numbers count decoded frames, and on
            # variable-frame-rate footage "7.5s" at the mean rate went to a frame shown at 6.2 s.
            if where.isdigit() or "timestamp_s" not in self.frames.columns:
                index = int(np.abs(self.frames["frame_index"].to_numpy() - place.frame_num).argmin())
            else:
                index = int(np.abs(self.frames["timestamp_s"].to_numpy() - place.get_seconds()).argmin())
        if index == self.frame.value:  # already shown: its boxes stay, the error line goes
            self.status.value = self._where(self.frames.row(index, named=True))
        self.frame.value = index
        return True

    def _typed(self, name: str) -> None:
        """A name typed or picked labels the boxes drawn next, and the boxes drawn without a
        label or under the name typed before (a typo corrected moves them along)."""
        name, before = name.strip(), self.boxes.label
        self._offer_names(read=False)
        self.boxes.bboxes = [
            {**b, "label": name} if b.get("label", "") in ("", before) else b for b in self.boxes.bboxes
        ]
        self.boxes.label = name

    def show(self) -> None:
        """The frame in the box drawer (its boxes cleared); a frame file that cannot be read is
        refused here as :func:`~.stage.add_still` would refuse it."""
        row = self.frames.row(self.frame.value, named=True)
        path = self.run.run_dir / row["path"]
        self.boxes.bboxes = []
        if read_rgb(path) is None:
            self.boxes.image_bytes = b""
            self.status.value = _error(f"frame file {row['path']} cannot be read")
            return
        self.boxes.image_bytes = path.read_bytes()
        self.status.value = self._where(row)

    def _where(self, row: dict[str, Any]) -> str:
        """The status line of the frame ``row`` shown: its id, shot and time in the film."""
        when = FrameTimecode(float(row["timestamp_s"]), fps=self.fps).get_timecode(precision=1)
        return f"{row['frame_id']} (shot {row.get('shot_id')}, {when}): drag a box around the character"

    def drawn(self) -> list[tuple[tuple[int, int, int, int], str]]:
        """The boxes drawn on the frame, (left, top, right, bottom) in the frame's pixels, each
        with its name: its label, or the name typed."""
        out = []
        for b in self.boxes.bboxes:
            left, top = round(b["x"]), round(b["y"])
            box = (left, top, left + round(b["width"]), top + round(b["height"]))
            out.append((box, (b.get("label") or self.name.value).strip()))
        return out

    def add_boxes(self) -> list[Path]:
        """Every box drawn on the frame as a still of its character (the button); the boxes
        written leave the drawer, one a user must fix stays with its reason in the status."""
        frame_id, written, kept, errors = self.frame_id(), [], [], []
        drawn = self.drawn()
        if not drawn:
            self.status.value = _error("no box: drag one around the character first")
            return []
        for b, (box, name) in zip(self.boxes.bboxes, drawn, strict=True):
            path = self.add(frame_id, box, name)
            if path is None:
                kept.append(b)
                errors.append(self.status.value)
            else:
                written.append(path)
        self.boxes.bboxes = kept
        if written:
            names = sorted({p.parent.name for p in written})
            self.still_added.update(names)
            self._hint()
            self.status.value = (
                f"added {len(written)} still(s) to the references of <b>{', '.join(names)}</b>; "
                "rerun stage characters to fit on them"
            )
        if errors:
            self.status.value = "<br>".join([*([self.status.value] if written else []), *errors])
        return written

    def add(self, frame_id: str, box: tuple[int, int, int, int], name: str) -> Path | None:
        """Write one still (as the button does for each box); the file, or None after a user
        error (shown)."""
        try:
            path = add_still(self.run.run_dir, frame_id, box, name.strip(), self.cfg.characters)
        except UserError as exc:
            self.status.value = _error(str(exc))
            return None
        self.status.value = (  # the folder's name: the character as spelt (``lin`` went to ``Lin``)
            f"added {path.name} to <b>{html.escape(path.parent.name)}</b>'s references; "
            "rerun stage characters to fit on it"
        )
        self._offer_names()
        return path

    def _offer_names(self, *, read: bool = True) -> None:
        """The names offered: the known characters (read again from the folder and the faces
        table when ``read``; not on every key typed), and as box labels also the name typed."""
        if read:
            self.name.options = self.known_names()
        typed = self.name.value.strip()
        self.boxes.classes = sorted({*self.name.options, *([typed] if typed else [])})


class SightingConfirmer:
    """Confirm one of a drawn character's likely sightings as a still from the film: pick a
    character (those named in the fewest shots first), look at the strip of places where the
    fitted detector saw it under ``characters.fitted.min_score``
    (:func:`~.sightings.likely_sightings`, surest first, one per shot), type the number of one
    that shows it and press **add still**: the sighting's box goes to its references as a still
    (:func:`~.stage.add_still`), and the next run of stage 03 fits on it.

    Why beside the still picker: a missed character is usually seen already, only weakly, and
    picking it out of twelve is quicker than finding it in the film. On the character truth set,
    kenney_toon's female_person, named in no frame, had five of her five best sightings under the
    threshold on her (docs/characters.md, "Confirm a likely sighting")."""

    def __init__(self, run: Run, cfg: RunConfig):
        self.run, self.cfg = run, cfg
        self.character = widgets.Dropdown(description="character")
        self.image = widgets.Image(format="jpeg", layout=widgets.Layout(max_width="900px"))
        self.number = widgets.BoundedIntText(value=1, min=1, max=1, description="number")
        self.button = widgets.Button(
            description="add still", icon="plus", layout=widgets.Layout(width="110px")
        )
        self.status = widgets.HTML()
        #: The sightings each strip showed, in its numbering: a number typed is one of them.
        self.offered: dict[str, pl.DataFrame] = {}
        #: The sightings added as stills: a second press adds no second copy of one.
        self.added: set[str] = set()
        self.character.observe(lambda change: self.show(change["new"]), names="value")
        self.button.on_click(lambda _: self.confirm(self.character.value, self.number.value))
        self.widget = widgets.VBox(
            [self.character, self.image, widgets.HBox([self.number, self.button]), self.status]
        )
        self.refresh()

    def names(self) -> list[str]:
        """The drawn characters of the fit, the ones named in the fewest shots first."""
        if not self.run.has_table("detections") or not self.run.has_table("faces"):
            return []
        drawn = self.run.read_table("detections").filter(pl.col("kind") == "drawn")["label"].drop_nulls()
        shots = self.run.read_table("faces").group_by("character").agg(pl.col("shot_id").n_unique())
        found = dict(shots.iter_rows())
        return sorted(set(drawn.to_list()), key=lambda name: (found.get(name, 0), name))

    def refresh(self) -> None:
        """Offer the characters again (after a rerun of stage 03) and show the first."""
        names = self.names()
        self.character.options = names
        if not names:
            self.status.value = "no drawn character was searched for: give pictures of one and run stage 03"
            return
        if self.character.value not in names:
            self.character.value = names[0]
        self.show(self.character.value)

    def show(self, name: str | None) -> None:
        """Draw ``name``'s strip of likely sightings, numbered from 1."""
        from diffusion_bunny.stages.characters.plots import face_sheet  # lazy: pulls in plotnine (0.44 s)

        if name is None:
            return
        offered = likely_sightings(self.run, name, self.cfg.characters)
        self.offered[name] = offered
        if offered.is_empty():
            self.image.value = b""
            self.number.max = 1
            self.status.value = (
                f"no likely sighting of {html.escape(name)} under the threshold; add a still of it with "
                "the picker above"
            )
            return
        strip = offered.with_columns(pl.lit(name).alias("character"), pl.lit("drawn").alias("kind"))
        frames = self.run.read_table("frames")
        self.image.value = jpeg_bytes(
            face_sheet(self.run.run_dir, strip, frames, max_per_group=offered.height, columns=6, side=128)
        )
        self.number.max = offered.height
        self.status.value = (
            f"{offered.height} likely sighting(s) of {html.escape(name)}: type the number of one that "
            "shows it"
        )

    def confirm(self, name: str, number: int) -> Path | None:
        """Add sighting ``number`` (1: the first of the strip) of ``name`` as a still; the file, or
        None after a user error (shown)."""
        offered = self.offered.get(name)
        if offered is None or not 1 <= number <= offered.height:
            self.status.value = _error(f"no sighting numbered {number} of {html.escape(str(name))}")
            return None
        row = offered.row(number - 1, named=True)
        if row["face_id"] in self.added:
            self.status.value = f"sighting {number} of {html.escape(name)} is added already"
            return None
        box = (row["left"], row["top"], row["right"], row["bottom"])
        try:
            path = add_still(self.run.run_dir, row["frame_id"], box, name, self.cfg.characters)
        except UserError as exc:
            self.status.value = _error(str(exc))
            return None
        self.added.add(row["face_id"])
        self.status.value = (
            f"added {path.name} to <b>{html.escape(path.parent.name)}</b>'s references; rerun stage "
            "characters to fit on it"
        )
        return path
