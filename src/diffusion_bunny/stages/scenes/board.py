"""The review board of stage 04: the clusters as folders of thumbnails in JupyterLab, where a
person drags a frame into the folder it belongs to.

Every move is written to disk at once by
:func:`diffusion_bunny.stages.scenes.stage.move_to_cluster` (one ``feedback`` row,
``clusters`` updated, under a file lock), and the folders are then read back from disk with
:func:`diffusion_bunny.stages.scenes.stage.board_state`. The board keeps no state of its
own beyond what it shows, so a kernel restart loses nothing and a board rebuilt later (or open
in a second notebook, after **reload**) shows every move made so far.

The front end (``static/board.js``, ``static/board.css``) is an anywidget module: it draws the
folders, and turns a drag, a click on **move here** or a key into one ``{"type": "move"}``
message; the same path is callable from Python (:meth:`ReviewBoard.move`), which is how the
Python tests drive it.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path
from typing import Any

import anywidget
import traitlets
from PIL import Image

from diffusion_bunny.errors import UserError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.scenes.settings import ScenesSettings
from diffusion_bunny.stages.scenes.stage import board_state, move_to_cluster

STATIC = Path(__file__).parent / "static"
VIEWS = ("scene", "character")
# Thumbnails travel inside the widget's state (base64 in JSON), and the stage 01 thumbnails are
# 320 px wide (~24 kB); the board shows them ~100 px wide, so a 160 px copy (~6 kB) keeps them
# sharp on a high-density screen at a quarter of the bytes for a board of thousands of frames.
THUMB_WIDTH = 160

log = logging.getLogger(__name__)


def thumb_data_url(path: str | Path | None, width: int = THUMB_WIDTH) -> str | None:
    """A ``data:image/jpeg;base64,...`` URL of a thumbnail no wider than ``width``, or None when
    the file is missing or unreadable (the board then shows a placeholder, not an error)."""
    if path is None:
        return None
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width > width:
                image = image.convert("RGB")
                image.thumbnail((width, width * 4))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=82)
                data = buf.getvalue()
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


class ReviewBoard(anywidget.AnyWidget):
    """Folders of thumbnails, one per cluster of the run (noise bucket last), at the ``scene``
    or the ``character`` level; drag a frame onto a folder (or select it and press the folder's
    key) to move it there.

    ``folders`` holds what the front end draws: per folder ``id``, ``name``, ``count``, ``key``
    (the keyboard shortcut: ``1``, ``2``... by size when the board first drew the folder, then
    kept, with the folder's place, while the board lives; ``n`` for noise), ``more`` (frames
    beyond ``max_thumbs``, not drawn) and ``frames`` (``frame_id``, ``similarity``, ``shot_id``,
    ``timestamp_s``, ``manual``). ``thumbs`` maps frame ids to data URLs and only grows, so a move
    resends the folder list but no picture already in the browser.
    """

    _esm = STATIC / "board.js"
    _css = STATIC / "board.css"

    view = traitlets.Enum(VIEWS, default_value="scene").tag(sync=True)
    folders = traitlets.List(traitlets.Dict()).tag(sync=True)
    thumbs = traitlets.Dict().tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    status_kind = traitlets.Enum(("info", "ok", "error"), default_value="info").tag(sync=True)

    def __init__(
        self,
        run: Run | str | Path,
        *,
        view: str = "scene",
        max_thumbs: int | None = None,
        **kwargs: Any,
    ):
        self.run_dir = Path(run.run_dir if isinstance(run, Run) else run)
        self.max_thumbs = ScenesSettings().board_max_thumbs if max_thumbs is None else int(max_thumbs)
        if self.max_thumbs < 1:
            raise ValueError(f"max_thumbs must be at least 1, not {self.max_thumbs}")
        self.moves: list[dict[str, Any]] = []  # feedback rows written through this board
        self.last_error: str | None = None
        #: Each folder's key and place on the board, per view, kept while the board lives: given
        #: by size when first drawn, then fixed. By size on every refresh, a move changed them
        #: (pressing 3 again sent the next frame to another folder).
        self.folder_keys: dict[str, dict[str, str]] = {}
        super().__init__(view=view, **kwargs)
        self.on_msg(self._on_message)
        self.observe(lambda _: self.refresh(), names="view")
        self.refresh()

    # -- reading ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the folders of the current view from disk and send them to the browser."""
        state = list(board_state(self.run_dir, self.view))
        if not any(folder["id"] == "noise" for folder in state):
            # The noise bucket stays on the board when empty: it is where a stray frame is dragged.
            state.append({"id": "noise", "name": "noise", "count": 0, "frames": []})
        folders: list[dict[str, Any]] = []
        wanted: dict[str, Any] = {}
        keys = self.folder_keys.setdefault(self.view, {})
        for folder in state:
            if folder["id"] not in keys:
                numbered = [int(k) for k in keys.values() if k.isdigit()]
                keys[folder["id"]] = "n" if folder["id"] == "noise" else str(max(numbered, default=0) + 1)
        # the board's order is the keys' (noise last); a folder emptied keeps its key for the board's life
        state.sort(key=lambda f: (keys[f["id"]] == "n", int(keys[f["id"]]) if keys[f["id"]].isdigit() else 0))
        for folder in state:
            frames = list(folder["frames"])
            shown = frames[: self.max_thumbs]
            key = keys[folder["id"]]
            folders.append(
                {
                    "id": folder["id"],
                    "name": folder["name"],
                    "count": int(folder["count"]),
                    "key": key,
                    "more": max(0, int(folder["count"]) - len(shown)),
                    "frames": [_frame_for_browser(f) for f in shown],
                }
            )
            for frame in shown:
                if frame["frame_id"] not in self.thumbs:
                    wanted[frame["frame_id"]] = frame.get("thumb")
        if wanted:
            # A new dict (not an update in place): traitlets sends a Dict only on reassignment.
            self.thumbs = {**self.thumbs, **{fid: thumb_data_url(path) for fid, path in wanted.items()}}
        self.folders = folders

    def folder_of(self, frame_id: str) -> str | None:
        """The folder a frame is drawn in now (None when it is not drawn: beyond max_thumbs)."""
        for folder in self.folders:
            if any(f["frame_id"] == frame_id for f in folder["frames"]):
                return folder["id"]
        return None

    # -- moving ----------------------------------------------------------------------------------

    def move(self, frame_id: str, cluster_id: str) -> dict[str, Any] | None:
        """Move a frame to a folder of the current view, as a drop on the board does: the
        feedback row written, or None when the move was refused (the reason is on the status
        line and in :attr:`last_error`)."""
        try:
            row = move_to_cluster(self.run_dir, frame_id, cluster_id, level=self.view)
        except UserError as exc:
            self._say(f"not moved: {exc}", "error")
            return None
        except Exception as exc:  # a bug: keep the board usable, put the traceback in the log
            log.exception("review board: moving %s to %s failed", frame_id, cluster_id)
            self._say(
                f"not moved, unexpected {type(exc).__name__}: {exc} (a bug; see the kernel log)", "error"
            )
            return None
        self.moves.append(row)
        self.refresh()
        target = row.get("to_cluster", cluster_id)
        name = next((f["name"] for f in self.folders if f["id"] == target), target)
        self._say(
            f"moved {row.get('anchor_id', frame_id)} from {row.get('from_cluster')} to {name} "
            f"({len(self.moves)} move{'s' if len(self.moves) != 1 else ''} saved)",
            "ok",
        )
        return row

    def _say(self, text: str, kind: str) -> None:
        self.last_error = text if kind == "error" else None
        self.status_kind = kind
        self.status = text

    def _on_message(self, _widget: Any, content: dict[str, Any], _buffers: list[bytes]) -> None:
        """Messages from the front end: ``move`` (frame_id, cluster_id, level) and ``refresh``.
        Every message is answered with ``done`` once the folders and the status are current."""
        kind = content.get("type") if isinstance(content, dict) else None
        try:
            if kind == "move":
                level = content.get("level", self.view)
                if level != self.view:
                    # The person toggled the view while the drop was on its way: the ids belong
                    # to the other level, so moving now would file it in the wrong table rows.
                    self._say(f"not moved: the board switched to the {self.view} view; try again", "error")
                else:
                    self.move(str(content.get("frame_id", "")), str(content.get("cluster_id", "")))
            elif kind == "refresh":
                self.refresh()
                self._say("folders read again from disk", "info")
            else:
                self._say(f"unknown message from the board: {kind!r}", "error")
        finally:
            self.send({"type": "done"})


def _frame_for_browser(frame: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe fields of one frame of :func:`~.stage.board_state` that the front end shows."""
    similarity = frame.get("similarity")
    timestamp = frame.get("timestamp_s")
    shot = frame.get("shot_id")
    return {
        "frame_id": str(frame["frame_id"]),
        "similarity": None if similarity is None or math.isnan(similarity) else round(float(similarity), 4),
        "shot_id": None if shot is None else int(shot),
        "timestamp_s": None if timestamp is None else round(float(timestamp), 3),
        "manual": bool(frame.get("manual") or False),
    }
