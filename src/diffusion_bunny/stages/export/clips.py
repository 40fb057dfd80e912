"""Shot clips for a video LoRA (``export.video_clips``), pure over the tables: which shots give a
clip, where the clip lies in its shot, its caption, and the dataset configs musubi-tuner and
diffusion-pipe read. The cutting itself is :mod:`diffusion_bunny.media.clips`.

One clip per kept shot with a named character. The clip spans ``(clip_frames - 1) / clip_fps``
seconds, centred in the shot (diffusion-pipe's ``single_middle``), and all its target times fall on
frames of the shot (the last source frame is at ``end_s - 1 / fps``): a clip never crosses a cut.
A shot shorter than that span gives no clip (it is counted, not padded or looped: a looped or
slowed clip would teach the LoRA motion the movie does not have). Its caption is the caption of
the shot's middle exported full-frame picture (trigger word and names included, as stage 06 wrote
it), or, where none was exported, of the middle exported frame as stage 05 captioned it; its
characters are every character named in the shot's exported pictures.
"""

from __future__ import annotations

import json

import polars as pl

from diffusion_bunny.stages.export.tables import CLIP_SCHEMA


def clip_span(start_s: float, end_s: float, src_fps: float, clip_fps: float, clip_frames: int):
    """``(start_s, end_s)`` of the clip in a shot, or None when the shot is too short. ``end_s`` is
    the last target time + 1 / clip_fps (the clip's duration as a player shows it)."""
    span = (clip_frames - 1) / clip_fps
    usable = (end_s - 1.0 / src_fps) - start_s
    # Shot times are stored to the microsecond: a shot exactly a clip long (49 frames at 24 fps for
    # 33 at 16) came out a rounding error short and gave no clip.
    if usable < span - 1e-5:
        return None
    t0 = start_s + (usable - span) / 2
    return t0, t0 + span + 1.0 / clip_fps


def plan_clips(
    shots: pl.DataFrame,
    items: pl.DataFrame,
    src_fps: float,
    clip_fps: float,
    clip_frames: int,
    size: tuple[int, int],
    frame_captions: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, int]:
    """The ``clips`` table and how many shots with a named character were too short.

    ``shots``: stage 01's (shot_id, start_s, end_s); ``items``: the planned ``dataset_items``
    (only shots that kept a picture count, so the clip follows the picture set's choices);
    ``frame_captions``: each frame's own caption (stage 05's), the caption of a clip whose shot
    exported no full-frame picture (``export.crops`` without ``full``): a face crop's caption
    said "close-up" of a clip that shows the whole frame."""
    named = items.filter(pl.col("characters").list.len() > 0)
    rows, short = [], 0
    by_shot = {s: part for (s,), part in named.partition_by("shot_id", as_dict=True).items()}
    for shot in shots.sort("shot_id").iter_rows(named=True):
        part = by_shot.get(shot["shot_id"])
        if part is None:
            continue
        span = clip_span(shot["start_s"], shot["end_s"], src_fps, clip_fps, clip_frames)
        if span is None:
            short += 1
            continue
        full = part.filter(pl.col("crop") == "full").sort("frame_index")
        if full.height:
            caption = full.row(full.height // 2, named=True)["text"]
        else:
            frames = part.sort("frame_index").unique("frame_id", maintain_order=True)
            middle = frames.row(frames.height // 2, named=True)
            caption = (frame_captions or {}).get(middle["frame_id"]) or middle["text"]
        region = _shot_region(shot, full)
        characters = sorted({c for cs in part["characters"].to_list() for c in cs})
        rows.append(
            {
                "clip_id": f"shot{shot['shot_id']:05d}",
                "shot_id": shot["shot_id"],
                "start_s": span[0],
                "end_s": span[1],
                "frames": clip_frames,
                "width": size[0],
                "height": size[1],
                "characters": characters,
                "caption": caption,
                **dict(zip(("crop_left", "crop_top", "crop_right", "crop_bottom"), region, strict=True)),
            }
        )
    return pl.DataFrame(rows, schema=CLIP_SCHEMA), short


def _shot_region(shot: dict, full: pl.DataFrame) -> tuple[int, int, int, int] | tuple[None, ...]:
    """The part of the picture a shot's clip shows: the intersection of its exported full
    pictures' regions (each the shot's picture box, or that less a subtitle band), else the
    shot's own picture box, else nothing (None: the whole frame)."""
    if full.height:
        return (
            int(full["left"].max()),
            int(full["top"].max()),
            int(full["right"].min()),
            int(full["bottom"].min()),
        )
    box = tuple(shot.get(c) for c in ("box_left", "box_top", "box_right", "box_bottom"))
    return box if None not in box else (None, None, None, None)


def musubi_toml(video_dir: str, cache_dir: str, size: tuple[int, int], frames: int) -> str:
    """musubi-tuner dataset config (docs/dataset_config.md, video dataset with caption text files):
    the clips are already at the model's fps, so no ``source_fps`` (every frame is used);
    ``target_frames`` = the clip length, ``frame_extraction = "head"``."""
    return (
        "# musubi-tuner dataset config written by diffusion-bunny (stage 06, export.video_clips)\n"
        "[general]\n"
        f"resolution = [{size[0]}, {size[1]}]\n"
        'caption_extension = ".txt"\n'
        "batch_size = 1\n"
        "enable_bucket = true\n"
        "bucket_no_upscale = true\n\n"
        "[[datasets]]\n"
        f"video_directory = {toml_string(video_dir)}\n"
        f"cache_directory = {toml_string(cache_dir)}\n"
        f"target_frames = [{frames}]\n"
        'frame_extraction = "head"\n'
    )


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: a JSON string is one (quotes, backslashes and control
    characters escaped the same way). Pasted between quotes, a run folder under ``/home/o'neil``
    or ``C:\\Users`` made a config file the trainer could not read."""
    return json.dumps(str(text), ensure_ascii=False)


def diffusion_pipe_toml(video_dir: str, size: tuple[int, int], frames: int) -> str:
    """diffusion-pipe dataset config (examples/dataset.toml): ``resolutions`` is a side whose square
    gives the pixel area, ``frame_buckets`` the clip lengths (1 for still pictures). The aspect
    buckets span 0.5 to 2.0 (the example's) and the clips' own shape: 1024x256 clips beside buckets
    that stopped at 2:1 were trained squeezed into the nearest one."""
    side = round((size[0] * size[1]) ** 0.5)
    aspect = size[0] / size[1]
    return (
        "# diffusion-pipe dataset config written by diffusion-bunny (stage 06, export.video_clips)\n"
        f"resolutions = [{side}]\n"
        "enable_ar_bucket = true\n"
        f"min_ar = {round(min(0.5, aspect), 4)!r}\n"
        f"max_ar = {round(max(2.0, aspect), 4)!r}\n"
        "num_ar_buckets = 7\n"
        f"frame_buckets = [1, {frames}]\n\n"
        "[[directory]]\n"
        f"path = {toml_string(video_dir)}\n"
        "num_repeats = 1\n"
    )
