"""Stage 01's figures: shots along the movie, the motion distribution with its threshold, a contact
sheet of keyframes per shot.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import plotnine as p9
import polars as pl
from PIL import Image

from diffusion_bunny.media.figures import (
    LINE_RED,
    Block,
    Layout,
    Tile,
    aspect_height,
    categorical,
    histogram,
    minimal_theme,
    tile_sheet,
)
from diffusion_bunny.stages.extract.keyframes import classify_shots

if TYPE_CHECKING:
    import pandas as pd

KIND_COLOURS = {"static": "#4C78A8", "dynamic": "#F58518"}


def shot_length_plot(shots: pl.DataFrame) -> p9.ggplot:
    """Each shot as a bar along the movie's time axis, its height the shot's length: long
    static takes and rapid cutting show at a glance."""
    df = shots.with_columns((pl.col("end_s") - pl.col("start_s")).alias("length_s")).to_pandas()
    df["zero"] = 0.0
    return (
        p9.ggplot(df)
        + p9.geom_rect(
            p9.aes(xmin="start_s", xmax="end_s", ymin="zero", ymax="length_s", fill="kind"),
            colour="white",
            size=0.2,
        )
        + p9.scale_fill_manual(values=KIND_COLOURS)
        + p9.labs(x="time in the movie (s)", y="shot length (s)", fill="shot", title=f"{shots.height} shots")
        + minimal_theme(8, 3.2)
    )


def motion_plot(shots: pl.DataFrame, threshold: float) -> p9.ggplot:
    """Distribution of per-shot motion with the static/dynamic threshold as a line."""
    df = classify_shots(shots, threshold).to_pandas()
    n_static = int((df["kind"] == "static").sum())
    return kind_histogram(
        df,
        "motion",
        bins=max(5, min(40, len(df))),
        line=threshold,
        line_size=0.8,
        labels={
            "x": "motion (mean absolute frame difference, 0-255)",
            "title": f"motion threshold {threshold:.2f}: {n_static} static, {len(df) - n_static} dynamic",
        },
    )


def kind_histogram(
    df: pd.DataFrame, x: str, *, bins: int, line: float, line_size: float, labels: dict[str, str]
) -> p9.ggplot:
    """A per-shot measure's histogram, static and dynamic shots stacked in their colours, a dashed
    line at ``line``: the motion with its threshold here, the shot lengths with their median in
    the report."""
    return histogram(
        df,
        x,
        by="kind",
        colours=KIND_COLOURS,
        lines=[(line, LINE_RED)],
        line_size=line_size,
        labels={"y": "shots", "fill": "shot", **labels},
        bins=bins,
        colour="white",
        size=0.2,
    )


DECISION_COLOURS = {
    "accepted_fast": "#54A24B",
    "rejected_fast": "#BAB0AC",
    "confirmed": "#4C78A8",
    "rejected": "#E45756",
}


def decision_counts(candidates: pl.DataFrame) -> pl.DataFrame:
    """Candidates counted by verdict and reason (``kind: reason``), most frequent first: which
    rule settled how many, and how many the network had to judge."""
    return (
        candidates.with_columns(
            pl.concat_str(
                [pl.col("kind"), pl.lit(": "), pl.col("reason").fill_null(pl.col("decision"))]
            ).alias("rule")
        )
        .group_by("decision", "rule")
        .len("candidates")
        .sort(["candidates", "rule"], descending=[True, False])
    )


def decision_plot(candidates: pl.DataFrame, facts: dict | None = None) -> p9.ggplot | None:
    """The cascade's verdicts on its boundary candidates, one bar per rule, coloured by verdict
    (accepted or rejected at once, or confirmed or rejected by TransNetV2); the title says how
    much of the movie the network saw. None where the detector proposes no candidates (the
    PySceneDetect detectors, TransNetV2 alone)."""
    if candidates.is_empty():
        return None
    counts = decision_counts(candidates)
    # One bar per rule (a rule such as "hard: network" can end in either verdict: stacked), the
    # most used at the top.
    totals = (
        counts.group_by("rule")
        .agg(pl.col("candidates").sum())
        .sort(["candidates", "rule"], descending=[True, False])
    )
    order = list(reversed(totals["rule"].to_list()))
    df, tdf = counts.to_pandas(), totals.to_pandas()
    df["rule"] = categorical(df["rule"], order)
    tdf["rule"] = categorical(tdf["rule"], order)
    judged = int(candidates["decision"].is_in(["confirmed", "rejected"]).sum())
    title = f"{candidates.height} boundary candidates, {judged} judged by TransNetV2"
    share = (facts or {}).get("model_frames_per_decoded")
    subtitle = None
    if share is not None:
        subtitle = f"the network ran on {100 * float(share):.1f}% of the decoded frames"
    return (
        p9.ggplot(df, p9.aes(x="rule", y="candidates", fill="decision"))
        + p9.geom_col()
        + p9.geom_text(
            p9.aes(x="rule", y="candidates", label="candidates"),
            data=tdf,
            inherit_aes=False,
            ha="left",
            nudge_y=0.5,
            size=8,
        )
        + p9.coord_flip()
        + p9.scale_fill_manual(values=DECISION_COLOURS)
        + p9.scale_y_continuous(expand=(0, 0, 0.12, 0))
        + p9.labs(x="", y="candidates", fill="verdict", title=title, subtitle=subtitle)
        + minimal_theme(8, max(2.4, 0.35 * len(tdf) + 1.2))
    )


def _picture_mark(shot: dict, frame_size: tuple[int, int] | None) -> tuple[float, float, float, float] | None:
    """A shot's picture box as shares of the frame, or None without one."""
    if frame_size is None or shot.get("box_left") is None:
        return None
    w, h = frame_size
    return (shot["box_left"] / w, shot["box_top"] / h, shot["box_right"] / w, shot["box_bottom"] / h)


