"""Stage 02's text scores and text rules: title cards, credits and burned-in subtitles.

Scores (computed once per frame, on the frames the other rules keep, and stored in the
``quality`` table): the lines of text the detector finds in the shot's picture box
(:mod:`diffusion_bunny.models.text`), each with its box as shares of the picture (``left``,
``top``, ``right``, ``bottom``), the detector's confidence, the share of the picture's area it
covers (``area``) and the share of the picture's edges it holds (``edges``: gradient magnitude
above a noise floor). A frame the detector looked at has a list (empty when it found no text); a
frame it did not look at has null.

Rules (pure over those scores, so notebook 02's sliders move them without detecting again):

* **subtitles**: up to :data:`MAX_SUBTITLE_LINES` lines whose centre lies in the bottom (or top)
  ``subtitle_band`` of the picture, centred horizontally (within :data:`SUBTITLE_CENTRE` of the
  middle) and :data:`SUBTITLE_HEIGHT` high: burned-in subtitles. A logo in a
  corner, a sign off-centre or a credits list (more lines) is not one;
* **text**: the other lines hold more than ``max_text_share`` of the edges of the picture left
  once the subtitles are taken out (title cards and credits on black or on colour: nearly every
  edge is a letter), or cover more than ``max_text_area`` of it (a page, a text-heavy insert,
  whatever the background). A sign or a book in a scene holds a small share of a scene's edges
  and is kept; so is a mark in a corner (a timecode, a channel's logo: :func:`corner_marks`),
  weighed as subtitles are, however few edges the rest of a dark picture has;
* a frame with subtitles and no other text is cropped (``quality.subtitles: crop``: the crop is
  the picture box above the top of the subtitles, or below their bottom for top subtitles, with
  a quarter of a line's height to spare), dropped (``drop``: reason ``subtitles``; also when the
  crop would keep less than ``min_crop_height`` of the picture) or kept as it is (``keep``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import polars as pl

from diffusion_bunny.media.images import BOX_COLUMNS, decode_picture, frame_box
from diffusion_bunny.pipeline.progress import map_tracked

if TYPE_CHECKING:
    from diffusion_bunny.models.text import TextDetector
    from diffusion_bunny.stages.quality.settings import QualitySettings

#: One detected line, as stored in the ``text_lines`` column (shares of the picture box).
LINE_STRUCT = pl.Struct(
    {
        "left": pl.Float32,
        "top": pl.Float32,
        "right": pl.Float32,
        "bottom": pl.Float32,
        "score": pl.Float32,
        "area": pl.Float32,
        "edges": pl.Float32,
    }
)
TEXT_SCHEMA = {
    "text_lines": pl.List(LINE_STRUCT),
    "text_area": pl.Float64,
    "text_share": pl.Float64,
    "text_key": pl.Utf8,
}
CROP_COLUMNS = ("crop_left", "crop_top", "crop_right", "crop_bottom")

#: Gradient magnitudes (Sobel, 0-255 gray) under this are sensor noise, JPEG ringing or the
#: slope of a smooth gradient, not edges: a coloured gradient behind a title is no detail.
EDGE_FLOOR = 24.0
#: Subtitles: at most this many lines per band, centred within this share of the width, and
#: a line this high (a share of the picture's height, as the detector's box, which its unclip
#: step grows by about half the letters' height).
MAX_SUBTITLE_LINES = 3
SUBTITLE_CENTRE = 0.2
SUBTITLE_HEIGHT = (0.02, 0.16)
#: A "line" whose box is about as wide as it is high (width over height, in pixels, inside this
#: range) and higher than :data:`BLOB_HEIGHT` of the picture is not read as text: DBNet draws such
#: a box round a drawn figure on a plain background (a cartoon penguin on snow: one box of half
#: the picture's height holding 90 % of its edges, so the frame was dropped as a title card).
#: Lines of text are wider than high (a word of two letters is about 1.5x at the detector's box)
#: or, set vertically, far higher than wide; and a letter half the picture high is no subtitle.
BLOB_ASPECT = (0.5, 1.3)
BLOB_HEIGHT = 0.2


# ------------------------------------------------------------------------------ scores


def measure_text(picture: np.ndarray, detector: TextDetector, width: int) -> dict[str, Any]:
    """The text scores of one picture (BGR): its lines (shares of the picture), the share of
    the area and of the edges they cover, measured on a copy ``width`` pixels wide."""
    h, w = picture.shape[:2]
    if w != width:
        size = (width, max(16, round(width * h / w)))
        picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA if w > width else cv2.INTER_LINEAR)
        h, w = picture.shape[:2]
    lines = sorted(detector.detect(picture), key=lambda line: -line.score)
    gray = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    # Sobel's 3x3 kernel sums to 4x the step: a step of 255 gray levels gives 1020.
    edges = np.maximum(cv2.magnitude(gx, gy) / 4.0 - EDGE_FLOOR, 0.0)
    label = np.zeros((h, w), np.int32)
    # Each pixel belongs to at most one line (the most confident), so shares never add past 1.
    for k, line in enumerate(lines, start=1):
        x0, y0 = max(0, math.floor(line.left)), max(0, math.floor(line.top))
        x1, y1 = min(w, math.ceil(line.right)), min(h, math.ceil(line.bottom))
        region = label[y0:y1, x0:x1]
        region[region == 0] = k
    counts = np.bincount(label.ravel(), minlength=len(lines) + 1)
    energy = np.bincount(label.ravel(), weights=edges.ravel(), minlength=len(lines) + 1)
    total = float(energy.sum())
    rows = []
    for k, line in enumerate(lines, start=1):
        rows.append(
            {
                "left": line.left / w,
                "top": line.top / h,
                "right": line.right / w,
                "bottom": line.bottom / h,
                "score": line.score,
                "area": counts[k] / (h * w),
                "edges": energy[k] / total if total > 0 else 0.0,
            }
        )
    rows.sort(key=lambda r: (r["top"], r["left"]))
    return {
        "text_lines": rows,
        "text_area": float(sum(r["area"] for r in rows)),
        "text_share": float(sum(r["edges"] for r in rows)),
    }


def text_key(detector_key: str, width: int, box: tuple[int, int, int, int] | None, file_bytes: int) -> str:
    """What a frame's text scores depend on: the detector, the width it looked at, the picture
    box and the frame file (its size): a stored score is reused only while all four match."""
    return f"{detector_key}|w{width}|box{box}|bytes{file_bytes}"


def detect_text(
    run_dir: str | Path,
    frames: pl.DataFrame,
    detector: TextDetector,
    width: int,
    *,
    workers: int | None = None,
    progress: bool = True,
    progress_path: Path | None = None,
) -> pl.DataFrame:
    """Text scores (``frame_id`` + :data:`TEXT_SCHEMA`) of every row of ``frames``, on a thread
    pool (ONNX Runtime and OpenCV release the GIL). A frame that cannot be read gets null scores:
    stage 02's ``unreadable`` rule has already said so."""
    run_dir = Path(run_dir)
    box_columns = [c for c in BOX_COLUMNS if c in frames.columns]
    rows = frames.select("frame_id", "path", "width", "height", *box_columns).to_dicts()

    def one(row: dict[str, Any]) -> dict[str, Any]:
        path = run_dir / row["path"]
        box = frame_box(row, row["width"], row["height"])
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            return {"frame_id": row["frame_id"]}
        picture = decode_picture(data, box, min_width=width)
        if picture is None:
            return {"frame_id": row["frame_id"]}
        return {
            "frame_id": row["frame_id"],
            **measure_text(picture, detector, width),
            "text_key": text_key(detector.key, width, box, int(data.size)),
        }

    out = map_tracked(one, rows, desc="text", workers=workers, progress=progress, progress_path=progress_path)
    return pl.DataFrame(out, schema={"frame_id": pl.Utf8, **TEXT_SCHEMA})


