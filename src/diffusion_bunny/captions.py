"""Stage 05's tables: what each frame shows (facts), the offline template caption, and edits.

The facts of a frame (who is in it, how close the camera is, whether the shot moves, which scene
cluster it belongs to, how light it is) come from the tables of stages 01-04 and feed both the
``template`` provider and the prompt of the LLM providers (the known characters). They are pure
functions over tables, so notebook 05 can show them and a test can check them without a provider.

A person's edit of a caption is an append-only row in ``caption_edits`` (like stage 04's
``feedback``): the stage re-applies the latest edit of each frame after every run, so a rerun,
even with another provider, never overwrites what a person wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from diffusion_bunny.config import CaptioningConfig
from diffusion_bunny.errors import BadInputError
from diffusion_bunny.run import atomic_write_parquet

#: Columns of the ``captions`` table (the contract other stages rely on).
CAPTION_SCHEMA: dict[str, pl.DataType] = {
    "frame_id": pl.String,
    "caption": pl.String,
    "tags": pl.List(pl.String),
    "provider": pl.String,
    "model": pl.String,
    "status": pl.String,
    "error": pl.String,
    "prompt_version": pl.String,
    "latency_s": pl.Float64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
}

EDIT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "frame_id": pl.String,
    "caption": pl.String,
}

FACT_SCHEMA: dict[str, pl.DataType] = {
    "frame_id": pl.String,
    "path": pl.String,
    "characters": pl.List(pl.String),
    "unknown_faces": pl.Int64,
    "framing": pl.String,
    "motion": pl.String,
    "scene": pl.String,
    "light": pl.String,
}


def framing_of(face_ratio: float | None, cfg: CaptioningConfig) -> str:
    """``close-up``, ``medium shot`` or ``wide shot`` from the largest face's height over the
    frame's height (no face: wide): a cheap, explainable proxy for the camera distance."""
    if face_ratio is None or face_ratio < cfg.medium_ratio:
        return "wide shot"
    if face_ratio >= cfg.close_up_ratio:
        return "close-up"
    return "medium shot"


def light_of(brightness: float | None, cfg: CaptioningConfig) -> str:
    """``dark``, ``bright`` or ``""`` (ordinary light) from stage 02's mean brightness."""
    if brightness is None:
        return ""
    if brightness < cfg.dark_below:
        return "dark"
    if brightness > cfg.bright_above:
        return "bright"
    return ""


