"""Stage 09 ``report``: figures from small tables, sections of stages that did not run say so,
the HTML has every section and no code, and notebook 09 runs headless on the demo run."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import nbformat
import plotnine as p9
import polars as pl
import pytest
from notebooks import pictures

from diffusion_bunny.config import load_config
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.pipeline.runner import MovieReport
from diffusion_bunny.stages import PIPELINE, run_stage, stage_state
from diffusion_bunny.stages.report.combined import movies_plot
from diffusion_bunny.stages.report.document import figure_png, render_report_html, report_document
from diffusion_bunny.stages.report.figures import checkpoint_order, identity_table
from diffusion_bunny.stages.report.funnel import (
    _DESCRIBED_COLOURS,
    dropped_by_reason,
    dropped_plot,
    funnel_colours,
    funnel_plot,
    funnel_summary,
    funnel_table,
    last_gate,
)
from diffusion_bunny.stages.report.sections import _characters_section
from diffusion_bunny.stages.report.stage import movies_table, report_data, write_report_figures

PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(tmp_path: Path, **overrides):
    return load_config(None, overrides, root=tmp_path / "noconfig")


def _frames(n: int) -> pl.DataFrame:
    return pl.DataFrame({"frame_id": [f"m_{i:07d}" for i in range(n)], "shot_id": [i // 2 for i in range(n)]})


def captions_table(frame_ids: list[str]) -> pl.DataFrame:
    """A ``captions`` table in the contract's shape (stage 05 is not on this branch): the last
    frame failed, one was edited by a person."""
    n = len(frame_ids)
    status = ["ok"] * (n - 1) + ["failed"]
    status[0] = "edited"
    return pl.DataFrame(
        {
            "frame_id": frame_ids,
            "caption": [f"bunnystyle, {'word ' * (3 + i)}".strip() for i in range(n - 1)] + [None],
            "tags": [["a", "b"]] * n,
            "provider": ["template"] * n,
            "model": ["template-v1"] * n,
            "status": status,
            "error": [None] * (n - 1) + ["provider down"],
            "prompt_version": ["1"] * n,
            "latency_s": [0.01] * n,
            "input_tokens": [None] * n,
            "output_tokens": [None] * n,
        },
        schema_overrides={"input_tokens": pl.Int64, "output_tokens": pl.Int64},
    )


def dataset_items_table(frame_ids: list[str]) -> pl.DataFrame:
    n = len(frame_ids)
    return pl.DataFrame(
        {
            "frame_id": frame_ids,
            "split": ["validation"] + ["train"] * (n - 1),
            "file_name": [f"{f}.png" for f in frame_ids],
            "text": ["bunnystyle"] * n,
            "characters": [["astronaut"]] * n,
            "shot_id": list(range(n)),
            "crop": ["full"] * n,
            "repeats": [1] * n,
            "width": [512] * n,
            "height": [512] * n,
            "face_id": [None] * n,
            "concept": ["astronaut"] * n,
            "left": [0] * n,
            "top": [0] * n,
            "right": [512] * n,
            "bottom": [512] * n,
        }
    )


def training_log_table(steps: int = 40) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "step": list(range(1, steps + 1)),
            "loss": [0.5 / (1 + 0.1 * s) for s in range(steps)],
            "lr": [1e-4] * steps,
            "epoch": [s // 10 for s in range(steps)],
            "elapsed_s": [0.5 * s for s in range(steps)],
        }
    )


def generations_table() -> pl.DataFrame:
    rows = []
    for checkpoint, base in (("checkpoint-1000", 0.4), ("checkpoint-200", 0.7), ("final", 0.35)):
        for character in ("astronaut", "grace_hopper"):
            for seed in (0, 1):
                found = not (checkpoint == "checkpoint-200" and seed == 1)
                rows.append(
                    {
                        "character": character,
                        "prompt": f"bunnystyle, {character}",
                        "seed": seed,
                        "lora_scale": 1.0,
                        "checkpoint": checkpoint,
                        "path": f"generated/{checkpoint}_{character}_{seed}.png",
                        "identity_distance": base + 0.01 * seed if found else None,
                        "face_found": found,
                        "clip_score": None,
                        "best": False,
                    }
                )
    return pl.DataFrame(rows, schema_overrides={"clip_score": pl.Float64})


def test_funnel_counts_every_step_with_reasons():
    frames = _frames(12).with_columns(
        pl.lit(1080).alias("height"), pl.lit(140).alias("box_top"), pl.lit(940).alias("box_bottom")
    )
    ids = frames["frame_id"].to_list()
    quality = pl.DataFrame(
        {
            "frame_id": ids,
            "keep": [True] * 6 + [False] * 6,
            "reject_reason": [None] * 6 + ["blurry", "subtitles", "blurry", "text", "too_dark", "duplicate"],
            "crop_top": [140] * 12,
            "crop_bottom": [940, 801] + [940] * 10,  # frame 1 kept with its subtitles cropped off
        }
    )
    faces = pl.DataFrame(
        {
            "frame_id": [ids[0], ids[0], ids[1], ids[2], ids[7]],  # ids[7] was rejected: not counted
            "character": ["astronaut", None, None, "grace_hopper", "astronaut"],
        }
    )
    face_frames = pl.DataFrame({"frame_id": ids[:5]})  # ids[5] never searched
    clusters = pl.DataFrame(
        {
            "frame_id": ids[:6] * 2,
            "level": ["scene"] * 6 + ["character"] * 6,
            "cluster_id": ["s001", "s001", "s002", "noise", "s002", "s001"] + ["x"] * 6,
        }
    )
    captions = captions_table(ids[:6])
    items = dataset_items_table(ids[:4])
    # A face crop of frame 1 is a second picture of the same frame: the funnel counts frames.
    items = pl.concat([items, items.slice(1, 1).with_columns(pl.lit("face").alias("crop"))])
    table = funnel_table(
        decoded=500,
        # A short shot's start, middle and end are one frame: three rows, one candidate.
        candidates=pl.DataFrame({"frame_index": [*range(30), 7, 7]}),
        frames=frames,
        quality=quality,
        faces=faces,
        face_frames=face_frames,
        clusters=clusters,
        captions=captions,
        dataset_items=items,
    )
    summary = {r["step"]: r for r in funnel_summary(table).iter_rows(named=True)}
    assert list(summary) == [
        "decoded",
        "keyframe candidates",
        "extracted",
        "kept by quality",
        "with a named character",
        "in a scene cluster",
        "captioned",
        "exported",
    ]
    assert (summary["keyframe candidates"]["frames in"], summary["keyframe candidates"]["frames out"]) == (
        500,
        30,
    )
    assert summary["extracted"]["dropped"] == "18 not chosen"
    assert summary["kept by quality"]["frames out"] == 6
    # Rule order, text and subtitles like every reason; a cropped frame went on.
    assert summary["kept by quality"]["dropped"] == "1 too_dark, 2 blurry, 1 text, 1 subtitles, 1 duplicate"
    kept = table.filter((pl.col("step") == "kept by quality") & pl.col("passed"))
    assert dict(kept.select("outcome", "frames").iter_rows()) == {"kept": 5, "kept, subtitles cropped": 1}
    # Named in frames 0 and 2; frame 1 only an unknown face; 3 and 4 searched, no face; 5 never searched.
    # Two steps note what the frames hold and drop none (the table said "6 -> 2" beside a text
    # saying every frame goes on).
    named = summary["with a named character"]
    assert (named["frames in"], named["frames out"]) == (6, 6)
    assert named["dropped"] == "none (1 unnamed only, 2 no one found, 1 not searched, all go on)"
    clustered = summary["in a scene cluster"]
    assert (clustered["frames out"], clustered["dropped"]) == (6, "none (1 noise, all go on)")
    assert summary["captioned"]["frames out"] == 5 and summary["captioned"]["dropped"] == "1 failed"
    # The two steps that drop no frame say so, in greys; the drops keep their colours.
    plot = funnel_plot(table)
    text = plot.layers[1].geom.data
    labels = dict(zip(text["step"].astype(str), text["label"], strict=True))
    assert labels["with a named character"] == "2 of 6, all go on" and labels["kept by quality"] == "12 -> 6"
    assert labels["in a scene cluster"] == "5 of 6, all go on"
    order = table["outcome"].unique(maintain_order=True).to_list()
    colours = funnel_colours(table, order)
    assert {colours[o] for o in ("unnamed only", "no one found", "not searched", "noise")} <= set(
        _DESCRIBED_COLOURS
    )
    assert colours["blurry"] not in _DESCRIBED_COLOURS and colours["failed"] not in _DESCRIBED_COLOURS
    exported = table.filter(pl.col("step") == "exported")
    assert dict(exported.select("outcome", "frames").iter_rows()) == {
        "train": 3,
        "validation": 1,
        "not exported": 1,
    }
    assert figure_png(funnel_plot(table)).startswith(PNG)
    # What kept frames out of the dataset: quality's reasons, the failed caption and the frame
    # export left out; a frame with no face or in no scene cluster still went on (as a scene
    # picture), so those are no reason.
    dropped = dict(dropped_by_reason(table).select("reason", "frames").iter_rows())
    assert dropped == {
        "blurry": 2,
        "duplicate": 1,
        "failed": 1,
        "not exported": 1,
        "subtitles": 1,
        "text": 1,
        "too_dark": 1,
    }
    assert figure_png(dropped_plot(table)).startswith(PNG)
    # Only the stages given: a run that went through stage 01 alone has a 3-step funnel.
    short = funnel_table(decoded=100, candidates=pl.DataFrame({"frame_index": range(9)}), frames=frames)
    assert funnel_summary(short)["step"].to_list() == ["decoded", "keyframe candidates", "extracted"]

    # captions.frames: all captions every frame: only the kept ones reach the step. (The six that
    # quality dropped were counted in, then dropped a second time as "not exported".)
    every = captions_table(ids[6:] + ids[:6])  # the last (failed) one is a kept frame
    again = funnel_table(frames=frames, quality=quality, captions=every, dataset_items=items)
    by_step = {r["step"]: r for r in funnel_summary(again).iter_rows(named=True)}
    assert (by_step["captioned"]["frames in"], by_step["captioned"]["frames out"]) == (6, 5)
    assert by_step["captioned"]["dropped"] == "1 failed"
    assert by_step["exported"]["frames in"] == 5
    assert sum(dict(dropped_by_reason(again).select("reason", "frames").iter_rows()).values()) == 12 - 4
    # scenes.frames: all clusters every frame: only the kept ones reach the step (8 -> 8 read
    # as more frames reaching it than left stage 02).
    every_scene = pl.DataFrame(
        {"frame_id": ids, "level": ["scene"] * 12, "cluster_id": ["s001"] * 11 + ["noise"]}
    )
    clustered = funnel_summary(funnel_table(frames=frames, quality=quality, clusters=every_scene))
    by_step = {r["step"]: r for r in clustered.iter_rows(named=True)}
    assert (by_step["in a scene cluster"]["frames in"], by_step["in a scene cluster"]["frames out"]) == (6, 6)
    # Kept frames stage 05 never captioned (run before quality changed) are said so.
    some = funnel_table(frames=frames, quality=quality, captions=captions_table(ids[:4]))
    assert funnel_summary(some).row(-1, named=True)["dropped"] == "1 failed, 2 not captioned"

    # A run that stops at stage 03 or 04 ends on steps that remove no frame: its headline is the
    # last step that does ("6 in, 0 out after 'with a named character'" where nobody was named).
    partial = funnel_summary(funnel_table(frames=frames, quality=quality, clusters=clusters))
    assert last_gate(partial)["step"] == "kept by quality" and last_gate(partial)["frames out"] == 6


def test_contract_tables_make_figures():
    """Caption lengths, training loss and identity per checkpoint from tables in the contract's
    shape (stages 05, 07, 08 are built on other branches)."""
    captions = captions_table([f"f{i}" for i in range(8)])
    from diffusion_bunny.stages.captions.plots import caption_length_plot
    from diffusion_bunny.stages.train.plots import loss_curve_plot

    plot = caption_length_plot(captions, by="status")
    assert "7 of 8 frames captioned (1 failed)" in plot.labels.title
    assert figure_png(plot).startswith(PNG)
    loss = loss_curve_plot(training_log_table())
    assert len(loss.data) == 40
    assert figure_png(loss, dpi=50).startswith(PNG)
    assert checkpoint_order(["final", "checkpoint-1000", "base", "checkpoint-200"]) == [
        "base",
        "checkpoint-200",
        "checkpoint-1000",
        "final",
    ]
    table = identity_table(generations_table())
    row = table.filter((pl.col("checkpoint") == "checkpoint-200") & (pl.col("character") == "astronaut"))
    # One of the two pictures had no face: the mean is over the face found only.
    assert row["pictures"][0] == 2 and row["faces_found"][0] == 1
    assert row["identity_distance"][0] == pytest.approx(0.7)


def test_generated_pictures_of_drawn_characters_have_their_own_figure():
    from types import SimpleNamespace

    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages.report.figures import drawn_table
    from diffusion_bunny.stages.report.sections import _generate_section

    cfg = load_config(None)
    people = generations_table().with_columns(
        pl.lit(None, pl.Float64).alias("drawn_score"), pl.lit(None, pl.Boolean).alias("drawn_found")
    )
    drawn = people.with_columns(
        pl.lit("biscuit").alias("character"),
        pl.lit(None, pl.Float64).alias("identity_distance"),
        pl.lit(False).alias("face_found"),
        pl.when(pl.col("checkpoint") == "final").then(0.8).otherwise(0.3).alias("drawn_score"),
    ).with_columns((pl.col("drawn_score") >= 0.5).alias("drawn_found"))
    table = drawn_table(pl.concat([people, drawn]))
    assert table["character"].unique().to_list() == ["biscuit"]  # the people's pictures are not in it
    final = table.filter(pl.col("checkpoint") == "final").row(0, named=True)
    assert (final["pictures"], final["found"], final["drawn_score"]) == (4, 4, pytest.approx(0.8))

    def section(generations):
        return _generate_section(SimpleNamespace(read_table=lambda name: generations), cfg)

    both = section(pl.concat([people, drawn]))
    assert both.status == "ok"
    assert [f.name for f in both.figures] == ["identity_per_checkpoint", "drawn_per_checkpoint"]
    only_drawn = section(drawn)
    assert only_drawn.status == "ok" and [f.name for f in only_drawn.figures] == ["drawn_per_checkpoint"]
    assert figure_png(only_drawn.figures[0].image, dpi=50).startswith(PNG)

    def line(plot) -> float:
        """Where the plot's dashed line (the score a sighting is named from) lies."""
        hlines = [layer for layer in plot.layers if type(layer.geom).__name__ == "geom_hline"]
        return float(hlines[0]._data["yintercept"].iloc[0])

    assert line(only_drawn.figures[0].image) == pytest.approx(cfg.characters.fitted.min_score)
    # Found by the hub's OWLv2: its own score is the line.
    hub = load_config(None, {"characters.backend": "hub", "characters.hub.min_score": 0.3})
    found_by_hub = _generate_section(SimpleNamespace(read_table=lambda name: drawn), hub)
    assert line(found_by_hub.figures[0].image) == pytest.approx(0.3)
    # Nothing scored: an empty section that says so; a table from before drawn scores still reads.
    nothing = drawn.with_columns(pl.lit(None, pl.Float64).alias("drawn_score"))
    assert section(nothing).status == "empty" and "no drawn character scored" in section(nothing).message
    assert section(generations_table()).status == "ok"
    # The base model's pictures are the comparison, not a checkpoint of the LoRA.
    assert "from 3 checkpoint(s)" in section(people).message  # no base model drawn (no scale 0)
    base = people.filter(pl.col("checkpoint") == "final").with_columns(pl.lit("base").alias("checkpoint"))
    assert "from 3 checkpoint(s) and the base model" in section(pl.concat([people, base])).message
    assert "from the base model alone (no LoRA checkpoint)" in section(base).message


