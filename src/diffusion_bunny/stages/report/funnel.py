"""The report's funnel, pure over the tables: frames that reached each step of the pipeline, with
the reasons the others were dropped, as a table and as bars of shares."""

from __future__ import annotations

from typing import Any

import plotnine as p9
import polars as pl

from diffusion_bunny.media.figures import categorical, minimal_theme
from diffusion_bunny.stages.captions.tables import usable_captions
from diffusion_bunny.stages.quality.plots import OUTCOME_COLOURS

PASSED = OUTCOME_COLOURS["kept"]
#: Stage 02's colours per outcome, plus the other steps' (split, noise, failed captions).
REASON_COLOURS = {
    **OUTCOME_COLOURS,
    "kept, subtitles cropped": "#8CC084",
    "train": PASSED,
    "validation": "#A0D38F",
    "noise": "#BBBBBB",
    "failed": "#E45756",
}
_OTHER_COLOURS = ["#4C78A8", "#F58518", "#72B7B2", "#FF9DA6", "#9D755D", "#EECA3B", "#79706E"]
#: Greys for what the steps that drop no frame say of them (no one found, unnamed only, noise).
_DESCRIBED_COLOURS = ["#BDBDBD", "#8C8C8C", "#D9D9D9", "#6E6E6E"]


def _colours(outcomes: list[str]) -> dict[str, str]:
    """A colour per outcome: its own where it has one, else the next of :data:`_OTHER_COLOURS`
    (a reason this module does not know, e.g. a detector's new one, still gets a bar)."""
    extra = iter(_OTHER_COLOURS * 4)
    return {o: REASON_COLOURS.get(o) or next(extra) for o in outcomes}


# --------------------------------------------------------------------------------------- funnel


def subtitles_cropped(quality: pl.DataFrame, frames: pl.DataFrame | None) -> int:
    """How many kept frames stage 02 cropped to leave their subtitles out: their ``crop_*``
    region is shorter than the picture box (the frame, where the run has no box)."""
    needed = {"crop_top", "crop_bottom"}
    if frames is None or not needed <= set(quality.columns) or "height" not in frames.columns:
        return 0
    has_box = {"box_top", "box_bottom"} <= set(frames.columns)
    top = pl.col("box_top") if has_box else pl.lit(0)
    bottom = pl.col("box_bottom") if has_box else pl.col("height")
    geometry = frames.select("frame_id", top.alias("_top"), bottom.alias("_bottom"))
    kept = quality.filter(pl.col("keep")).join(geometry, on="frame_id", how="left")
    return int(
        kept.filter(
            (pl.col("crop_top") > pl.col("_top")) | (pl.col("crop_bottom") < pl.col("_bottom"))
        ).height
    )


#: The funnel table's columns: one row per (step, outcome).
FUNNEL_SCHEMA = {
    "step": pl.Utf8,
    "stage": pl.Utf8,
    "outcome": pl.Utf8,
    "frames": pl.Int64,
    "passed": pl.Boolean,
}


class _Steps(list):
    """The funnel's rows as they are added, one step at a time."""

    def add(
        self, name: str, stage: str, kept: int, dropped: dict[str, int], passed: dict[str, int] | None = None
    ) -> None:
        """A step: the frames that went on (``kept``, or split by outcome in ``passed``) and the
        ones dropped per reason (reasons that dropped none are left out)."""
        for outcome, n in (passed or {"kept": kept}).items():
            self.append((name, stage, outcome, int(n), True))
        for reason, n in dropped.items():
            if n > 0:
                self.append((name, stage, reason, int(n), False))