def contact_sheet(
    run_dir: str | Path,
    picks: pl.DataFrame,
    shots: pl.DataFrame,
    *,
    path_column: str = "thumb_path",
    max_shots: int = 30,
    thumb_width: int = 240,
    frame_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Keyframes grouped by shot: one row per shot, labelled with its id, length and kind.

    ``picks`` is a frames-like table with ``shot_id``, ``frame_index`` and an image path column
    relative to ``run_dir`` (thumbnails by default). With ``frame_size`` (the frames' width and
    height as shown) each tile carries its shot's picture box as a magenta frame (what every later
    stage looks at: the bars outside it are never measured or exported), and a shot too short to
    sample says so.
    """
    run_dir = Path(run_dir)
    shown = shots.head(max_shots)
    rows_by_shot = {
        sid: picks.filter(pl.col("shot_id") == sid).sort("frame_index").to_dicts()
        for sid in shown["shot_id"].to_list()
    }
    first = next((rows[0] for rows in rows_by_shot.values() if rows), None)
    thumb_h = aspect_height(run_dir / first[path_column] if first else None, thumb_width)
    blocks = []
    for shot in shown.iter_rows(named=True):
        colour = KIND_COLOURS.get(shot["kind"], "#000000")
        mark = _picture_mark(shot, frame_size)
        tiles = [
            Tile(
                run_dir / row[path_column], label=f"#{row['frame_index']} {row.get('role') or ''}", mark=mark
            )
            for row in rows_by_shot[shot["shot_id"]]
        ]
        length = f"{shot['end_s'] - shot['start_s']:.1f}s {shot['kind']}"
        side = [f"shot {shot['shot_id']}", length]
        if shot.get("too_short"):
            side.append("too short: no frame")
        elif mark is not None and mark != (0.0, 0.0, 1.0, 1.0):
            side.append(f"box {shot['box_right'] - shot['box_left']}x{shot['box_bottom'] - shot['box_top']}")
        blocks.append(Block(tiles, side=side, side_colour=colour))
    columns = max([len(v) for v in rows_by_shot.values()] + [1])
    truncated = shots.height > max_shots
    layout = Layout(
        (thumb_width, thumb_h),
        columns,
        label_h=16,
        label_above=True,
        side_width=130,
        lead_gap=False,
        header_h=22 if truncated else 0,
    )
    return tile_sheet(
        blocks, layout, header=[f"first {max_shots} of {shots.height} shots"] if truncated else []
    )


def source_table(facts: dict, shots: pl.DataFrame | None = None) -> pl.DataFrame:
    """What the movie stores and how stage 01 showed it (notebook 01's "as stored and as shown"):
    one row per fact, in words, from the manifest's facts."""
    box = facts.get("picture_box") or {}
    film = box.get("film_box")
    check = facts.get("interlace_check")
    rows = [
        ("stored size", f"{facts.get('coded_width')}x{facts.get('coded_height')} ({facts.get('pix_fmt')})"),
        ("sample aspect", f"{facts.get('sample_aspect', '1:1')} (1:1 = square pixels)"),
        (
            "shown as",
            f"{facts.get('width')}x{facts.get('height')}, rotation {facts.get('rotation', 0)}"
            + (", mirrored" if facts.get("mirrored") else ""),
        ),
        (
            "HDR",
            f"{facts['hdr']} ({facts.get('bit_depth')}-bit): tone-mapped to SDR"
            if facts.get("hdr")
            else "no (SDR)",
        ),
        (
            "interlaced",
            ("yes: deinterlaced (bwdif)" if facts.get("deinterlaced") else "no")
            + f"; field order {facts.get('field_order', 'unknown')}"
            + (f"; idet {check}" if check else ""),
        ),
        (
            "film picture box",
            f"{film[2] - film[0]}x{film[3] - film[1]} at ({film[0]}, {film[1]})"
            if film
            else "none (full frame)",
        ),
        ("shots by box source", ", ".join(f"{k} {v}" for k, v in (box.get("sources") or {}).items())),
    ]
    if shots is not None and "too_short" in shots.columns:
        rows.append(("shots too short to sample", str(int(shots["too_short"].sum()))))
    return pl.DataFrame(rows, schema=["what", "value"], orient="row")