def _copy_run(run: Run, dest: Path) -> Run:
    shutil.copytree(run.run_dir, dest)
    return Run.open(dest)


def _rows(run: Run) -> dict[str, dict]:
    figures = run.read_table("report_figures")
    return {r["section"]: r for r in figures.iter_rows(named=True)}


def test_stages_that_did_not_run_say_so_then_appear(demo_run, tmp_path):
    """After stages 01-02 only, the report has the funnel, quality and shot sections, and says
    which stages did not run; tables of stages 05-08 (contract shape) make it stale, and the
    rerun shows their sections."""
    run = _copy_run(demo_run, tmp_path / "run")
    cfg = _cfg(tmp_path)
    assert stage_state(run, "report", cfg) == ("missing", "never ran")
    run_stage(run, "report", cfg, progress=False)
    rows = _rows(run)
    for key, stage, table in [
        ("characters", "characters", "faces"),
        ("scenes", "scenes", "clusters"),
        ("captions", "captions", "captions"),
        ("train", "train", "training_log"),
        ("generate", "generate", "generations"),
    ]:
        assert rows[key]["status"] == "absent"
        assert rows[key]["message"] == f"stage {stage} did not run (no tables/{table}.parquet)"
    figures = run.read_table("report_figures")
    assert set(figures["figure"].drop_nulls()) == {"funnel", "quality", "shot_lengths", "shot_timeline"}
    for path in figures["path"].drop_nulls():
        assert (run.run_dir / path).read_bytes().startswith(PNG)
    manifest = run.read_manifest("report")
    assert manifest["counts"]["stages_not_run"] == [
        "captions",
        "characters",
        "export",
        "generate",
        "scenes",
        "train",
    ]
    funnel = run.read_table("report_funnel")
    assert funnel_summary(funnel)["step"].to_list() == [
        "decoded",
        "keyframe candidates",
        "extracted",
        "kept by quality",
    ]
    assert stage_state(run, "report", cfg)[0] == "done"
    html = (run.run_dir / "report" / "index.html").read_text()
    assert "stage captions did not run" in html

    kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].to_list()
    run.write_table("captions", captions_table(kept))
    run.write_table("dataset_items", dataset_items_table(kept[:-2]))
    run.write_table("training_log", training_log_table())
    run.write_table("generations", generations_table())
    assert stage_state(run, "report", cfg) == (
        "stale",
        # tables no finished run of their stage wrote: those stages are behind (the page says so)
        "its inputs changed (captions, dataset_items, generations, stages behind, training_log)",
    )
    run_stage(run, "report", cfg, progress=False)
    rows = _rows(run)
    assert {k: rows[k]["status"] for k in ("captions", "train", "generate")} == dict.fromkeys(
        ("captions", "train", "generate"), "ok"
    )
    assert rows["captions"]["message"] == f"{len(kept) - 1} of {len(kept)} frames captioned"
    names = set(run.read_table("report_figures")["figure"].drop_nulls())
    assert {"caption_lengths", "training_loss", "identity_per_checkpoint"} <= names
    # What the LoRA will see: the exported pictures, and every frame dropped on the way by reason
    # (the demo's dark, blurred and repeated frames among them).
    assert rows["dataset"]["status"] == "ok"
    assert {"dataset_sheet", "dropped"} <= names
    message = rows["dataset"]["message"]
    assert message.startswith(f"{len(kept) - 2} pictures from {len(kept) - 2} frames; dropped on the way: ")
    assert "too_dark 1" in message and "duplicate 1" in message
    steps = funnel_summary(run.read_table("report_funnel"))
    assert steps["step"].to_list()[-2:] == ["captioned", "exported"]
    assert steps.filter(pl.col("step") == "exported")["frames out"][0] == len(kept) - 2
    # Tables no finished run of their stage wrote: the page says its figures are behind, and
    # what to run (``--stages quality,report`` drew an old export beside new frames, unsaid).
    html = (run.run_dir / "report" / "index.html").read_text()
    assert "<strong>Stage report read the tables of stages that are out of date: " in html
    assert "captions (its last run did not finish); export (its last run did not finish)" in html

    # The movie renamed (its run folder goes on with it): the page's title named the old file,
    # the report skipped as up to date.
    meta = json.loads((run.run_dir / "run.json").read_text())
    meta["movie"] = str(Path(meta["movie"]).with_name("renamed.mp4"))
    (run.run_dir / "run.json").write_text(json.dumps(meta))
    assert stage_state(run, "report", cfg)[0] == "stale"
    run_stage(run, "report", cfg, progress=False)
    assert "<title>QA report: renamed.mp4</title>" in (run.run_dir / "report" / "index.html").read_text()