def current_keys(run_dir: str | Path, frames: pl.DataFrame, detector_key: str, width: int) -> dict[str, str]:
    """The text key each frame would get now (see :func:`text_key`), without decoding it."""
    run_dir = Path(run_dir)
    box_columns = [c for c in BOX_COLUMNS if c in frames.columns]
    keys = {}
    for row in frames.select("frame_id", "path", "width", "height", *box_columns).iter_rows(named=True):
        path = run_dir / row["path"]
        size = path.stat().st_size if path.is_file() else -1
        keys[row["frame_id"]] = text_key(
            detector_key, width, frame_box(row, row["width"], row["height"]), size
        )
    return keys


# ------------------------------------------------------------------------------- rules


def _subtitle_lines(lines: list[dict[str, float]], band: float) -> tuple[list[int], list[int]]:
    """Indices of the lines that are subtitles at the bottom and at the top."""
    bottom, top = [], []
    for i, line in enumerate(lines):
        h = line["bottom"] - line["top"]
        cx = (line["left"] + line["right"]) / 2
        cy = (line["top"] + line["bottom"]) / 2
        if not (SUBTITLE_HEIGHT[0] <= h <= SUBTITLE_HEIGHT[1]) or abs(cx - 0.5) > SUBTITLE_CENTRE:
            continue
        if cy >= 1.0 - band:
            bottom.append(i)
        elif cy <= band:
            top.append(i)
    return (
        bottom if len(bottom) <= MAX_SUBTITLE_LINES else [],
        top if len(top) <= MAX_SUBTITLE_LINES else [],
    )


