"""Stage 03's figures: faces per character, screen time along the movie, appearances per character
or cluster (faces and drawn characters, numbered for the fixer), and what was taken from each
reference picture.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.figures import (
    Block,
    Layout,
    Tile,
    categorical,
    horizontal_bars,
    largest_first,
    minimal_theme,
    tile_sheet,
)
from diffusion_bunny.models.faces import detect, read_rgb

# ---------------------------------------------------------------------------------------------
# Stage 03: characters

UNKNOWN = "unknown"


def character_counts_plot(counts: pl.DataFrame) -> p9.ggplot:
    """Faces per character (from :func:`~diffusion_bunny.stages.characters.stage.character_counts`),
    the low-confidence share darker, unknown faces in gray."""
    df = (
        counts.select(
            "character",
            (pl.col("faces") - pl.col("low_confidence")).alias("confident"),
            pl.col("low_confidence").alias("low confidence"),
        )
        .unpivot(index="character", variable_name="match", value_name="n")
        # Nobody matched the unknown faces: they were drawn as "confident" matches.
        .with_columns(
            pl.when(pl.col("character") == UNKNOWN).then(pl.lit(UNKNOWN)).otherwise("match").alias("match")
        )
        .to_pandas()
    )
    return horizontal_bars(
        df,
        "character",
        "n",
        "match",
        order=counts["character"].to_list()[::-1],
        by_order=["low confidence", "confident", UNKNOWN],
        colours={"confident": "#4C78A8", "low confidence": "#F58518", UNKNOWN: "#BDBDBD"},
        labels={"x": "", "y": "faces", "fill": "", "title": f"{int(counts['faces'].sum())} faces"},
    )


def screen_time_plot(faces: pl.DataFrame, shots: pl.DataFrame) -> p9.ggplot:
    """Character by time: a bar over every shot in which a sampled frame shows the character, a
    dot at each frame where the face was found (hollow for low-confidence matches)."""
    named = faces.with_columns(pl.col("character").fill_null(UNKNOWN))
    spans = (
        named.select("character", "shot_id")
        .unique()
        .join(shots.select("shot_id", "start_s", "end_s"), on="shot_id")
        .to_pandas()
    )
    points = named.select("character", "timestamp_s", "low_confidence").to_pandas()
    chars = [c for c in named["character"].unique().sort().to_list() if c != UNKNOWN]
    order = ([UNKNOWN] if UNKNOWN in set(named["character"]) else []) + chars[::-1]
    for df in (spans, points):
        df["character"] = categorical(df["character"], order)
    seconds = {
        c: float((spans[spans["character"] == c]["end_s"] - spans[spans["character"] == c]["start_s"]).sum())
        for c in order
    }
    total = float(shots["end_s"].max() or 0.0)
    title = "screen time: " + ", ".join(f"{c} {seconds[c]:.0f}s" for c in order[::-1])
    points["match"] = points["low_confidence"].map({True: "low confidence", False: "confident"})
    points.loc[points["character"] == UNKNOWN, "match"] = UNKNOWN  # matched nobody: not "confident"
    return (
        p9.ggplot()
        + p9.geom_segment(
            spans,
            p9.aes(x="start_s", xend="end_s", y="character", yend="character"),
            size=6,
            colour="#9ECAE9",
        )
        + p9.geom_point(
            points, p9.aes(x="timestamp_s", y="character", shape="match"), size=2.2, colour="#1F4E79"
        )
        + p9.scale_shape_manual(values={"confident": "o", "low confidence": "x", UNKNOWN: "."})
        + p9.scale_x_continuous(limits=(0, max(total, 1e-6)))
        + p9.labs(x="time in the movie (s)", y="", shape="", title=title)
        + minimal_theme(9, max(2.0, 0.5 * len(order) + 1.2), names=order)
    )


def appearance_label(row: dict) -> str:
    """A tile's few characters: a drawn character's score (``d0.83``: the fitted detector's peak),
    a face's distance to its character's nearest reference (``~`` when unknown: the distance to
    the nearest character), ``face`` for a face with neither (named after the drawn figure it
    lies on, or no reference photo to measure against), ``fixed`` for a name given by hand."""
    if row.get("edited"):
        return "fixed"
    if row.get("kind") == "drawn":
        return f"d{row.get('detector_score') or 0:.2f}"
    distance, nearest = row.get("distance"), row.get("nearest_distance")
    if distance is not None:
        return f"{distance:.2f}"
    return f"~{nearest:.2f}" if nearest is not None else "face"


def sheet_order(faces: pl.DataFrame, group: str = "character") -> pl.DataFrame:
    """The rows of one block of :func:`face_sheet` in the order it numbers them (surest first).
    Stable (as is :func:`face_sheet`'s join): the unknown faces and the drawn characters have no
    distance, and notebook 03's fixer, which numbers its own copy of this order, must find under
    a number the face the strip shows there."""
    if "distance" in faces.columns:
        return faces.sort("distance", nulls_last=True, maintain_order=True)
    return faces


def reference_sheet(taken: list[dict], *, side: int = 120) -> Image.Image:
    """What stage 03 took from each reference picture (the manifest's ``references_taken``): per
    character, each picture cut to the part used, labelled with how it was separated (``face
    box``, ``transparency``, ``grabcut``, ``rare colours``); a drawn character's cut-out is shown
    as the fitted detector learns it, on grey where its background was taken away (from the
    run's saved cut-out, or the picture's box when that file is gone); a picture left out is
    shown whole, framed in red (its reason is in the stage's warnings)."""
    by_character: dict[str, list[dict]] = {}
    for t in taken:
        by_character.setdefault(t["character"], []).append(t)
    blocks = []
    for name, pictures in by_character.items():
        tiles = []
        for t in pictures:
            left_out = t["use"] == "left out"
            shown = Path(t["cutout"]) if t.get("cutout") and Path(t["cutout"]).is_file() else None
            tiles.append(
                Tile(
                    shown or Path(t["path"]),
                    label="left out" if left_out else t["how"],
                    label_colour="#C0392B" if left_out else "#444444",
                    outline="#C0392B" if left_out else None,
                    crop=None if left_out or shown or not t["box"] else tuple(t["box"]),
                    missing="unreadable",
                )
            )
        used = sum(t["use"] != "left out" for t in pictures)
        kind = {"face": "human face", "cutout": "drawn"}.get(
            next((t["use"] for t in pictures if t["use"] != "left out"), ""), "unusable"
        )
        blocks.append(Block(tiles, title=f"{name} ({kind}): {used} of {len(pictures)} pictures used"))
    return tile_sheet(blocks, Layout((side, side), 8, fit="contain"))


def sheet_title(name: str, members: pl.DataFrame, shown: int, low: int, first: int = 1) -> str:
    """A block's title on the sheet: how many of the group's appearances it shows (which ones,
    from ``first`` past the first: a page of notebook 03's fixer), called faces only when every
    one is a face (a drawn character's box frames its whole figure)."""
    kinds = set(members["kind"].fill_null("face")) if "kind" in members.columns else {"face"}
    noun = "faces" if kinds <= {"face"} else "appearances"
    if first > 1:
        last = min(members.height, first + shown - 1)
        return f"{name}  ({noun} {first}-{last} of {members.height}, {low} low confidence)"
    return f"{name}  ({min(members.height, shown)} of {members.height} {noun}, {low} low confidence)"


def face_sheet(
    run_dir: str | Path,
    faces: pl.DataFrame,
    frames: pl.DataFrame,
    *,
    group: str = "character",
    max_per_group: int = 12,
    columns: int = 12,
    side: int = 96,
    first: int = 1,
) -> Image.Image:
    """One block per character (or per cluster with ``group="cluster"``): face crops, each
    labelled with its distance; low-confidence matches get an orange frame.

    Crops come from the full frames (boxes are full-resolution pixels); each frame file is opened
    once however many faces it holds. A block shows ``max_per_group`` appearances from number
    ``first`` on: notebook 03's fixer pages through a character's, since the least sure ones, the
    ones to check, come last.
    """
    run_dir = Path(run_dir)
    rows = faces.with_columns(pl.col(group).fill_null(UNKNOWN)).join(
        frames.select("frame_id", "path"), on="frame_id", how="left", maintain_order="left"
    )
    blocks = []
    for name in largest_first(rows, group, last=UNKNOWN):
        members = sheet_order(rows.filter(pl.col(group) == name))
        low = int(members["low_confidence"].sum()) if "low_confidence" in members.columns else 0
        tiles = []
        page = members.slice(first - 1, max_per_group)
        for number, row in enumerate(page.iter_rows(named=True), start=first):
            pad = round(0.15 * (row["bottom"] - row["top"]))
            box = (row["left"] - pad, row["top"] - pad, row["right"] + pad, row["bottom"] + pad)
            tiles.append(
                Tile(
                    run_dir / row["path"] if row["path"] else None,
                    label=f"#{number} {appearance_label(row)} s{row['shot_id']}",
                    label_colour="#F58518" if row.get("low_confidence") else "#444444",
                    outline="#F58518"
                    if row.get("low_confidence")
                    else ("#2E86C1" if row.get("edited") else None),
                    crop=box,
                )
            )
        blocks.append(Block(tiles, title=sheet_title(name, members, max_per_group, low, first)))
    return tile_sheet(blocks, Layout((side, side), min(columns, max_per_group)))


# ---------------------------------------------------------------------------------------------
# Detector preview


def preview_frame_ids(frames: pl.DataFrame, faces: pl.DataFrame, n: int = 4) -> list[str]:
    """``n`` frames to try a detector on: the frames with the most faces first (where detectors
    differ most), then frames spread over the movie."""
    busiest = (
        faces.group_by("frame_id")
        .len()
        .sort(["len", "frame_id"], descending=[True, False])["frame_id"]
        .to_list()
        if faces.height
        else []
    )
    picked = busiest[: max(1, n // 2)] if busiest else []
    ids = frames["frame_id"].to_list()
    step = max(1, len(ids) // max(1, n))
    for fid in ids[step // 2 :: step]:
        if len(picked) >= n:
            break
        if fid not in picked:
            picked.append(fid)
    return picked[:n]


def detector_preview(
    run_dir: Path, frames: pl.DataFrame, frame_ids: list[str], settings, *, width: int = 480
):
    """The faces ``settings.detector`` finds on ``frame_ids`` (boxes, landmarks, scores drawn), as
    one image of the frames side by side in rows of two: what switching the detector changes."""
    paths = dict(frames.select("frame_id", "path").iter_rows())
    tiles = []
    for fid in frame_ids:
        rgb = read_rgb(Path(run_dir) / paths[fid])
        if rgb is None:
            continue
        found = detect(rgb, settings)
        canvas = rgb.copy()
        thick = max(1, rgb.shape[1] // 320)
        for det in found:
            top, right, bottom, left = det.box
            cv2.rectangle(canvas, (left, top), (right, bottom), (255, 140, 0), thick)
            for x, y in det.landmarks:
                if np.isfinite(x):
                    cv2.circle(canvas, (round(x), round(y)), thick + 1, (0, 255, 0), -1)
            cv2.putText(
                canvas, f"{det.score:.2f}", (left, max(12, top - 4)), 0, 0.4 * thick, (255, 140, 0), thick
            )
        scale = width / canvas.shape[1]
        small = cv2.resize(canvas, (width, round(canvas.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        cv2.putText(small, f"{fid}: {len(found)} face(s)", (6, 18), 0, 0.5, (255, 255, 255), 1)
        tiles.append(small)
    if not tiles:
        return Image.new("RGB", (width, 40))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    if len(tiles) % 2:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + 2], axis=1) for i in range(0, len(tiles), 2)]
    return Image.fromarray(np.concatenate(rows, axis=0))