def test_html_has_every_section_and_no_code(scenes_demo_run, tmp_path):
    """On the demo through stage 04: screen time, a contact sheet per named character, cluster
    sizes; the HTML holds each section's heading and every figure, and no code."""
    src, overrides = scenes_demo_run
    run = _copy_run(src, tmp_path / "run")
    cfg = _cfg(tmp_path, **overrides, **{"report.contact_sheet_faces": 3})
    paths = write_report_figures(run.run_dir, cfg)
    assert {"screen_time", "contact_astronaut", "contact_grace-hopper", "cluster_sizes"} <= set(paths)
    assert all(p.read_bytes().startswith(PNG) for p in paths.values())

    run_stage(run, "report", cfg, progress=False)
    html = (run.run_dir / "report" / "index.html").read_text()
    figures = run.read_table("report_figures")
    for title in figures["title"].unique():
        assert f"{title}</h2>" in html or f">{title}<" in html, title
    images = re.findall(r'<img[^>]+src="data:image/png;base64,', html)
    assert len(images) == figures["figure"].is_not_null().sum()
    body = html.split("<body", 1)[1]  # the page's CSS names every class; the body must use none
    assert "jp-InputArea-editor" not in body and "jp-InputPrompt" not in body  # markdown only, no code
    assert "jp-OutputPrompt" not in body and "No description has been provided" not in body
    assert 'alt="Contact sheet: astronaut"' in body
    assert "did not run" in html  # captions, training, generation
    assert "with a named character" in html  # the funnel table
    # Re-rendering a notebook with real code hides it too.
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("secret_variable = 42"))
    out = render_report_html(nb, tmp_path / "code.html")
    assert "secret_variable" not in out.read_text()
    # A figure dropped from the report (fewer characters now) leaves no PNG behind.
    small = _cfg(tmp_path, **overrides, **{"report.max_characters": 1})
    after = write_report_figures(run.run_dir, small)
    assert len([n for n in after if n.startswith("contact_")]) == 1
    assert len(list((run.run_dir / "report" / "figures").glob("contact_*.png"))) == 1