def is_blob(line: dict[str, float], aspect: float | None) -> bool:
    """Whether ``line`` (shares of a picture ``aspect`` times as wide as high) is shaped like a
    figure rather than text (see :data:`BLOB_ASPECT`). Without the picture's aspect, no line is."""
    height = line["bottom"] - line["top"]
    if aspect is None or height < BLOB_HEIGHT:
        return False
    ratio = (line["right"] - line["left"]) * aspect / height
    return BLOB_ASPECT[0] <= ratio <= BLOB_ASPECT[1]


def text_verdict(
    lines: list[dict[str, float]] | None, cfg: QualitySettings, aspect: float | None = None
) -> tuple[str | None, float, float]:
    """``(reason, crop_top, crop_bottom)`` of one frame from its text lines: reason ``text``,
    ``subtitles`` or None, and the rows of the picture to keep as shares of its height (0, 1
    when nothing is cropped). None lines (not looked at) keep the frame whole. ``aspect``: the
    picture's width over its height, for :func:`is_blob` (lines shaped like figures are left
    out)."""
    lines, bottom, top, (share, area) = _weighed(lines, cfg, aspect)
    if not lines:
        return None, 0.0, 1.0
    if share > cfg.max_text_share or area > cfg.max_text_area:
        return "text", 0.0, 1.0
    if not (bottom or top) or cfg.subtitles == "keep":
        return None, 0.0, 1.0
    if cfg.subtitles == "drop":
        return "subtitles", 0.0, 1.0
    crop_top, crop_bottom = 0.0, 1.0
    if bottom:
        pad = 0.25 * float(np.median([lines[i]["bottom"] - lines[i]["top"] for i in bottom]))
        crop_bottom = max(0.0, min(lines[i]["top"] for i in bottom) - pad)
    if top:
        pad = 0.25 * float(np.median([lines[i]["bottom"] - lines[i]["top"] for i in top]))
        crop_top = min(1.0, max(lines[i]["bottom"] for i in top) + pad)
    if crop_bottom - crop_top < cfg.min_crop_height:
        return "subtitles", 0.0, 1.0
    return None, crop_top, crop_bottom


def _weighed(
    lines: list[dict[str, float]] | None, cfg: QualitySettings, aspect: float | None
) -> tuple[list[dict[str, float]], list[int], list[int], tuple[float, float]]:
    """What the text rule weighs in one frame: its lines but those shaped like figures, the
    indices of the subtitle lines among them at the bottom and at the top, and the share of the
    edges and of the area the other lines hold over what the subtitles leave (0, 0 when there
    are none). :func:`text_verdict` cuts by it, the histograms draw it."""
    kept = [line for line in lines or () if not is_blob(line, aspect)]
    bottom, top = _subtitle_lines(kept, cfg.subtitle_band) if kept else ([], [])
    marks = corner_marks(kept, cfg.subtitle_band)
    return kept, bottom, top, _judged(kept, set(bottom) | set(top) | set(marks))