def caption_facts(
    frames: pl.DataFrame,
    cfg: CaptioningConfig,
    *,
    quality: pl.DataFrame | None = None,
    faces: pl.DataFrame | None = None,
    shots: pl.DataFrame | None = None,
    clusters: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per frame to caption (``captioning.frames``: the kept ones, or all) with what the
    earlier stages know about it. Tables that are absent leave their facts empty."""
    table = frames.select("frame_id", "path", "shot_id", "height")
    if quality is not None:
        q = quality.select("frame_id", "keep", "brightness")
        table = table.join(q, on="frame_id", how="left")
        if cfg.frames == "kept":
            table = table.filter(pl.col("keep").fill_null(False))
    else:
        table = table.with_columns(pl.lit(None, pl.Float64).alias("brightness"))
    table = table.sort("frame_id")

    per_frame: dict[str, tuple[list[str], int, float | None]] = {}
    if faces is not None and faces.height:
        heights = dict(zip(table["frame_id"].to_list(), table["height"].to_list(), strict=True))
        for fid, group in faces.filter(pl.col("frame_id").is_in(table["frame_id"].implode())).group_by(
            "frame_id"
        ):
            names = sorted({c for c in group["character"].to_list() if c})
            unknown = int(group["character"].is_null().sum())
            face_h = (group["bottom"] - group["top"]).max()
            height = heights.get(fid[0]) or 0
            ratio = float(face_h) / height if height and face_h is not None else None
            per_frame[fid[0]] = (names, unknown, ratio)

    motion: dict[int, str] = {}
    if shots is not None:
        motion = {
            int(s): ("moving shot" if k == "dynamic" else "static shot")
            for s, k in zip(shots["shot_id"].to_list(), shots["kind"].to_list(), strict=True)
        }
    scene: dict[str, str] = {}
    if clusters is not None and clusters.height:
        level = clusters.filter(pl.col("level") == "scene")
        scene = dict(zip(level["frame_id"].to_list(), level["cluster_id"].to_list(), strict=True))

    rows = []
    for rec in table.iter_rows(named=True):
        names, unknown, ratio = per_frame.get(rec["frame_id"], ([], 0, None))
        rows.append(
            {
                "frame_id": rec["frame_id"],
                "path": rec["path"],
                "characters": names,
                "unknown_faces": unknown,
                "framing": framing_of(ratio, cfg),
                "motion": motion.get(int(rec["shot_id"]), "") if rec["shot_id"] is not None else "",
                "scene": scene.get(rec["frame_id"], ""),
                "light": light_of(rec["brightness"], cfg),
            }
        )
    return pl.DataFrame(rows, schema=FACT_SCHEMA)


def _scene_phrase(scene: str, cfg: CaptioningConfig) -> str:
    if not scene or scene == "noise":
        return ""
    name = cfg.scene_names.get(scene)
    return f"in the {name}" if name else f"scene {scene}"


def template_caption(facts: dict, cfg: CaptioningConfig) -> tuple[str, list[str]]:
    """The offline caption of one frame (a row of :func:`caption_facts`) and its tags.

    Order follows what LoRA trainers expect (trigger word first, then who, then how it is shot):
    ``bunnystyle, astronaut and grace_hopper, close-up, static shot, dark, in the kitchen``.
    """
    names = list(facts["characters"] or [])
    unknown = int(facts["unknown_faces"] or 0)
    if names:
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        if unknown:
            who += f" and {unknown} other {'person' if unknown == 1 else 'people'}"
    elif unknown:
        who = "a person" if unknown == 1 else f"{unknown} people"
    else:
        who = "no people"
    parts = [cfg.trigger_word, who, facts["framing"], facts["motion"], facts["light"]]
    parts.append(_scene_phrase(facts["scene"], cfg))
    caption = ", ".join(p for p in parts if p)
    tags = [*names, facts["framing"], facts["motion"], facts["light"]]
    if facts["scene"]:
        tags.append(f"scene:{facts['scene']}")
    if not names:
        tags.append("no named character" if unknown else "no people")
    return caption, [t for t in tags if t]


# ---------------------------------------------------------------------------------------------
# A person's edits


def _edits_path(run_dir: Path) -> Path:
    return Path(run_dir) / "tables" / "caption_edits.parquet"


@contextmanager
def captions_lock(run_dir: str | Path) -> Iterator[None]:
    """A file lock around the captions and edits tables, so an edit from the notebook and a
    stage run in another process never lose each other's writes."""
    from filelock import FileLock

    path = Path(run_dir) / "tables" / ".captions.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=120):
        yield


def read_edits(run_dir: str | Path) -> pl.DataFrame:
    """Every edit so far (empty table with the schema when there are none)."""
    path = _edits_path(Path(run_dir))
    if not path.is_file():
        return pl.DataFrame(schema=EDIT_SCHEMA)
    return pl.read_parquet(path)


def apply_edits(captions: pl.DataFrame, edits: pl.DataFrame) -> pl.DataFrame:
    """Captions with each frame's latest edit in place (``status edited``; ``provider`` and
    ``model`` stay those of the caption the person started from)."""
    if not edits.height:
        return captions
    latest = (
        edits.sort("ts").unique("frame_id", keep="last").select("frame_id", pl.col("caption").alias("_edit"))
    )
    out = captions.join(latest, on="frame_id", how="left")
    edited = pl.col("_edit").is_not_null()
    return out.with_columns(
        pl.when(edited).then(pl.col("_edit")).otherwise(pl.col("caption")).alias("caption"),
        pl.when(edited).then(pl.lit("edited")).otherwise(pl.col("status")).alias("status"),
        pl.when(edited).then(pl.lit(None, pl.String)).otherwise(pl.col("error")).alias("error"),
    ).drop("_edit")


def edit_caption(run_dir: str | Path, frame_id: str, caption: str) -> pl.DataFrame:
    """Record a person's caption for one frame and update the ``captions`` table at once.

    The edit goes to the append-only ``caption_edits`` table first (the stage re-applies it
    after any rerun), then into ``captions``; both under :func:`captions_lock`. Returns the
    updated captions table.
    """
    run_dir = Path(run_dir)
    text = " ".join(str(caption).split())
    if not text:
        raise BadInputError(f"the caption of {frame_id} is empty; type a caption (or leave it as it was)")
    captions_path = run_dir / "tables" / "captions.parquet"
    with captions_lock(run_dir):
        if not captions_path.is_file():
            raise BadInputError(f"no captions in {run_dir}; run stage captions first")
        captions = pl.read_parquet(captions_path)
        if frame_id not in set(captions["frame_id"].to_list()):
            raise BadInputError(
                f"frame {frame_id} has no caption row in {run_dir}; pick a frame from the table"
            )
        row = pl.DataFrame(
            {
                "event_id": [uuid.uuid4().hex],
                "ts": [datetime.now(UTC)],
                "frame_id": [frame_id],
                "caption": [text],
            },
            schema=EDIT_SCHEMA,
        )
        edits = pl.concat([read_edits(run_dir), row])
        atomic_write_parquet(_edits_path(run_dir), edits)
        captions = apply_edits(captions, row)
        atomic_write_parquet(captions_path, captions)
    return captions


#: Caption statuses a dataset may use (the contract): written by a provider, or by a person.
USABLE_STATUSES = ("ok", "edited")


def usable_captions(captions: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``captions`` a dataset can use: caption set and not blank, status ``ok`` or
    ``edited``. Stage 06 exports exactly these; the report and the plots count them."""
    return captions.filter(
        pl.col("caption").is_not_null()
        & (pl.col("caption").str.strip_chars() != "")
        & pl.col("status").is_in(USABLE_STATUSES)
    )


def caption_lengths(captions: pl.DataFrame) -> pl.DataFrame:
    """Words and characters per usable caption (for the length plots of notebooks 05 and 09)."""
    return usable_captions(captions).select(
        "frame_id",
        "provider",
        "status",
        pl.col("caption")
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
        .list.len()
        .alias("words"),
        pl.col("caption").str.len_chars().alias("chars"),
    )


def word_frequencies(captions: pl.DataFrame, *, top: int = 25, skip: tuple[str, ...] = ()) -> pl.DataFrame:
    """The most frequent words across captions (lower-cased, punctuation stripped)."""
    usable = captions.filter(pl.col("caption").is_not_null())
    words = (
        usable.select(pl.col("caption").str.to_lowercase().str.replace_all(r"[^\w\s:+-]", " ").str.split(" "))
        .explode("caption")
        .filter(pl.col("caption").str.len_chars() > 1)
        .filter(~pl.col("caption").is_in(list(skip)))
    )
    return (
        words.group_by("caption")
        .len()
        .rename({"caption": "word", "len": "count"})
        .sort(["count", "word"], descending=[True, False])
        .head(top)
    )


def load_dotenv_once() -> None:
    """Secrets may live in ``.env`` (the workspace's, then the working directory's); values already
    in the environment win. Nothing from it is ever written anywhere."""
    from dotenv import load_dotenv

    from diffusion_bunny.config import workspace_root

    for folder in (workspace_root(), Path.cwd()):
        env = folder / ".env"
        if env.is_file():
            load_dotenv(env, override=False)