def test_characters_found_nowhere_are_named_in_the_section(scenes_demo_run, tmp_path):
    """A character whose pictures stage 03 matched in no frame (its manifest's
    ``characters_not_found``) is named in the characters section, with what to do, whether or
    not other characters were found."""
    src, overrides = scenes_demo_run
    run = _copy_run(src, tmp_path / "run")
    cfg = _cfg(tmp_path, **overrides)
    manifest = run.read_manifest("characters")
    assert manifest["facts"]["characters_not_found"] == []  # the demo's four are all found
    data = report_data(run, {"faces": run.read_table("faces"), "frames": run.read_table("frames")})
    section = _characters_section(data, cfg)
    assert section.status == "ok" and "found in no frame" not in section.message
    # tables/frames.parquet deleted: the counts stay, the sheets (which need it) go, said in one
    # phrase (it was a KeyError, "error: bug" from bunny run).
    frameless = _characters_section(replace(data, tables={"faces": data.tables["faces"]}), cfg)
    assert not [f for f in frameless.figures if f.name.startswith("contact_")]
    assert [f for f in section.figures if f.name.startswith("contact_")]
    assert (
        "no contact sheets: tables/frames.parquet is missing (run stage extract again)" in frameless.message
    )
    # Appearances on both sides of the count ("1 named characters, 11 unknown" left out the named).
    faces = run.read_table("faces")
    named = faces["character"].drop_nulls()
    assert section.message.startswith(
        f"{faces.height} appearances: {named.len()} named ({named.n_unique()} characters), "
    )
    # A named face fixed to none in notebook 03 is a false sighting, not one more unknown face.
    unknown = faces.height - named.len()
    first = faces["character"].is_not_null().arg_true()[0]
    fixed = faces.with_columns(
        pl.when(pl.int_range(pl.len()) == first).then(None).otherwise(pl.col("character")).alias("character"),
        (pl.col("edited") | (pl.int_range(pl.len()) == first)).alias("edited"),
    )
    message = _characters_section(replace(data, tables={**data.tables, "faces": fixed}), cfg).message
    assert f"{named.len() - 1} named" in message and message.endswith(
        f", {unknown} unknown, 1 fixed to none (false sightings)"
    ), message
    manifest["facts"]["characters_not_found"] = ["stranger", "wyvern"]
    data = replace(data, manifests={**data.manifests, "characters": manifest})
    section = _characters_section(data, cfg)
    assert section.message.endswith(
        "; found in no frame despite their pictures: stranger, wyvern (add a still of each in notebook 03)"
    )
    empty = replace(data, tables={"faces": run.read_table("faces").clear()})
    assert _characters_section(empty, cfg).message == (
        "stage characters found no character; found in no frame despite their pictures: stranger, wyvern "
        "(add a still of each in notebook 03)"
    )
    # No pictures given and nothing found: the section says that offline only faces are found.
    bare = {**manifest, "facts": {**manifest["facts"], "reference_dir": None, "characters_not_found": []}}
    empty = replace(empty, manifests={**data.manifests, "characters": bare})
    assert _characters_section(empty, cfg).message == (
        "stage characters found no character; no pictures were given, and offline only human faces are "
        "found without them (give --characters DIR, or set characters.backend: hub)"
    )
    hub = {**bare, "facts": {**bare["facts"], "hub": {"appearances": 0}}}
    empty = replace(empty, manifests={**data.manifests, "characters": hub})
    assert _characters_section(empty, cfg).message == "stage characters found no character"