def funnel_table(
    *,
    decoded: int | None = None,
    candidates: pl.DataFrame | None = None,
    frames: pl.DataFrame | None = None,
    quality: pl.DataFrame | None = None,
    faces: pl.DataFrame | None = None,
    face_frames: pl.DataFrame | None = None,
    clusters: pl.DataFrame | None = None,
    captions: pl.DataFrame | None = None,
    dataset_items: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Frames in and out of each step, with the reasons for the ones dropped.

    One row per (step, outcome): ``step`` (ordered as the pipeline), ``stage``, ``outcome``
    (``kept``/``train``/``validation`` for frames that went on, else the reason they were
    dropped), ``frames`` and ``passed`` (bool). A step appears only when its stage's table is
    given, so a partial run gives a shorter funnel rather than an error.
    """
    steps = _Steps()
    _extract_steps(steps, decoded, candidates, frames)
    kept_ids = _quality_step(steps, quality, frames) if quality is not None else None
    if faces is not None and kept_ids is not None:
        _characters_step(steps, faces, face_frames, set(kept_ids.to_list()))
    if clusters is not None:
        scene = clusters.filter(pl.col("level") == "scene")
        if kept_ids is not None:  # with scenes.frames: all, the frames quality dropped go no further
            scene = scene.filter(pl.col("frame_id").is_in(kept_ids.implode()))
        noise = int((scene["cluster_id"] == "noise").sum())
        steps.add("in a scene cluster", "scenes", scene.height - noise, {"noise": noise})
    usable = None
    if captions is not None:
        # Only the frames quality kept go on (with captions.frames: all every frame is captioned:
        # the ones quality dropped were counted in and then dropped again as "not exported").
        reached = (
            captions if kept_ids is None else captions.filter(pl.col("frame_id").is_in(kept_ids.implode()))
        )
        usable = usable_captions(reached).height
        lost = {"failed": reached.height - usable}
        if kept_ids is not None:
            lost["not captioned"] = kept_ids.len() - reached["frame_id"].n_unique()
        steps.add("captioned", "captions", usable, lost)
    if dataset_items is not None:
        source = usable if usable is not None else (kept_ids.len() if kept_ids is not None else None)
        _export_step(steps, dataset_items, source)
    return pl.DataFrame(list(steps), schema=FUNNEL_SCHEMA, orient="row")


def _extract_steps(
    steps: _Steps, decoded: int | None, candidates: pl.DataFrame | None, frames: pl.DataFrame | None
) -> None:
    """Stage 01's steps: frames decoded, keyframe candidates, frames extracted."""
    if decoded is not None:
        steps.add("decoded", "extract", decoded, {})
    # Frames, not candidate rows: a short shot's start, middle and end are often one frame.
    chosen = candidates["frame_index"].n_unique() if candidates is not None else None
    if chosen is not None:
        lost = {"not a candidate": decoded - chosen} if decoded is not None else {}
        steps.add("keyframe candidates", "extract", chosen, lost)
    if frames is not None:
        lost = {"not chosen": chosen - frames.height} if chosen is not None else {}
        steps.add("extracted", "extract", frames.height, lost)


def _quality_step(steps: _Steps, quality: pl.DataFrame, frames: pl.DataFrame | None) -> pl.Series:
    """Stage 02's step, the dropped frames by reason in rule order (reasons it does not know
    after them); returns the ids of the frames it kept."""
    kept_ids = quality.filter(pl.col("keep"))["frame_id"]
    reasons = dict(quality.filter(~pl.col("keep")).group_by("reject_reason").len().iter_rows())
    order = [r for r in REASON_COLOURS if r in reasons] + sorted(
        str(r) for r in reasons if r not in REASON_COLOURS
    )
    cropped = subtitles_cropped(quality, frames)
    passed = {"kept": kept_ids.len() - cropped, "kept, subtitles cropped": cropped} if cropped else None
    steps.add("kept by quality", "quality", kept_ids.len(), {r: reasons.get(r, 0) for r in order}, passed)
    return kept_ids


def _characters_step(
    steps: _Steps, faces: pl.DataFrame, face_frames: pl.DataFrame | None, kept_set: set[str]
) -> None:
    """Stage 03's step over the kept frames: a named character, only unnamed appearances (unknown
    faces, unnamed drawn sightings), no one found, or not searched (frames the detector never
    looked at, when ``face_frames`` says which it did). Words for every kind: a cartoon's frames
    without a named character read "no face"."""
    on_kept = faces.filter(pl.col("frame_id").is_in(kept_set))
    named = set(on_kept.filter(pl.col("character").is_not_null())["frame_id"].to_list())
    with_faces = set(on_kept["frame_id"].to_list())
    searched = set(face_frames["frame_id"].to_list()) & kept_set if face_frames is not None else kept_set
    steps.add(
        "with a named character",
        "characters",
        len(named),
        {
            "unnamed only": len(with_faces - named),
            "no one found": len(searched - with_faces),
            "not searched": len(kept_set - searched - with_faces),
        },
    )


def _export_step(steps: _Steps, dataset_items: pl.DataFrame, source: int | None) -> None:
    """Stage 06's step: frames exported per split, out of the ``source`` frames that could be
    (captioned, or kept by stage 02 when captions did not run)."""
    # Frames, not pictures: a frame's face and half-body crops are extra rows of the same frame
    # (all in the frame's split, which is drawn per shot group).
    frames_out = dataset_items.unique("frame_id")
    splits = dict(frames_out.group_by("split").len().iter_rows())
    lost = {"not exported": source - frames_out.height} if source is not None else {}
    passed = {s: splits[s] for s in ("train", "validation") if s in splits}
    steps.add("exported", "export", frames_out.height, lost, passed or {"train": 0})


def funnel_summary(funnel: pl.DataFrame) -> pl.DataFrame:
    """One row per step: frames in, frames out, and the dropped ones by reason as text. A step
    that drops no frame (:data:`_NOT_A_GATE`) lets every frame out, and says what it noted of
    them in its ``dropped`` cell ("none (6 no one found, all go on)"): the table read "20 -> 14, 6 no
    face" beside a text saying every frame goes on."""
    steps = funnel["step"].unique(maintain_order=True).to_list()
    out = []
    for name in steps:
        part = funnel.filter(pl.col("step") == name)
        passed = part.filter(pl.col("passed"))
        dropped = part.filter(~pl.col("passed"))
        said = ", ".join(f"{n} {o}" for o, n in dropped.select("outcome", "frames").iter_rows())
        gate = name not in _NOT_A_GATE
        out.append(
            {
                "step": name,
                "stage": part["stage"][0],
                "frames in": int(part["frames"].sum()),
                "frames out": int((passed if gate else part)["frames"].sum()),
                "dropped": (said or "-") if gate else (f"none ({said}, all go on)" if said else "-"),
            }
        )
    return pl.DataFrame(
        out,
        schema={
            "step": pl.Utf8,
            "stage": pl.Utf8,
            "frames in": pl.Int64,
            "frames out": pl.Int64,
            "dropped": pl.Utf8,
        },
    )


def last_gate(summary: pl.DataFrame) -> dict[str, Any]:
    """The :func:`funnel_summary` row of the last step that removes frames: a run that stops at
    stage 03 or 04 ended on a step that only describes them ("6 in, 0 out after 'with a named
    character'" where none was named and every frame went on)."""
    gates = summary.filter(~pl.col("step").is_in(list(_NOT_A_GATE)))
    return (gates if gates.height else summary).row(-1, named=True)


def funnel_colours(funnel: pl.DataFrame, order: list[str]) -> dict[str, str]:
    """A colour per outcome of ``order``; what only the steps that drop no frame say of the frames
    (no one found, unnamed only, noise) in greys, not in the colours of the drops: the report read
    "with a named character 8 -> 3" in the drops' colours, then exported all 8."""
    colours = _colours(order)
    gates = set(funnel.filter(~pl.col("step").is_in(list(_NOT_A_GATE)))["outcome"].to_list())
    passing = set(funnel.filter(pl.col("passed"))["outcome"].to_list())
    described = iter(_DESCRIBED_COLOURS * 4)
    colours.update({o: next(described) for o in order if o not in passing and o not in gates})
    return colours


def funnel_plot(funnel: pl.DataFrame) -> p9.ggplot:
    """One bar per step (first step on top), as shares of the frames that reached it: green went
    on, the dropped ones stacked after, one colour per reason; the counts (in -> out) are written
    beside each bar. Shares, not counts: a movie decodes thousands of frames and keeps dozens, so
    on one count axis every later step would be a sliver."""
    steps = funnel["step"].unique(maintain_order=True).to_list()
    outcomes = funnel["outcome"].unique(maintain_order=True).to_list()
    passed = [o for o in outcomes if o in ("kept", "train", "validation")]
    order = passed + [o for o in outcomes if o not in passed]
    colours = funnel_colours(funnel, order)
    shares = funnel.with_columns(
        (pl.col("frames") / pl.col("frames").sum().over("step").clip(lower_bound=1)).alias("share")
    )
    summary = funnel_summary(funnel)
    went = dict(funnel.filter(pl.col("passed")).group_by("step").agg(pl.col("frames").sum()).iter_rows())
    labels = summary.select(
        "step",
        pl.when(pl.col("step").is_in(list(_NOT_A_GATE)))
        .then(
            pl.format(
                "{} of {}, all go on",
                pl.col("step").replace_strict(went, default=0, return_dtype=pl.Int64),
                pl.col("frames in"),
            )
        )
        .otherwise(pl.format("{} -> {}", pl.col("frames in"), pl.col("frames out")))
        .alias("label"),
    ).to_pandas()
    df = shares.to_pandas()
    for frame in (df, labels):
        frame["step"] = categorical(frame["step"], steps[::-1])
    labels["share"] = 1.02
    df["outcome"] = categorical(df["outcome"], order[::-1])  # what went on nearest the axis
    first = int(summary["frames in"][0]) if steps else 0
    last = int(last_gate(summary)["frames out"]) if steps else 0
    return (
        p9.ggplot(df, p9.aes("step", "share"))
        + p9.geom_col(p9.aes(fill="outcome"), position="stack")
        + p9.geom_text(labels, p9.aes("step", "share", label="label"), ha="left", size=9)
        + p9.coord_flip()
        + p9.scale_fill_manual(values=colours, breaks=order)
        + p9.scale_y_continuous(
            limits=(0, 1.32), breaks=[0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25%", "50%", "75%", "100%"]
        )
        + p9.labs(
            x="", y="share of the frames that reached the step", fill="", title=f"{first} in, {last} out"
        )
        + minimal_theme(9, max(2.2, 0.45 * len(steps) + 1.2))
    )


#: Drops that are no judgement on a frame (a sample not chosen, a frame not searched).
_NOT_A_REASON = {"not a candidate", "not chosen", "not searched"}
#: Steps that describe the frames without removing any: a frame with no face or in no scene
#: cluster is still exported (as a scene picture); what export leaves out is its "not exported".
_NOT_A_GATE = {"with a named character", "in a scene cluster"}


def dropped_by_reason(funnel: pl.DataFrame) -> pl.DataFrame:
    """Frames dropped on the way to the dataset, per reason (``step``, ``reason``, ``frames``),
    most first: what kept pictures out of what the LoRA will see."""
    dropped = funnel.filter(
        ~pl.col("passed")
        & ~pl.col("outcome").is_in(list(_NOT_A_REASON))
        & ~pl.col("step").is_in(list(_NOT_A_GATE))
    )
    return (
        dropped.select("step", pl.col("outcome").alias("reason"), "frames")
        .filter(pl.col("frames") > 0)
        .sort(["frames", "reason"], descending=[True, False])
    )


def dropped_plot(funnel: pl.DataFrame) -> p9.ggplot | None:
    """One bar per reason a frame was dropped (counts), coloured as in the funnel; None when
    nothing was dropped."""
    table = dropped_by_reason(funnel)
    if not table.height:
        return None
    order = table["reason"].to_list()
    colours = _colours(order)
    df = table.to_pandas()
    df["reason"] = categorical(df["reason"], order[::-1])
    return (
        p9.ggplot(df, p9.aes("reason", "frames", fill="reason"))
        + p9.geom_col(show_legend=False)
        + p9.geom_text(p9.aes(label="frames"), ha="left", nudge_y=0.2, size=9)
        + p9.coord_flip()
        + p9.scale_fill_manual(values=colours)
        + p9.labs(x="", y="frames dropped", title=f"{int(table['frames'].sum())} frames dropped, by reason")
        + minimal_theme(7, max(2.0, 0.4 * len(order) + 1.1))
    )