#: A line that lies wholly within this share of the picture's width from its left or right edge,
#: and within ``subtitle_band`` of its top or bottom, is a corner mark (:func:`corner_marks`): a
#: timecode at 28 px in a 640 px picture reaches 33% of its width; a title across the middle
#: starts and ends on either side of 40-60%.
CORNER_SIDE = 0.4


#: The most of the picture a corner mark covers: the Hamilton clip's timecode covered 2.3%.
CORNER_AREA = 0.04


def corner_marks(lines: list[dict[str, float]], band: float) -> list[int]:
    """Indices of the lines that are marks in a corner of the picture: a burned-in timecode, a
    channel's logo, a watermark, each the one small line of its corner. They are weighed as
    subtitles are, out of the text rule's share.

    Why: the rule's share is of the picture's edges, and a dark, flat picture has few: on the
    Hamilton clip's dark stage a small timecode in the top-left corner (2% of the picture) held
    51-77% of the edges, and every frame of three of its four shots was dropped as ``text``,
    without a word (the corner logo alone held 22%). Credits set in a corner ("A FILM BY", a
    name under it) are several lines there, or a large one: still text."""
    corners: dict[tuple[bool, bool], list[int]] = {}
    for i, line in enumerate(lines):
        left, right = line["right"] <= CORNER_SIDE, line["left"] >= 1.0 - CORNER_SIDE
        top, bottom = line["bottom"] <= band, line["top"] >= 1.0 - band
        if (left or right) and (top or bottom):
            corners.setdefault((left, top), []).append(i)
    return [
        found[0] for found in corners.values() if len(found) == 1 and lines[found[0]]["area"] <= CORNER_AREA
    ]


def _judged(lines: list[dict[str, float]], subs: set[int]) -> tuple[float, float]:
    """The share of the edges and of the area the lines that are no subtitles hold, over what the
    subtitles leave (0, 0 when every line is one)."""
    rest = [line for i, line in enumerate(lines) if i not in subs]
    if not rest:
        return 0.0, 0.0
    sub_edges = sum(lines[i]["edges"] for i in subs)
    sub_area = sum(lines[i]["area"] for i in subs)
    share = sum(line["edges"] for line in rest) / max(1e-6, 1.0 - sub_edges)
    area = sum(line["area"] for line in rest) / max(1e-6, 1.0 - sub_area)
    return share, area


def _lines_and_aspects(
    table: pl.DataFrame, frames: pl.DataFrame | None
) -> Iterator[tuple[Any, float | None]]:
    """Each row's text lines (None: not looked at) with its picture's width over height."""
    lines_col = table["text_lines"].to_list() if "text_lines" in table.columns else [None] * table.height
    return zip(lines_col, picture_aspects(table["frame_id"], frames), strict=True)


def judged_text(
    table: pl.DataFrame, cfg: QualitySettings, frames: pl.DataFrame | None = None
) -> pl.DataFrame:
    """``frame_id`` and the two numbers the text rule cuts per frame (``text_share_judged``,
    ``text_area_judged``: its lines that are neither subtitles nor shaped like figures, over what
    subtitles leave; null where the text was not looked at), for the histograms: the stored
    ``text_share`` counts every line, so a kept frame with a subtitle drew right of the line and a
    frame dropped for text left of it."""
    shares: list[float | None] = []
    areas: list[float | None] = []
    for lines, aspect in _lines_and_aspects(table, frames):
        share, area = (None, None) if lines is None else _weighed(lines, cfg, aspect)[3]
        shares.append(share)
        areas.append(area)
    return pl.DataFrame(
        {
            "frame_id": table["frame_id"],
            "text_share_judged": pl.Series(shares, dtype=pl.Float64),
            "text_area_judged": pl.Series(areas, dtype=pl.Float64),
        }
    )