def test_a_moved_run_folder_s_report_names_the_folder_it_is_in():
    """The page and the summary named the folder the report was built in: after a move, the
    report (up to date) pointed at the old place."""
    from diffusion_bunny.stages.report import summary
    from diffusion_bunny.stages.report.stage import _intro

    assert _intro(Path("/old/place/demo"), ()).startswith("Run folder `demo`. ")
    manifest = {"counts": {"figures": 3}, "facts": {"html": "report/index.html"}}
    assert (
        summary({**manifest, "run_folder": "/new/place/demo"})
        == "3 figures in /new/place/demo/report/index.html"
    )


def test_report_document_without_figures(tmp_path):
    figures = pl.DataFrame(
        {
            "order": [0],
            "section": ["captions"],
            "title": ["Caption lengths"],
            "status": ["absent"],
            "figure": [None],
            "figure_title": [None],
            "path": [None],
            "message": ["stage captions did not run (no tables/captions.parquet)"],
        },
        schema_overrides={"figure": pl.Utf8, "figure_title": pl.Utf8, "path": pl.Utf8},
    )
    nb = report_document(tmp_path, figures, title="QA report: nothing")
    assert [c.cell_type for c in nb.cells] == ["markdown", "markdown"]
    html = render_report_html(nb, tmp_path / "r" / "index.html").read_text()
    assert "stage captions did not run" in html and "QA report: nothing" in html
    # A movie's or a character's name is shown as it is, not read as markdown or HTML.
    named = figures.with_columns(pl.lit("R2-D2 <droid> and _grace_ met *twice*").alias("message"))
    nb = report_document(tmp_path, named, title="QA report: __main__.mkv")
    html = render_report_html(nb, tmp_path / "r" / "named.html").read_text()
    assert "QA report: __main__.mkv" in html and "<strong>main</strong>" not in html
    assert "R2-D2 &lt;droid&gt; and _grace_ met *twice*" in html


def test_report_page_loads_nothing_from_the_network(tmp_path):
    """The page is self-contained: nbconvert's lab template put require.js and MathJax from cdnjs
    in every report's head (and a mermaid import), so opening it contacted a third party and,
    offline, showed console errors. No script or stylesheet comes from http(s) now, and the
    page keeps its heading, text, embedded figure, table and styles."""
    png = figure_png(p9.ggplot(pl.DataFrame({"x": [1, 2]}), p9.aes("x", "x")) + p9.geom_point())
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "kept.png").write_bytes(png)
    figures = pl.DataFrame(
        {
            "order": [0],
            "section": ["funnel"],
            "title": ["Dataset funnel"],
            "status": ["ok"],
            "figure": ["kept"],
            "figure_title": ["Frames kept"],
            "path": ["figures/kept.png"],
            "message": ["3 frames kept of 5 at $x^2$"],
        }
    )
    tables = {"funnel": "<table><tr><td>with a named character</td></tr></table>"}
    nb = report_document(tmp_path, figures, title="QA report: offline.mkv", tables=tables)
    html = render_report_html(nb, tmp_path / "report" / "index.html").read_text()
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", html, flags=re.IGNORECASE)
    remote = [t for t in tags if re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", t, re.I)]
    assert remote == [], remote
    assert not re.search(r"""import\(\s*["']https?:""", html)  # no module fetched by a script either
    assert "cdnjs" not in html
    assert "QA report: offline.mkv" in html and "3 frames kept of 5" in html
    assert "with a named character" in html and 'alt="Frames kept"' in html
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 1
    assert "<style" in html and "jp-RenderedHTMLCommon" in html  # the lab page's own styles stay


def test_notebook_09_headless_on_the_demo_run(demo_run, tmp_path):
    """bunny run's path: notebook 09 through papermill writes the report and shows its figures."""
    from diffusion_bunny.pipeline.runner import RunOptions, execute_stage_notebook

    run = _copy_run(demo_run, tmp_path / "run")
    options = RunOptions(PIPELINE, load_config(None, {}), progress=False)
    executed = execute_stage_notebook(run, "report", options, "python3")
    nb = nbformat.read(executed, as_version=4)
    shown = pictures(nb)
    assert len(shown) == run.read_table("report_figures")["figure"].is_not_null().sum() == 4
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "stages that did not run: captions, characters, export, generate, scenes, train" in text
    assert (run.run_dir / "report" / "index.html").is_file()
    assert run.read_manifest("report")["counts"]["figures"] == 4


def test_the_batch_table_counts_named_characters_beside_stage_03s_state(scenes_demo_run, tmp_path):
    """Stage 03 is named ``characters``: its state column (done, stale, missing) and the count of
    characters named are two columns, and the batch's figure draws the count. (The count was
    called ``characters`` too, and the state took its place: the figure drew "done" and "stale"
    as bars.)"""
    src, overrides = scenes_demo_run
    cfg = _cfg(tmp_path, **overrides)
    faces = src.read_table("faces")
    named = faces["character"].drop_nulls().n_unique()
    table = movies_table([MovieReport(src.movie, src.run_dir)], cfg, PIPELINE, start=tmp_path)
    row = table.row(0, named=True)
    assert named >= 4 and (row["named_characters"], row["appearances"]) == (named, faces.height)
    assert (row["characters"], row["scenes"], row["captions"]) == ("done", "done", "missing")
    plot = movies_plot(table)
    assert isinstance(plot, p9.ggplot)
    drawn = dict(zip(plot.data["measure"].astype(str), plot.data["n"], strict=True))
    counts = {"frames": row["frames"], "kept": row["kept"], "shots": row["shots"]}
    assert drawn == {**counts, "characters named": named}


def test_the_batch_table_names_no_run_folder_for_a_movie_refused_before_it_had_one(tmp_path):
    """The combined report's ``run_dir`` named folders never made, for movies refused before
    their run folder was (an empty file; a file where the folder goes); it names run folders
    only, as ``bunny status`` lists them."""
    movies = {name: tmp_path / name for name in ("a.mp4", "empty.mp4", "blocked.mp4")}
    for name, path in movies.items():
        path.write_bytes(b"" if name == "empty.mp4" else name.encode() * 100)
    out = tmp_path / "out"
    Run.create(out / "a", movies["a.mp4"])
    (out / "blocked").write_text("mine")
    reports = [
        MovieReport(movies["a.mp4"], out / "a", error="stage extract failed"),
        MovieReport(movies["empty.mp4"], out / "empty", error="the file is empty"),
        MovieReport(movies["blocked.mp4"], out / "blocked", error="is a file, not a folder"),
    ]
    table = movies_table(reports, _cfg(tmp_path), PIPELINE, start=tmp_path)
    assert table["run_dir"].to_list() == [str(out / "a"), None, None]
    assert table["extract"].to_list() == ["missing"] * 3


def test_two_movies_of_one_file_name_each_keep_a_row_and_the_batch_figure_draws(tmp_path):
    """``bunny run season1 season2`` with an ``E01.mkv`` in each: the batch's report named both
    rows ``E01.mkv`` and its figure, which takes the names as categories, failed on them
    (``Categorical categories must be unique``) after every movie had run."""
    from diffusion_bunny.stages.report.combined import distinct_names

    assert distinct_names([Path("/f/season1/E01.mkv"), Path("/f/season2/E01.mkv"), Path("/f/b.mkv")]) == [
        "season1/E01.mkv",
        "season2/E01.mkv",
        "b.mkv",
    ]
    # Folders only as far back as they differ; the same path twice is numbered.
    assert distinct_names([Path("/a/x/s/E.mkv"), Path("/b/x/s/E.mkv"), Path("/a/x/s/E.mkv")]) == [
        "a/x/s/E.mkv (1)",
        "b/x/s/E.mkv",
        "a/x/s/E.mkv (2)",
    ]
    cfg = _cfg(tmp_path)
    reports = [MovieReport(tmp_path / s / "E01.mkv", None, error="boom") for s in ("s1", "s2")]
    table = movies_table(reports, cfg, PIPELINE, start=tmp_path)
    assert table["movie"].to_list() == ["s1/E01.mkv", "s2/E01.mkv"]
    counted = table.with_columns(
        frames=pl.lit(10), kept=pl.lit(4), shots=pl.lit(2), named_characters=pl.lit(1)
    )
    plot = movies_plot(counted)
    plot.draw()  # raised before the names were told apart
    assert set(plot.data["movie"].astype(str)) == {"s1/E01.mkv", "s2/E01.mkv"}


def _font(path: Path, family: str, chars: str) -> Path:
    """A TrueType font of ``family`` that draws printable ASCII and ``chars`` (each glyph a box),
    built with fontTools (matplotlib's own dependency): a CJK font the machine may not have."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    codes = sorted({*range(0x21, 0x7F), *map(ord, chars)})
    names = [".notdef", "space", *(f"u{c:X}" for c in codes)]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({32: "space", **{c: f"u{c:X}" for c in codes}})
    glyphs = {}
    for name in names:
        pen = TTGlyphPen(None)
        if name != "space":
            pen.moveTo((100, 0))
            pen.lineTo((100, 700))
            pen.lineTo((500, 700))
            pen.lineTo((500, 0))
            pen.closePath()
        glyphs[name] = pen.glyph()
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics(dict.fromkeys(names, (600, 100)))
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))
    return path


def _drawn_without_glyph_warnings(plot: p9.ggplot) -> dict[str, list[str]]:
    """Draw ``plot``; the movies' axis labels and the font families they are drawn with."""
    import io
    import warnings

    import matplotlib.pyplot as plt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plot.draw()
        fig.savefig(io.BytesIO(), format="png")  # the glyphs are looked up as the text is drawn
    try:
        assert not [w for w in caught if "missing from font" in str(w.message)]
        ticks = fig.axes[0].yaxis.get_major_ticks()
        return {t.label1.get_text(): list(t.label1.get_fontfamily()) for t in ticks}
    finally:
        plt.close(fig)


def test_movie_names_in_cjk_script_or_with_an_emoji_are_readable_on_the_batch_figure(tmp_path, monkeypatch):
    """A movie named ``千と千尋.mp4`` or ``🎬 film.mkv`` was a row of empty boxes on the batch's
    figure, and every missing glyph printed "Glyph NNN missing from font(s) DejaVu Sans" on the
    terminal. Now a font that draws the names is used where one is installed, else such a movie is
    labelled with its run folder's (ASCII) name; no warning either way."""
    from matplotlib import font_manager

    rows = {
        "movie": ["千と千尋.mp4", "🎬 film.mkv", "Amélie ❤️.mp4", "映画.mp4"],
        "run_dir": ["/o/movie-1234abcd", "/o/film-5678abcd", "/o/amelie-9abc0123", None],
    }
    movies = pl.DataFrame(rows).with_columns(
        frames=pl.lit(10), kept=pl.lit(4), shots=pl.lit(2), named_characters=pl.lit(1)
    )
    # no font on the machine draws CJK or the emoji (matplotlib's DejaVu only): run folder names
    dejavu = [f for f in font_manager.fontManager.ttflist if f.name.startswith(("DejaVu", "Last Resort"))]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", dejavu)
    labels = _drawn_without_glyph_warnings(movies_plot(movies))
    assert sorted(labels) == sorted(["movie-1234abcd", "film-5678abcd", "Amélie ❤️.mp4", "??.mp4"])
    # a font that draws them (as Noto Sans CJK would): the names, drawn with it
    cjk = _font(tmp_path / "cjk.ttf", "Test Sans CJK", "千と尋🎬映画❤\ufe0fé")
    font_manager.fontManager.addfont(str(cjk))
    labels = _drawn_without_glyph_warnings(movies_plot(movies))
    assert sorted(labels) == sorted(rows["movie"])
    assert all(family == ["Test Sans CJK"] for family in labels.values())


def test_characters_whose_names_give_one_slug_each_keep_their_contact_sheet(scenes_demo_run, tmp_path):
    """``Маша`` and ``Миша`` (slug ``movie`` both) had one PNG between them: the second sheet was
    written over the first, and the report showed Миша's faces under Маша's heading."""
    from diffusion_bunny.stages.report.sections import file_slugs

    slugs = file_slugs(["Маша", "Миша", "Anna", "anna", "grace hopper"])
    assert len(set(slugs.values())) == 5 and slugs["grace hopper"] == "grace-hopper"
    assert slugs["Маша"].startswith("movie-") and slugs["Anna"].startswith("anna-")
    src, overrides = scenes_demo_run
    run = _copy_run(src, tmp_path / "run")
    cfg = _cfg(tmp_path, **overrides, **{"report.contact_sheet_faces": 3})
    faces = run.read_table("faces")
    first, second = faces["character"].drop_nulls().value_counts(sort=True)["character"].head(2)
    renamed = {first: "Маша", second: "Миша"}
    run.write_table("faces", faces.with_columns(pl.col("character").replace(renamed)))
    paths = write_report_figures(run.run_dir, cfg)
    sheets = {name: path for name, path in paths.items() if name.startswith("contact_movie")}
    assert len(sheets) == 2 and len({p.read_bytes() for p in sheets.values()}) == 2


def test_notebook_09_shows_every_section_of_the_report():
    """The notebook shows the report's sections one by one; "What the LoRA will see" (the
    exported pictures and the drops by reason) was in index.html only."""
    from diffusion_bunny.stages.report.sections import SECTIONS

    nb = nbformat.read(Path(__file__).parents[3] / "notebook" / "09_qa_report.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    shown = set(re.findall(r'display_section\(run\.run_dir, figures, "(\w+)"\)', code))
    shown |= {k for loop in re.findall(r"for key in \(([^)]*)\)", code) for k in re.findall(r'"(\w+)"', loop)}
    assert shown == set(SECTIONS)