def text_rules(table: pl.DataFrame, cfg: QualitySettings, frames: pl.DataFrame | None = None) -> pl.DataFrame:
    """``frame_id``, ``text_reason`` and the kept rows (``_crop_top``, ``_crop_bottom``, shares
    of the picture's height) for every row of ``table`` (which has ``text_lines``). ``frames``
    (``frame_id``, ``width``, ``height`` and the picture box) gives each picture's aspect."""
    reasons, tops, bottoms = [], [], []
    for lines, aspect in _lines_and_aspects(table, frames):
        reason, top, bottom = text_verdict(lines, cfg, aspect) if cfg.text_filter else (None, 0.0, 1.0)
        reasons.append(reason)
        tops.append(top)
        bottoms.append(bottom)
    return pl.DataFrame(
        {
            "frame_id": table["frame_id"],
            "text_reason": pl.Series(reasons, dtype=pl.Utf8),
            "_crop_top": pl.Series(tops, dtype=pl.Float64),
            "_crop_bottom": pl.Series(bottoms, dtype=pl.Float64),
        }
    )


def picture_boxes(frames: pl.DataFrame | None) -> dict[str, tuple[int, int, int, int] | None]:
    """Each frame's picture box in its pixels (left, top, right, bottom): the box stage 01 found,
    else the whole frame; None where ``frames`` knows neither."""
    if frames is None:
        return {}
    columns = [c for c in ("width", "height", *BOX_COLUMNS) if c in frames.columns]
    out: dict[str, tuple[int, int, int, int] | None] = {}
    for row in frames.select("frame_id", *columns).to_dicts():
        width, height = row.get("width"), row.get("height")
        box = frame_box(row, width, height)
        if box is None and width and height:
            box = (0, 0, int(width), int(height))
        out[row["frame_id"]] = box
    return out


def picture_aspects(frame_ids: pl.Series, frames: pl.DataFrame | None) -> list[float | None]:
    """Width over height of each frame's picture box (None where ``frames`` does not know it)."""
    boxes = picture_boxes(frames)
    out: list[float | None] = []
    for frame_id in frame_ids.to_list():
        box = boxes.get(frame_id)
        out.append(None if box is None else (box[2] - box[0]) / max(1, box[3] - box[1]))
    return out


def crop_boxes(table: pl.DataFrame, frames: pl.DataFrame) -> pl.DataFrame:
    """The ``crop_*`` columns (Int64, frame pixels): the picture box, less the rows
    ``_crop_top``/``_crop_bottom`` leave out. ``table`` has ``frame_id`` and those two columns."""
    boxes = picture_boxes(frames)
    ids = frames["frame_id"].to_list()
    left, top, right, bottom = ([b[k] if b else None for b in map(boxes.get, ids)] for k in range(4))
    full = pl.DataFrame(
        {"frame_id": ids, "_l": left, "_t": top, "_r": right, "_b": bottom},
        schema={"frame_id": pl.Utf8, "_l": pl.Int64, "_t": pl.Int64, "_r": pl.Int64, "_b": pl.Int64},
    )
    joined = table.select("frame_id", "_crop_top", "_crop_bottom").join(full, on="frame_id", how="left")
    height = (pl.col("_b") - pl.col("_t")).cast(pl.Float64)
    return joined.select(
        "frame_id",
        pl.col("_l").alias("crop_left"),
        (pl.col("_t") + (pl.col("_crop_top") * height).ceil().cast(pl.Int64)).alias("crop_top"),
        pl.col("_r").alias("crop_right"),
        (pl.col("_t") + (pl.col("_crop_bottom") * height).floor().cast(pl.Int64)).alias("crop_bottom"),
    )


def unchecked_kept(table: pl.DataFrame) -> pl.Series:
    """Frame ids kept by the rules whose text was never looked at (sliders moved after the
    stage ran): the stage detects them on its next run."""
    if "text_lines" not in table.columns:
        return table.filter(pl.col("keep"))["frame_id"]
    return table.filter(pl.col("keep") & pl.col("text_lines").is_null())["frame_id"]
