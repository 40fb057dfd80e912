"""Stage 04 (``scenes``): embeddings, two-level clusters, corrections applied and learned from.

What a run of the stage does, in order:

1. Picks the frames (those stage 02 kept, or all with ``scenes.frames: all``).
2. Embeds the frames that have no embedding yet for this embedder (an embedding is reused while
   the frame file keeps its size: the frame ids of a run are stable, so a rerun or a new frame
   costs only the new frames).
3. With corrections in ``feedback`` and ``scenes.adapter: auto``, trains the adapter on them
   (:mod:`diffusion_bunny.stages.scenes.adapter`) and clusters in the adapted space.
4. Clusters: incrementally (new frames against the existing exemplars, old clusters untouched)
   when nothing but the set of frames changed since the last run, or against a shared library
   (``scenes.library_dir``); otherwise afresh, with the previous ids kept for the clusters it
   reproduces.
5. Adds the character level from stage 03's names and applies every correction (latest wins);
   a run that joins a library (or moves to another) first names the corrections' clusters in
   the library's ids (:class:`_LibraryJoin`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from filelock import FileLock

from diffusion_bunny.errors import BadInputError, DamagedTableError, StageError, UserError
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.atomic import atomic_write_bytes, atomic_write_parquet
from diffusion_bunny.pipeline.contract import Context, StageOutput
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.extract.tables import frame_image_path, frame_regions, region_of
from diffusion_bunny.stages.scenes.adapter import Adapter, train_adapter_for, triplets_from_feedback
from diffusion_bunny.stages.scenes.clustering import (
    ExemplarIndex,
    apply_feedback,
    assign_incremental,
    cluster_scenes,
    clusters_table,
    frame_characters,
    latest_moves,
    new_cluster_id,
    next_cluster_number,
    normalise,
    ordered_moves,
    renumber_by_size,
    scene_name,
    similar_frames,
    stable_ids,
)
from diffusion_bunny.stages.scenes.embeddings import embedder_name, make_embedder
from diffusion_bunny.stages.scenes.settings import ScenesSettings
from diffusion_bunny.stages.scenes.tables import (
    ADAPTER_FILE,
    FEEDBACK_SCHEMA,
    JOIN_FILE,
    LEVELS,
    NEW,
    NOBODY,
    NOISE,
    UNSCANNED,
    empty_feedback,
)
from diffusion_bunny.stages.scenes.timeline import (
    build_timeline,
    cluster_rows,
    clusters_csv,
    edl_rate,
    edl_text,
    fps_from_frames,
    start_timecode,
    timecode_frames,
)

EMBEDDING_SCHEMA = {
    "frame_id": pl.String,
    "embedder": pl.String,
    "file_bytes": pl.Int64,
    # The part of the frame described ("left,top,right,bottom": its picture box or stage 02's crop).
    "region": pl.Utf8,
    "vector": pl.List(pl.Float32),
}
#: Beside a shared library's ``scene_exemplars.parquet``: the ids of the folders a person made by
#: hand in any of its movies (no exemplar holds them).
HAND_MADE_FILE = "hand_made_clusters.parquet"
#: Beside it: the library's own id (:func:`library_key`), made on its first use.
LIBRARY_FILE = "library.json"
EXEMPLAR_SCHEMA = {
    "cluster_id": pl.String,
    "frame_id": pl.String,
    "movie_id": pl.String,
    "embedder": pl.String,
    "space": pl.String,
    "vector": pl.List(pl.Float32),
}


def frames_to_cluster(frames: pl.DataFrame, quality: pl.DataFrame | None, which: str) -> pl.DataFrame:
    """The frames stage 04 works on, in frame order: with ``scenes.frames: all`` every frame but
    those stage 02 found it could not read (their files are missing or damaged: the stage
    stopped on the first, with no clusters at all)."""
    if which == "kept" and quality is not None:
        kept = quality.filter(pl.col("keep")).select("frame_id")
        frames = frames.join(kept, on="frame_id", how="semi")
    elif quality is not None and "reject_reason" in quality.columns:
        unreadable = quality.filter(pl.col("reject_reason") == "unreadable").select("frame_id")
        frames = frames.join(unreadable, on="frame_id", how="anti")
    return frames.sort("frame_index")


def embed_frames(
    run_dir: Path,
    frames: pl.DataFrame,
    cfg: ScenesSettings,
    previous: pl.DataFrame | None,
    *,
    quality: pl.DataFrame | None = None,
    progress: bool = False,
) -> tuple[pl.DataFrame, int]:
    """The ``embeddings`` rows of ``frames`` (reusing ``previous`` ones that still match) and how
    many were computed now. Each frame is described inside its region (the picture box, or
    stage 02's crop from ``quality``), never with its bars."""
    name = embedder_name(cfg)
    paths = [run_dir / p for p in frames["path"].to_list()]
    sizes = [p.stat().st_size if p.is_file() else -1 for p in paths]
    found = {r["frame_id"]: region_of(r) for r in frame_regions(frames, quality).iter_rows(named=True)}
    fids = frames["frame_id"].to_list()
    regions = [found.get(f) for f in fids]
    keys = [",".join(map(str, r)) if r else "" for r in regions]
    cache: dict[tuple[str, int, str], list[float]] = {}
    if previous is not None and not previous.is_empty() and "region" in previous.columns:
        same = previous.filter(pl.col("embedder") == name)
        cache = {
            (f, b, r): v
            for f, b, r, v in same.select("frame_id", "file_bytes", "region", "vector").iter_rows()
        }
    wanted = list(zip(fids, sizes, keys, strict=True))
    todo = [i for i, k in enumerate(wanted) if k not in cache]
    vectors: list[Any] = [cache.get(k) for k in wanted]
    if todo:  # the embedder (for CLIP: the model) is loaded only when a frame needs it
        fresh = make_embedder(cfg).embed_images(
            [paths[i] for i in todo], progress=progress, regions=[regions[i] for i in todo]
        )
        for i, vec in zip(todo, fresh, strict=True):
            vectors[i] = vec.astype(np.float32).tolist()
    table = pl.DataFrame(
        {
            "frame_id": fids,
            "embedder": [name] * len(fids),
            "file_bytes": sizes,
            "region": keys,
            "vector": vectors,
        },
        schema=EMBEDDING_SCHEMA,
    )
    return table, len(todo)


def _space(embedder: str, adapter_key: str | None) -> str:
    return embedder if adapter_key is None else f"{embedder}+adapter:{adapter_key}"


def _feedback_key(feedback: pl.DataFrame) -> str:
    blob = feedback.select("anchor_id", "from_cluster", "to_cluster", "level").write_csv().encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def library_path(cfg: ScenesSettings) -> Path | None:
    if cfg.library_dir is None:
        return None
    path = Path(cfg.library_dir).expanduser()
    return path if path.is_absolute() else workspace_root() / path


def _adapter_key(feedback_key: str, embedder: str, cfg: ScenesSettings) -> str:
    settings = (cfg.adapter_hidden, cfg.adapter_epochs, cfg.adapter_lr, cfg.adapter_margin)
    blob = repr((feedback_key, embedder, *settings, cfg.adapter_identity_weight, cfg.seed)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _saved_adapter(path: Path, key: str, dim: int) -> Adapter | None:
    """The adapter saved by an earlier run from the same corrections, settings and embedder."""
    if not path.is_file():
        return None
    try:
        adapter = Adapter.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # damaged: trained again
        return None
    return adapter if adapter.key == key and adapter.dim == dim else None


def _adapted_vectors(
    raw: np.ndarray,
    fids: list[str],
    feedback: pl.DataFrame,
    prev_clusters: pl.DataFrame | None,
    cfg: ScenesSettings,
    adapter_path: Path,
    *,
    learn: bool,
    embedder: str = "",
) -> tuple[np.ndarray, str | None, dict[str, Any]]:
    """The vectors to cluster: through an adapter trained on the corrections when there are
    usable ones (``scenes.adapter: auto``), else the embeddings as they are. Returns the vectors,
    the key of the corrections the adapter learned from (None without one) and its facts.

    The adapter is trained once per set of corrections: a later run with the same corrections
    (new frames, another threshold) reuses the saved one. Trained again, it would learn from the
    previous clustering's labels, which that clustering made through it, and come out another
    adapter under the same space name; the incremental path would then keep clusters made in a
    space that is no longer the one new frames are placed in."""
    if cfg.adapter == "auto" and not feedback.is_empty() and learn:
        feedback_key = _feedback_key(feedback)
        key = _adapter_key(feedback_key, embedder, cfg)
        saved = _saved_adapter(adapter_path, key, raw.shape[1])
        if saved is not None:
            return saved.transform(raw), feedback_key, {"triplets": saved.triplets, "reused": True}
        # Where a person sees each frame now: the previous clusters with every correction applied,
        # and a moved frame those clusters lack (stage 02 left it out of the last run, and a
        # threshold put back now) where its last move put it: it counted as noise and taught
        # nothing, and the run that recorded "no adapter" was then judged up to date.
        labels = {f: NOISE for f in fids}
        placed: set[str] = set()
        if prev_clusters is not None and not prev_clusters.is_empty():
            scene_rows = apply_feedback(prev_clusters, feedback).filter(pl.col("level") == "scene")
            labels.update(scene_rows.select("frame_id", "cluster_id").iter_rows())
            placed = set(scene_rows["frame_id"].to_list())
        for fid, _, target in ordered_moves(feedback):
            if fid not in placed:
                labels[fid] = target.partition("/")[0]
        triplets = triplets_from_feedback(feedback, fids, labels)
        if triplets:
            adapter = train_adapter_for(raw, triplets, cfg)
            adapter.key = key
            adapter.save(adapter_path)
            facts = {"triplets": len(triplets), "final_loss": adapter.losses[-1] if adapter.losses else None}
            return adapter.transform(raw), feedback_key, facts
    adapter_path.unlink(missing_ok=True)  # an adapter from earlier corrections no longer applies
    return raw, None, {"triplets": 0}


def _fresh_clusters(
    vectors: np.ndarray,
    fids: list[str],
    prev_clusters: pl.DataFrame | None,
    cfg: ScenesSettings,
    movie_id: str,
    embedder_name: str,
    space: str,
    thresholds: dict[str, float],
    reserved: set[str] = frozenset(),
) -> tuple[list[str], np.ndarray, pl.DataFrame]:
    """Cluster from scratch, keeping the ids (and so the board's folders) of the clusters a
    previous run made when it reproduces them; the others take ids past those and ``reserved``."""
    result = cluster_scenes(vectors, fids, index_min_frames=cfg.index_min_frames, **thresholds)
    old_scene: dict[str, str] = {}
    placed: dict[str, str] = {}
    if prev_clusters is not None:
        # The frames a person placed are left out: their clusters come from the corrections, re-
        # applied after this. Counted, two frames moved into a folder won its id for the cluster
        # they came from, and the folder's own frames, never moved, went to a new id. Where they
        # were put names a cluster no previous one claims (stable_ids' ``placed``).
        manual = pl.col("manual").fill_null(False) if "manual" in prev_clusters.columns else pl.lit(False)
        scene = prev_clusters.filter(pl.col("level") == "scene")
        old_scene = dict(scene.filter(~manual).select("frame_id", "cluster_id").iter_rows())
        placed = dict(scene.filter(manual).select("frame_id", "cluster_id").iter_rows())
    if old_scene or placed or reserved:
        mapping = stable_ids(result.labels, fids, old_scene, sorted(reserved), placed)
    else:
        mapping = renumber_by_size(result.labels, fids)
    labels = [mapping.get(label, NOISE) for label in result.labels]
    # Two clusters may share an id (a place a person merged into another): each keeps its exemplar.
    exemplars = _exemplar_rows(
        [(mapping[c], f, v) for c, f, v in _triples(result)],
        movie_id,
        embedder_name,
        space,
    )
    return labels, result.similarity, exemplars


def _cluster_counts(clusters: pl.DataFrame) -> dict[str, int]:
    scene = clusters.filter(pl.col("level") == "scene")
    character = clusters.filter(pl.col("level") == "character")
    return {
        "scene_clusters": scene.filter(pl.col("cluster_id") != NOISE)["cluster_id"].n_unique(),
        "character_clusters": character.filter(pl.col("cluster_id") != NOISE)["cluster_id"].n_unique(),
        # A scene's frames where nobody is named are a sub-cluster of their own: say how many, so
        # a run that named nobody does not read as one that found characters.
        "nobody_clusters": character.filter(pl.col("cluster_id").str.ends_with(f"/{NOBODY}"))[
            "cluster_id"
        ].n_unique(),
        "unscanned_clusters": character.filter(pl.col("cluster_id").str.ends_with(f"/{UNSCANNED}"))[
            "cluster_id"
        ].n_unique(),
        "noise": int((scene["cluster_id"] == NOISE).sum()),
        "manual": int(clusters["manual"].sum()),
    }


def _corrections(ctx: Context) -> pl.DataFrame:
    """The feedback table, checked and cast (:func:`checked_feedback`); empty before the first move."""
    feedback = ctx.optional("feedback")
    if feedback is None:
        return empty_feedback()
    return checked_feedback(feedback, ctx.run.table_path("feedback"))


def future_moves(feedback: pl.DataFrame, now: datetime | None = None) -> list[str]:
    """One line when corrections are dated after ``now`` (a minute's grace): the latest move of a
    frame wins by its time, so such a row, typed by hand in local time east of UTC (a time
    without a zone is read as UTC, the board's), undid the moves made after it on the board."""
    now = now or datetime.now(UTC)
    ahead = feedback.filter(pl.col("ts") > now + timedelta(minutes=1)).sort("ts")
    if ahead.is_empty():
        return []
    first = ahead.row(0, named=True)
    return [
        f"{ahead.height} correction(s) in feedback.parquet are dated in the future (first: frame "
        f"{first['anchor_id']} at {first['ts']:%Y-%m-%d %H:%M} UTC), so they win over every move made "
        "since; write their ts in UTC (or with its zone)"
    ]


def compute(ctx: Context) -> StageOutput:
    """Stage 04 on a run (see the module docstring for the steps): embed (reusing the embeddings
    of unchanged frames), cluster, apply every correction a person made."""
    run_dir, cfg, quality = ctx.run_dir, ctx.cfg.scenes, ctx.table("quality")
    previous = {name: df for name in ctx.writes if (df := ctx.own_previous(name)) is not None}
    feedback = _corrections(ctx)
    warnings = future_moves(feedback)
    chosen = frames_to_cluster(ctx.table("frames"), quality, cfg.frames)
    if chosen.is_empty():
        if ctx.table("frames").is_empty():
            raise StageError("no frames to cluster: stage 01 kept none (see its warning and notebook 01)")
        raise StageError(
            "no frames to cluster: stage 02 kept none (see notebook 02, or set scenes.frames: all)"
        )
    embeddings, computed = embed_frames(
        run_dir, chosen, cfg, previous.get("embeddings"), quality=quality, progress=ctx.progress
    )
    fids = embeddings["frame_id"].to_list()
    raw = normalise(np.asarray(embeddings["vector"].to_list(), dtype=np.float32))
    embedder_name = embeddings["embedder"][0]

    library = library_path(cfg)
    prev, adapter_path = previous.get("clusters"), run_dir / ADAPTER_FILE
    vectors, adapter_key, adapter_facts = _adapted_vectors(
        raw, fids, feedback, prev, cfg, adapter_path, learn=library is None, embedder=embedder_name
    )
    if library is not None and not feedback.is_empty():
        warnings.append(
            "scenes.library_dir is set: corrections are kept as manual placements, but no adapter is "
            "trained from them (models/scene_adapter.npz removed); unset scenes.library_dir to train one"
        )
    space = _space(embedder_name, adapter_key)
    thresholds = dict(assign_threshold=cfg.assign_threshold, noise_threshold=cfg.noise_threshold)
    join, key = _library_join(ctx, library, feedback, previous)
    # Ids a correction used (a folder made by hand has no exemplar to hold its id, and one a person
    # emptied holds no frame): none is reused. An emptied id given to another place named that
    # place with the old one's `captions.scene_names` entry. Those of a clustering this run leaves
    # for a library name nothing there (they are translated).
    reserved = set() if join is not None else {c.partition("/")[0] for c in _named(feedback)} - {NOISE, NEW}
    labels, sims, exemplars, mode = _cluster(
        ctx, previous, fids, vectors, library, embedder_name, space, thresholds, reserved
    )
    if join is not None:
        join.now = dict(zip(fids, labels, strict=True))
        feedback = join.translate(feedback)
        warnings.extend(join.warning_lines(feedback))
    characters = _characters(ctx.optional("faces"), ctx.optional("face_frames"), fids)
    clusters = clusters_table(fids, labels, sims, chosen["shot_id"].to_list(), characters)
    vec_by_frame = dict(zip(fids, vectors, strict=True))
    moves = latest_moves(feedback)
    clusters = apply_feedback(clusters, feedback, vec_by_frame)
    counts = {
        "frames": len(fids),
        "embedded_now": computed,
        **_cluster_counts(clusters),
        "corrections": len(moves),
        # Counted as "corrections" is (one per frame and level moved).
        "corrections_on_frames_gone": sum(1 for fid, _ in moves if fid not in vec_by_frame),
    }
    facts = {
        "mode": mode,
        "space": space,
        "embedder": embedder_name,
        "thresholds": thresholds,
        "adapter": adapter_facts,
        "library": str(library) if library else None,
        "library_key": key,
    }
    if join is not None:  # old id -> library id; the same dict, so a move made meanwhile is in it too
        facts["library_join"] = join.ids
    return StageOutput(
        tables={"embeddings": embeddings, "clusters": clusters, "scene_exemplars": exemplars},
        counts=counts,
        warnings=warnings,
        facts=facts,
        merge=_with_new_moves(ctx.run, feedback.height, vec_by_frame, join, (library, key)),
        settled=_settled(library, key, join),
    )


def _settled(library: Path | None, key: str | None, join: _LibraryJoin | None) -> dict[str, str | None]:
    """The inputs a run changes itself (:attr:`StageOutput.settled`): the library's id, made on its
    first run (recorded as the id the run clustered against, ``key``: a library made again
    meanwhile by another movie leaves this one stale), and the feedback a join rewrites in the
    library's ids (fingerprinted as read, the stage said "its inputs changed (feedback)" right
    after the join)."""
    if library is None or key is None:
        return {}
    return {"library": key, "feedback": None} if join is not None else {"library": key}


def _with_new_moves(
    run: Run,
    seen: int,
    vectors: dict[str, np.ndarray],
    join: _LibraryJoin | None,
    shared: tuple[Path | None, str | None],
) -> Callable[[dict[str, pl.DataFrame]], dict[str, pl.DataFrame]]:
    """The stage's merge: under the commit's locks (clusters and feedback, the ones
    move_to_cluster takes), just before the write, a frame moved on the board while the stage
    computed is placed too, so the move does not vanish until the next run. The manifest still
    fingerprints the feedback the stage read, so the next run also relearns from it; but for a
    join, which rewrites it here (:func:`_settled`): with a library no adapter learns anyway.

    A run that joins a library writes ``feedback`` here, in the library's ids (:class:`_LibraryJoin`),
    with the writer of a person's tables (a backup kept) and under the lock the board writes it
    under; the moves made meanwhile are in the old ids too (the board showed the old clusters).
    Any run against a library (``shared``: its folder and :func:`library_key`) records that the
    corrections are in its ids (:data:`JOIN_FILE`)."""
    library, key = shared

    def merge(tables: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
        latest = read_feedback(run.run_dir)
        if join is not None:
            original, latest = latest, join.translate(latest)
            join.write(original, latest)
            run.write_table("feedback", latest, backup=True)
        elif library is not None and key is not None:
            write_record(run.run_dir / JOIN_FILE, library, key, latest)
        if latest.height == seen:
            return tables
        return {**tables, "clusters": apply_feedback(tables["clusters"], latest, vectors)}

    return merge


def _cluster(
    ctx: Context,
    previous: dict[str, pl.DataFrame],
    fids: list[str],
    vectors: np.ndarray,
    library: Path | None,
    embedder_name: str,
    space: str,
    thresholds: dict[str, float],
    reserved: set[str],
) -> tuple[list[str], np.ndarray, pl.DataFrame, str]:
    """Labels, similarities, exemplars and the mode that made them: against a shared library
    (``scenes.library_dir``), incrementally (new frames against the last run's exemplars, old
    clusters untouched) when nothing but the set of frames changed since the last run (its
    ``previous`` tables and manifest), else afresh. New clusters take ids past ``reserved``."""
    movie_id, cfg, previous_facts = ctx.run.movie_key, ctx.cfg.scenes, (ctx.previous or {}).get("facts")
    prev_clusters, prev_ex = previous.get("clusters"), previous.get("scene_exemplars")
    same_setup = (
        previous_facts is not None
        and previous_facts.get("space") == space
        and previous_facts.get("thresholds") == thresholds
        and prev_ex is not None
        and prev_clusters is not None
    )
    if library is not None:
        held = _library_held(ctx, library, prev_clusters)
        return _assign_library(library, movie_id, fids, vectors, space, cfg, reserved, held=held)
    if same_setup:
        return _assign_new(fids, vectors, prev_clusters, prev_ex, cfg, movie_id, space, reserved)
    if prev_clusters is None and prev_ex is not None:
        # The clusters table was lost (deleted by hand): the exemplars, a frame per cluster, still
        # say which id was which. Without them every id was fresh, and a move's folder id named a
        # folder of the moved frame alone, the frames it had joined gone to another id.
        prev_clusters = prev_ex.select("frame_id", "cluster_id").with_columns(pl.lit("scene").alias("level"))
    labels, sims, exemplars = _fresh_clusters(
        vectors, fids, prev_clusters, cfg, movie_id, embedder_name, space, thresholds, reserved
    )
    return labels, sims, exemplars, "full"


def _characters(
    faces: pl.DataFrame | None, face_frames: pl.DataFrame | None, fids: list[str]
) -> dict[str, tuple[str, ...]]:
    """Who stage 03 named in each frame (the character level), with the frames it searched
    (its ``face_frames`` with status ok) told apart from those it never looked at. Without stage
    03's tables (``--stages extract,quality,scenes``) no frame was searched: every frame was filed
    under "nobody", as if it showed no one."""
    scanned = None if faces is not None else set()
    if face_frames is not None:
        scanned = set(face_frames.filter(pl.col("status") == "ok")["frame_id"].to_list())
    return frame_characters(faces, fids, scanned)


def _exemplar_rows(
    exemplars: Iterable[tuple[str, str, np.ndarray]], movie_id: str, embedder: str, space: str
) -> pl.DataFrame:
    """The ``scene_exemplars`` rows of ``(cluster id, frame id, vector)`` triples, by id and frame
    (an id may have several: clusters a person merged)."""
    rows = [
        {
            "cluster_id": cid,
            "frame_id": fid,
            "movie_id": movie_id,
            "embedder": embedder,
            "space": space,
            "vector": vector.astype(np.float32).tolist(),
        }
        for cid, fid, vector in sorted(exemplars, key=lambda row: (row[0], row[1]))
    ]
    return pl.DataFrame(rows, schema=EXEMPLAR_SCHEMA)


def _triples(result: Any) -> list[tuple[str, str, np.ndarray]]:
    """A clustering result's exemplars as :func:`_exemplar_rows` takes them."""
    return [(c, f, result.exemplar_vectors[c]) for c, f in result.exemplars.items()]


def _index_from(exemplars: pl.DataFrame, dim: int, index_min_frames: int) -> ExemplarIndex:
    index = ExemplarIndex.for_frames(dim, index_min_frames)
    vectors = normalise(np.asarray(exemplars["vector"].to_list(), dtype=np.float32).reshape(-1, dim))
    for cid, vec in zip(exemplars["cluster_id"].to_list(), vectors, strict=True):
        index.add(cid, vec)
    return index


def _assign_new(
    fids: list[str],
    vectors: np.ndarray,
    prev_clusters: pl.DataFrame,
    prev_ex: pl.DataFrame,
    cfg: ScenesSettings,
    movie_id: str,
    space: str,
    reserved: set[str] = frozenset(),
):
    """Same space and thresholds as last time: keep every old frame's cluster, assign only the
    frames that are new against the existing exemplars (the clusters they open take ids past
    the old ones and ``reserved``)."""
    scene = prev_clusters.filter(pl.col("level") == "scene")
    old = dict(zip(scene["frame_id"].to_list(), scene["cluster_id"].to_list(), strict=True))
    old_sims = dict(zip(scene["frame_id"].to_list(), scene["similarity"].to_list(), strict=True))
    new_rows = [i for i, f in enumerate(fids) if f not in old]
    labels = [old.get(f, NOISE) for f in fids]
    sims = np.array([np.nan if old_sims.get(f) is None else old_sims[f] for f in fids], dtype=np.float32)
    exemplars = prev_ex
    if new_rows:
        index = _index_from(prev_ex, vectors.shape[1], cfg.index_min_frames)
        result = assign_incremental(
            vectors[new_rows],
            [fids[i] for i in new_rows],
            assign_threshold=cfg.assign_threshold,
            noise_threshold=cfg.noise_threshold,
            index_min_frames=cfg.index_min_frames,
            exemplars=index,
            first_number=next_cluster_number([*prev_ex["cluster_id"].to_list(), *old.values(), *reserved]),
        )
        for j, i in enumerate(new_rows):
            labels[i] = result.labels[j]
            sims[i] = result.similarity[j]
        embedder = prev_ex["embedder"][0] if prev_ex.height else space.split("+")[0]
        exemplars = pl.concat([prev_ex, _exemplar_rows(_triples(result), movie_id, embedder, space)])
    return labels, sims, exemplars, f"incremental ({len(new_rows)} new frames)"


def _assign_library(
    library: Path,
    movie_id: str,
    fids: list[str],
    vectors: np.ndarray,
    space: str,
    cfg: ScenesSettings,
    made: set[str] = frozenset(),
    *,
    held: bool = False,
):
    """Assign this run's frames against the shared library's exemplars (never reclustering them),
    adding the clusters it opens to the library, under the library's lock. The clusters it opens
    take ids past the library's, past those this run's corrections made (``made``) and past the
    folders any member movie made by hand (:data:`HAND_MADE_FILE`): else one id named two places.
    ``held``: the library held exemplars before (:func:`_library_held`), so a missing table is lost."""
    _library_folder(library)
    path = library / "scene_exemplars.parquet"
    with FileLock(str(library / ".library.lock"), timeout=120):
        if held and not path.is_file():  # an empty library then put the movie's moves alone
            raise StageError(
                f"the scene library's table {path} is missing, though the library held clusters; put "
                "back a copy of it, or give scenes.library_dir a new folder (its movies' scenes are then "
                "numbered again)"
            )
        lib = (
            _library_table(path, schema=EXEMPLAR_SCHEMA)
            if path.is_file()
            else pl.DataFrame(schema=EXEMPLAR_SCHEMA)
        )
        _keep_hand_made(library, made, lib)
        held = len(lib["vector"][0]) if lib.height else vectors.shape[1]
        if lib.height and (lib["space"][0] != space or held != vectors.shape[1]):
            # The length too: a CLIP folder given under one name may hold another model (it was
            # a raw reshape error, a bug's exit, or vectors of two models mixed at one length).
            raise StageError(
                f"the scene library {library} holds {lib['space'][0]} vectors of {held} numbers, this run "
                f"makes {space} of {vectors.shape[1]}; use the library's scenes.embedder (and model) or "
                "another scenes.library_dir"
            )
        # Library clusters are never removed or moved, not even this movie's own from an earlier
        # run: other movies' frames may have joined them. A rerun finds its exemplars again
        # (similarity 1), so its frames land where they were.
        index = _index_from(lib, vectors.shape[1], cfg.index_min_frames)
        result = assign_incremental(
            vectors,
            fids,
            assign_threshold=cfg.assign_threshold,
            noise_threshold=cfg.noise_threshold,
            index_min_frames=cfg.index_min_frames,
            exemplars=index,
            # Past every number the library ever gave: a table put back from an older copy (as
            # the damaged table's line advises) gave the next movie the ids of the places other
            # movies had opened since, which their scene tokens still name.
            first_number=max(
                _noted_next_number(library),
                next_cluster_number(
                    [
                        *lib["cluster_id"].to_list(),
                        *_hand_made(library),
                        *(c.partition("/")[0] for c in made if c),
                    ]
                ),
            ),
        )
        added = _exemplar_rows(_triples(result), movie_id, space.split("+")[0], space)
        lib = pl.concat([lib, added])
        atomic_write_parquet(path, lib)
        _note_exemplars(library, lib.height, next_cluster_number(lib["cluster_id"].to_list()))
    mine = lib.filter(pl.col("movie_id") == movie_id)
    return result.labels, result.similarity, mine, f"library ({added.height} new clusters)"


def _library_held(ctx: Context, library: Path, clusters: pl.DataFrame | None) -> bool:
    """Whether ``library`` held exemplars before this run: folders made by hand in it, or this
    run's last clustering made against it (its record or manifest names the library's id) put a
    frame in a cluster (every such cluster has an exemplar there). Then its exemplar table gone
    is a loss, not a new library."""
    if (library / HAND_MADE_FILE).exists() or _noted_exemplars(library) > 0:
        return True
    key = library_id(library)
    kept = _read_record(ctx.run.run_dir / JOIN_FILE) or {}
    facts = (ctx.previous or {}).get("facts") or {}
    if key is None or key not in (kept.get("library_key"), facts.get("library_key")) or clusters is None:
        return False
    placed = clusters.filter(
        (pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE) & ~pl.col("manual").fill_null(False)
    )
    return not placed.is_empty()


def _library_join(
    ctx: Context, library: Path | None, feedback: pl.DataFrame, previous: dict[str, pl.DataFrame]
) -> tuple[_LibraryJoin | None, str | None]:
    """The translation of the corrections' ids when this run joins ``library`` (None when it
    does not): the corrections were made on clusters of another clustering (the movie on its own,
    or another library), whose ids name other places in this one; and the library's own id.

    Which library the corrections' ids are in is read from :data:`JOIN_FILE`, which every run
    against a library writes, by the library's own id (:func:`library_key`), not its path: a
    library reached under another path (a share mounted elsewhere) is the same one, and a run
    whose manifest was lost (it failed) still knows. Without the file (a run folder of an older
    version), the last manifest's library path tells."""
    record = ctx.run.run_dir / JOIN_FILE
    if library is None:  # left the library: a join later is a new one, from the ids then
        record.unlink(missing_ok=True)
        return None, None
    kept = _read_record(record)
    known = (
        kept.get("library_key") if kept and _same_folder(Path(str(kept.get("library"))), library) else None
    )
    key = library_key(library, known if isinstance(known, str) else None)
    clusters, exemplars = previous.get("clusters"), _exemplars_key(previous.get("scene_exemplars"))
    if kept is not None and kept.get("library_key") == key:
        # A join whose run stopped before it wrote its exemplars (the one table the board never
        # writes, so the clustering the board showed is still on disk while they are these).
        facts = (ctx.previous or {}).get("facts") or {}
        if facts.get("library_key") == key or kept.get("before") != exemplars:
            return None, key  # the corrections are in this library's ids already
        join = _LibraryJoin(library, clusters, record=record, key=key, before=exemplars)
        join.resume(feedback, kept)
        return join, key
    if feedback.is_empty():
        return None, key
    if kept is None:
        if ctx.previous is not None:
            before = (ctx.previous.get("facts") or {}).get("library")
            if before and _same_folder(Path(before), library):
                return None, key
        elif _made_in(library, previous.get("scene_exemplars"), ctx.run.movie_key):
            # No manifest: the last run failed (a library of another embedder, say) or never ended.
            # Its exemplars tell: a run against this library keeps the library's rows of this movie.
            return None, key
    return _LibraryJoin(library, clusters, record=record, key=key, before=exemplars), key


def library_key(library: Path, known: str | None = None) -> str:
    """The scene library's own id (``<library>/library.json``, made on its first use under its
    lock): the same library under another path is known as itself. A damaged file (or a folder
    in its place) is one line: a new id for a library that holds clusters made every movie with
    corrections "join" it again, renaming all their folders made by hand. A missing one is put
    back from ``known`` (the id this run's own record holds for this library); with none known
    (a new movie, or a library used before it had an id, whose runs hold none) a new one is made."""
    path = library / LIBRARY_FILE
    kept = (path, library / "scene_exemplars.parquet", library / HAND_MADE_FILE)
    if known is not None and not any(p.exists() for p in kept):
        # A library this run was placed in, now with nothing of it: a share not mounted (its
        # empty mount point), moved or deleted. Made again here under the known id, a new movie
        # then filled it from s001, ids the real library had given other places.
        raise StageError(
            f"the scene library {library} (scenes.library_dir) is not there, though this movie was "
            "placed in it: moved, deleted, or a share not mounted; mount it, point scenes.library_dir "
            "at it, or give a new folder (its movies' scenes are then numbered again)"
        )
    _library_folder(library)
    with FileLock(str(library / ".library.lock"), timeout=120):
        key = library_id(library)
        if key is not None:
            return key
        if path.exists():
            what = "not a file" if path.is_dir() else "damaged"
            raise StageError(
                f"the scene library's {path} is {what}; put back a copy of it, or write "
                '{"id": "<library_key>"} into it, the library_key of models/scene_library_join.json '
                "in any of its movies' run folders"
            )
        key = known or uuid.uuid4().hex
        atomic_write_bytes(path, json.dumps({"id": key}).encode())
        return key


def _note_exemplars(library: Path, count: int, next_number: int = 1) -> None:
    """Write how many exemplars the library's table holds into ``library.json`` beside its id
    (under the library's lock, after the table): a table deleted is then known lost by any movie,
    also one never placed in the library, which took it for a new library and started it empty.
    And the next cluster number, never to go down (:func:`_noted_next_number`)."""
    record = _read_record(library / LIBRARY_FILE)
    if record is None:  # a damaged one: library_key's to judge
        return
    noted = {"exemplars": count, "next_number": max(next_number, _noted_next_number(library))}
    if {k: record.get(k) for k in noted} != noted:
        atomic_write_bytes(library / LIBRARY_FILE, json.dumps({**record, **noted}).encode())


def _noted_next_number(library: Path) -> int:
    """The next cluster number the library gives, as :func:`_note_exemplars` wrote it (1 before)."""
    number = (_read_record(library / LIBRARY_FILE) or {}).get("next_number", 1)
    return number if isinstance(number, int) and not isinstance(number, bool) else 1


def _noted_exemplars(library: Path) -> int:
    """The count :func:`_note_exemplars` wrote (0 for a library made before it, or none)."""
    count = (_read_record(library / LIBRARY_FILE) or {}).get("exemplars", 0)
    return count if isinstance(count, int) else 0


def library_id(library: Path) -> str | None:
    """The library's own id as :func:`library_key` made it, read without making one (None while
    there is none): stage 04's input, told by ``bunny status`` too."""
    record = _read_record(library / LIBRARY_FILE)
    return str(record["id"]) if record is not None and "id" in record else None


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or unreadable: judged as before any record
    return kept if isinstance(kept, dict) else None


def _same_folder(a: Path, b: Path) -> bool:
    """One folder under two spellings (a link, ``..``) is one library: its ids are already these."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _made_in(library: Path, exemplars: pl.DataFrame | None, movie_id: str) -> bool:
    """Whether ``exemplars`` (a run's last ``scene_exemplars``) are the library's for this movie."""
    path = library / "scene_exemplars.parquet"
    if exemplars is None or exemplars.is_empty() or not path.is_file():
        return False
    lib = _library_table(path, ["cluster_id", "frame_id", "movie_id"]).filter(pl.col("movie_id") == movie_id)
    held = set(lib.select("cluster_id", "frame_id").iter_rows())
    return set(exemplars.select("cluster_id", "frame_id").iter_rows()) <= held


@dataclass
class _LibraryJoin:
    """The corrections made before this movie joined a library, in the library's ids.

    ``feedback`` is rewritten once, when the movie joins (:func:`_with_new_moves`), rather than a
    map kept in the manifest and applied on every run: the board's later moves name the library's
    ids, so a kept map would have to tell the rows before the join from those after, and every
    reader of ``feedback`` (the board's new folder, the ids reserved, a run whose manifest was
    lost) would have to apply it. Rewritten, there is one id space; the map is in the manifest's
    facts (``library_join``) and in the warning, for a person to follow."""

    library: Path
    #: The clusters of the last run (in the ids the corrections name), None when there are none.
    previous: pl.DataFrame | None
    #: Frame id -> its cluster in this run's assignment against the library (corrections aside).
    now: dict[str, str] = field(default_factory=dict)
    #: Old id -> library id, for every id the corrections named so far.
    ids: dict[str, str] = field(default_factory=dict)
    #: Where the translation is recorded before ``feedback`` is rewritten (:data:`JOIN_FILE`).
    record: Path | None = None
    #: The library's own id (:func:`library_key`).
    key: str = ""
    #: The first rows of ``feedback`` already in the library's ids (a join taken up).
    done: int = 0
    #: The exemplars on disk before the join (:func:`_exemplars_key`): while they are, it has not ended.
    before: str = ""

    def resume(self, feedback: pl.DataFrame, kept: dict[str, Any]) -> None:
        """Take up a join whose run stopped after it wrote :data:`JOIN_FILE` (a full disk while
        the stage wrote its tables, a kill), its clusters still the old ones: the recorded ids
        again, never a translation of ids already translated; the rows the board added since
        (moves on the old clusters it still showed) are translated as the rest were."""
        self.ids.update(kept.get("ids") or {})
        rows = int(kept.get("rows") or 0)
        if feedback.height >= rows and _feedback_key(feedback.head(rows)) == kept.get("translated"):
            self.done = rows

    def write(self, original: pl.DataFrame, translated: pl.DataFrame) -> None:
        """Record the join before ``feedback`` is rewritten: the rows it translates (as they were
        and as they become), the ids, and the exemplars on disk before it (while they are, the
        join has not ended), for :meth:`resume`."""
        if self.record is not None:
            write_record(self.record, self.library, self.key, translated, original, self)

    def translate(self, feedback: pl.DataFrame) -> pl.DataFrame:
        """``feedback`` with its clusters in the library's ids (an id first seen here, a move made
        while the stage computed, is translated too; the first :attr:`done` rows already are)."""
        rest = feedback.slice(self.done)
        named = {c.partition("/")[0] for c in _named(rest)} - {NOISE, NEW}
        missing = sorted(named - self.ids.keys())
        if missing:
            self.ids.update(_library_ids(missing, self.previous, self.now, self.library))

        def one(cid: str | None) -> str | None:
            if cid is None:
                return None
            scene, slash, who = cid.partition("/")
            return self.ids.get(scene, scene) + slash + who

        rest = rest.with_columns(
            pl.Series(name, [one(c) for c in rest[name].to_list()], pl.String)
            for name in ("from_cluster", "to_cluster")
        )
        return pl.concat([feedback.head(self.done), rest]) if self.done else rest

    def warning_lines(self, feedback: pl.DataFrame) -> list[str]:
        """One line when the join changed what the corrections name, none otherwise."""
        moved = {old: new for old, new in sorted(self.ids.items()) if old != new}
        if not moved:
            return []
        shown = ", ".join(f"{old} -> {new}" for old, new in list(moved.items())[:6])
        more = ", ..." if len(moved) > 6 else ""
        return [
            f"{feedback.height} correction(s) made before this movie joined the scene library "
            f"{self.library} now name its clusters ({shown}{more}: a cluster of the last run is the "
            "library cluster most of its frames joined, a folder made by hand a new one); "
            "tables/feedback.parquet is rewritten in the library's ids"
        ]


def write_record(
    path: Path,
    library: Path,
    key: str,
    feedback: pl.DataFrame,
    original: pl.DataFrame | None = None,
    join: _LibraryJoin | None = None,
) -> None:
    """:data:`JOIN_FILE`: the library ``feedback``'s ids are in; for a join (``join``), also the
    rows as they were, the ids given, and the exemplars on disk before it."""
    kept: dict[str, Any] = {
        "library": str(library),
        "library_key": key,
        "rows": feedback.height,
        "translated": _feedback_key(feedback),
    }
    if join is not None and original is not None:
        kept |= {"original": _feedback_key(original), "ids": join.ids, "before": join.before}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(kept, indent=1, sort_keys=True).encode())


def _exemplars_key(exemplars: pl.DataFrame | None) -> str:
    """A key of a run's exemplars (which frame opened which cluster)."""
    if exemplars is None:
        return "none"
    rows = sorted(exemplars.select("cluster_id", "frame_id").iter_rows())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _named(feedback: pl.DataFrame) -> list[str]:
    return [c for name in ("from_cluster", "to_cluster") for c in feedback[name].to_list() if c]


def _library_ids(
    ids: list[str], previous: pl.DataFrame | None, now: dict[str, str], library: Path
) -> dict[str, str]:
    """Old scene id -> library id. A cluster of the last run becomes the library cluster most of
    its frames joined in this assignment (those the clustering put there: a frame moved by hand
    says where a person wanted it, not where the cluster went; a tie to the smaller id), so a
    frame a person moved into it sits with those frames again. A folder made by hand, or a
    cluster none of whose frames is left outside the noise, has no such cluster: it gets a new
    folder id, recorded as made by hand in the library (:func:`_hand_made_ids`)."""
    votes: dict[str, Counter[str]] = {c: Counter() for c in ids}
    if previous is not None:
        placed = previous.filter((pl.col("level") == "scene") & ~pl.col("manual").fill_null(False))
        for fid, cid in placed.select("frame_id", "cluster_id").iter_rows():
            if cid in votes and now.get(fid, NOISE) != NOISE:
                votes[cid][now[fid]] += 1
    found = {c: min(v.items(), key=lambda kv: (-kv[1], kv[0]))[0] for c, v in votes.items() if v}
    by_hand = [c for c in ids if c not in found]
    return {**found, **dict(zip(by_hand, _hand_made_ids(library, set(), len(by_hand)), strict=True))}


# ----------------------------------------------------------------------------- moves


def read_feedback(run_dir: str | Path) -> pl.DataFrame:
    """Every move a person made so far (an empty table with the schema before the first), checked
    and cast by :func:`checked_feedback`."""
    run = Run.open(run_dir)
    if not run.has_table("feedback"):
        return empty_feedback()
    return checked_feedback(run.read_table("feedback"), run.table_path("feedback"))


def checked_feedback(feedback: pl.DataFrame, path: Path) -> pl.DataFrame:
    """``feedback`` in :data:`FEEDBACK_SCHEMA`'s types (extra columns kept), or one
    :class:`BadInputError` naming the column or value that is wrong.

    The table is a person's as much as the board's: one written by hand, or with DESIGN.md's
    columns (no ``level``: every move a scene move), crashed the stage and every board move as a
    bug (a missing column, ``ts`` as text, ``label`` as Int32, a level or a target it could not
    place)."""
    if "level" not in feedback.columns:
        feedback = feedback.with_columns(pl.lit("scene", pl.String).alias("level"))
    missing = [c for c in FEEDBACK_SCHEMA if c not in feedback.columns]
    if missing:
        raise BadInputError(
            f"{path} has no column {', '.join(missing)}; a feedback table has "
            f"{', '.join(FEEDBACK_SCHEMA)} (level may be left out: scene)"
        )
    feedback = feedback.with_columns(
        _feedback_column(feedback, name, dtype, path) for name, dtype in FEEDBACK_SCHEMA.items()
    ).with_columns(pl.col("level").fill_null("scene"))
    bad = feedback.filter(~pl.col("level").is_in(LEVELS))["level"].unique().sort().to_list()
    if bad:
        raise BadInputError(f"{path}: level {bad[0]!r} is neither {' nor '.join(LEVELS)}")
    for name in ("anchor_id", "to_cluster"):
        nulls = feedback[name].null_count()
        if nulls:
            raise BadInputError(
                f"{path}: {nulls} row(s) have no {name}; every move needs a frame and a target"
            )
    # A target typed by hand must be a place: "new" is the board's word for a folder not made yet
    # (a frame dropped on a stored "new" went to another new folder), and an id not of the form
    # sNNN was named "scene 00" beside every other such id.
    odd = feedback.filter(~pl.col("to_cluster").str.contains(_TARGET.pattern))["to_cluster"].unique().sort()
    if odd.len():
        raise BadInputError(
            f"{path}: to_cluster {odd[0]!r} is no cluster; a move's target is noise, a scene such as "
            "s003, or one of its character sub-clusters (s003/anna); fix or remove that row"
        )
    # A scene move's target is a scene, a character move's a sub-cluster: a scene move to
    # s002/biden was stored as the scene s002/biden, its character row s002/biden/nobody.
    crossed = feedback.filter(
        (pl.col("to_cluster") != NOISE)
        & ((pl.col("level") == "scene") == pl.col("to_cluster").str.contains("/", literal=True))
    )
    if crossed.height:
        row = crossed.row(0, named=True)
        wanted = "a scene such as s003" if row["level"] == "scene" else "a sub-cluster such as s003/anna"
        raise BadInputError(
            f"{path}: a {row['level']} move's to_cluster {row['to_cluster']!r} is not {wanted} "
            "(or noise); fix its level or target, or remove that row"
        )
    return feedback


#: A move's target: noise, a scene (``s003``) or a character sub-cluster of one (``s003/anna+bob``).
_TARGET = re.compile(rf"^(?:{NOISE}|s\d+(?:/.+)?)$")


def _feedback_column(feedback: pl.DataFrame, name: str, dtype: Any, path: Path) -> pl.Series:
    """One column of ``feedback`` cast to ``dtype``: ``ts`` from text, or a time without a zone
    taken as UTC (the zone the board writes); a value that does not cast is one line naming it."""
    column, held = feedback[name], feedback.schema[name]
    try:
        if name == "ts" and held == pl.String:
            column = column.str.to_datetime(time_unit="us", time_zone="UTC")
        elif name == "ts" and isinstance(held, pl.Datetime):
            column = column.dt.replace_time_zone("UTC") if held.time_zone is None else column
            column = column.dt.convert_time_zone("UTC")
        return column.cast(dtype)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BadInputError(f"{path}: column {name} ({held}) does not read as {dtype} ({why})") from None


def move_to_cluster(
    run_dir: str | Path, frame_id: str, cluster_id: str, level: str = "scene"
) -> dict[str, Any]:
    """Move one frame to another cluster, as a person on the review board does.

    Appends one row to ``feedback`` (anchor = the frame, from, to, ``label`` 1: the frame belongs
    with ``to_cluster`` and not with ``from_cluster``) and updates ``clusters``, both in one
    :meth:`Run.commit <diffusion_bunny.pipeline.run.Run.commit>` (under the tables' locks, each
    written atomically, kept with a backup), so nothing is lost when the kernel restarts, and two
    writers, or a writer and a run of stage 04, never drop a row. ``cluster_id`` may be
    ``"noise"`` or, at the scene level, ``"new"`` (a new cluster with the next free id). Returns
    the feedback row.
    """
    if level not in LEVELS:
        raise BadInputError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    run = Run.open(run_dir)
    with run.commit("feedback", "clusters", by_hand=True) as tables:
        if not run.has_table("clusters"):
            raise BadInputError(
                f"no clusters in {run.run_dir}: run stage scenes first (notebook 04, or "
                "bunny run MOVIE --stages scenes)"
            )
        clusters = run.read_table("clusters")
        rows = clusters.filter((pl.col("frame_id") == frame_id) & (pl.col("level") == level))
        if rows.is_empty():
            raise BadInputError(
                f"frame {frame_id!r} is not in this run's clusters ({run.run_dir}); pick a frame_id "
                "from the clusters table"
            )
        existing = set(clusters.filter(pl.col("level") == level)["cluster_id"].unique().to_list())
        feedback = read_feedback(run.run_dir)
        if cluster_id == NEW:
            if level != "scene":
                raise BadInputError("a new cluster can only be made at the scene level")
            cluster_id = _new_folder_id(run, existing, feedback)
        elif cluster_id != NOISE and cluster_id not in existing:
            known = ", ".join(sorted(existing - {NOISE})[:12])
            raise BadInputError(
                f"cluster {cluster_id!r} does not exist at the {level} level; use one of: {known}, "
                f"'noise'{', or new' if level == 'scene' else ''}"
            )
        source = rows["cluster_id"][0]
        event = {
            "event_id": uuid.uuid4().hex,
            "ts": datetime.now(UTC),
            "anchor_id": frame_id,
            "from_cluster": source,
            "to_cluster": cluster_id,
            "label": 1,
            "level": level,
        }
        # Diagonal: a column a person added to the table by hand is kept (empty on the new row).
        feedback = pl.concat([feedback, pl.DataFrame([event], schema=FEEDBACK_SCHEMA)], how="diagonal")
        tables["feedback"] = feedback
        vectors = None
        if run.has_table("embeddings") and cluster_id != NOISE:
            # The frame's new similarity needs only the vectors of the scene it lands in (its
            # character sub-clusters included), not the whole table on every move.
            scene = cluster_id.partition("/")[0]
            members = clusters.filter((pl.col("level") == "scene") & (pl.col("cluster_id") == scene))[
                "frame_id"
            ]
            try:
                vectors = _vectors(run, {frame_id, *members.to_list()})
            except DamagedTableError:  # the move lands; the next run of the stage rewrites the table
                vectors = None
        tables["clusters"] = apply_feedback(clusters, feedback.tail(1), vectors)
    return event


def _new_folder_id(run: Run, existing: set[str], feedback: pl.DataFrame) -> str:
    """The id of a folder a person makes (``"new"``): not one a cluster emptied by hand still holds
    elsewhere, its exemplars (an incremental run would send that place's new frames into the new
    cluster) or a move. In a library, not one of the other movies' clusters or folders made by
    hand either: chosen and recorded in :data:`HAND_MADE_FILE` under the library's lock, so no
    movie's stage, nor its board, opens another place under it."""
    taken = set(existing) | set(_named(feedback))  # an id a person emptied too
    if run.has_table("scene_exemplars"):
        taken |= set(run.read_table("scene_exemplars")["cluster_id"].to_list())
    library = _board_library(run)
    if library is None:
        return new_cluster_id({c.partition("/")[0] for c in taken if c})
    if not library.is_dir():  # a run folder copied from another machine, a share not mounted here
        raise BadInputError(
            f"the library this run's clusters belong to ({library}) is not reachable here; mount it "
            "(or run stage scenes with scenes.library_dir unset) before making a new folder"
        )
    return _hand_made_ids(library, taken, 1)[0]


def _board_library(run: Run) -> Path | None:
    """The library whose ids the board's clusters are in (None: the movie's own ids). The last
    run's manifest says; while a run of stage 04 is under way (the runner removed the manifest)
    or after one failed (it wrote none), the record every run against a library writes
    (:data:`JOIN_FILE`) does: a folder id picked locally then was another movie's place. Without
    either, the clusters are the movie's own, or those of a join still under way, whose run
    gives every folder made meanwhile a library id (:class:`_LibraryJoin`)."""
    manifest = run.read_manifest("scenes")
    if manifest is not None:
        shared = (manifest.get("facts") or {}).get("library")
        return Path(shared) if shared else None
    record = run.run_dir / JOIN_FILE
    if not record.exists():
        return None
    kept = _read_record(record)
    if kept is None or not isinstance(kept.get("library"), str):
        raise BadInputError(
            f"{record} does not read, so the scene library of this run's clusters cannot be told; "
            "wait for stage scenes to finish (or run it again) before making a new folder"
        )
    return Path(kept["library"])


def _hand_made_ids(library: Path, taken: set[str], count: int) -> list[str]:
    """``count`` new folder ids, past ``taken``, the library's clusters and the folders made by
    hand in any of its movies, recorded in :data:`HAND_MADE_FILE` under the library's lock: no
    movie's stage, nor its board, opens another place under them."""
    if count == 0:
        return []
    with FileLock(str(library / ".library.lock"), timeout=120):
        if (library / "scene_exemplars.parquet").is_file():
            taken = taken | set(
                _library_table(library / "scene_exemplars.parquet", ["cluster_id"])["cluster_id"]
            )
        held = _hand_made(library)
        taken = {c.partition("/")[0] for c in taken | held if c}
        made: list[str] = []
        for _ in range(count):
            made.append(new_cluster_id(taken))
            taken.add(made[-1])
        _write_hand_made(library, [*sorted(held), *made])
    return made


def _keep_hand_made(library: Path, made: set[str], lib: pl.DataFrame) -> None:
    """Record in :data:`HAND_MADE_FILE` the folders this movie's corrections name that the library
    neither holds nor records (made by hand before the file was kept, by an earlier version):
    another movie's new cluster took such an id, and one id named two places (and one scene token
    in the captions). Called under the library's lock."""
    known = _hand_made(library)
    unheld = (
        {c.partition("/")[0] for c in made if c} - set(lib["cluster_id"].to_list()) - known - {NOISE, NEW}
    )
    if unheld:
        _write_hand_made(library, sorted(known | unheld))


def _write_hand_made(library: Path, ids: list[str]) -> None:
    """:data:`HAND_MADE_FILE` holding ``ids`` (under the library's lock, the caller's)."""
    atomic_write_parquet(
        library / HAND_MADE_FILE, pl.DataFrame({"cluster_id": ids}, schema={"cluster_id": pl.String})
    )


def _hand_made(library: Path) -> set[str]:
    """The ids of the folders people made by hand in the library's movies."""
    path = library / HAND_MADE_FILE
    return set(_library_table(path, ["cluster_id"])["cluster_id"].to_list()) if path.is_file() else set()


def _library_folder(library: Path) -> None:
    """The scene library's folder, made if needed, or one line when it cannot be."""
    try:
        library.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a folder it may not write to
        raise StageError(
            f"the scene library {library} (scenes.library_dir) cannot be a folder here ({exc.strerror}); "
            "give scenes.library_dir a folder this user may write to, or unset it"
        ) from None


def _library_table(
    path: Path, columns: list[str] | None = None, schema: dict[str, Any] | None = None
) -> pl.DataFrame:
    """A table of the shared scene library (``columns`` of it; in ``schema``'s types, every
    column there, when given), or one line when it does not read: no stage of one movie can
    rebuild it (every movie of the library added to it), so "run again" is no answer. A table
    rewritten by hand without a column, with vectors of another float type or none, failed as a
    bug when the movie's rows were added to it."""
    try:
        table = pl.read_parquet(path, columns=columns, glob=False)
        if schema is not None:
            table = table.select(pl.col(name).cast(dtype) for name, dtype in schema.items())
            if "vector" in schema and table["vector"].null_count():
                raise ValueError(f"{table['vector'].null_count()} row(s) without a vector")
        return table
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise StageError(
            f"the scene library's table {path} is damaged ({why}); put back a copy of it, or give "
            "scenes.library_dir a new folder (its movies' scenes are then numbered again)"
        ) from None


def _vectors(run, frame_ids: set[str]) -> dict[str, np.ndarray]:
    # Through the run (not a scan of the file): a damaged table is its one line, which says to
    # rerun stage scenes, not a parquet error the board showed as a bug.
    emb = (
        run.read_table("embeddings")
        .filter(pl.col("frame_id").is_in(list(frame_ids)))
        .select("frame_id", "vector")
    )
    if emb.is_empty():
        return {}
    return dict(zip(emb["frame_id"].to_list(), normalise(np.asarray(emb["vector"].to_list())), strict=True))


# ----------------------------------------------------------------------------- board


def board_state(run_dir: str | Path, level: str = "scene") -> list[dict[str, Any]]:
    """The folders of the review board: one per cluster, largest first, the noise bucket last;
    each with its frames (best fitting first) and their thumbnails."""
    if level not in LEVELS:
        raise BadInputError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    run = Run.open(run_dir)
    if not run.has_table("clusters"):
        raise BadInputError(f"no clusters in {run.run_dir}: run stage scenes first (notebook 04)")
    clusters = run.read_table("clusters").filter(pl.col("level") == level)
    frames = run.read_table("frames").select("frame_id", "timestamp_s", "path")
    table = clusters.join(frames, on="frame_id", how="left")
    folders = []
    for (cid,), group in table.group_by("cluster_id", maintain_order=True):
        group = group.sort(["similarity", "frame_id"], descending=[True, False], nulls_last=True)
        items = [
            {
                "frame_id": r["frame_id"],
                "thumb": str(frame_image_path(run.run_dir, r["frame_id"], r["path"])),
                "similarity": None if r["similarity"] is None else round(float(r["similarity"]), 3),
                "shot_id": r["shot_id"],
                "timestamp_s": r["timestamp_s"],
                "manual": bool(r["manual"]),
            }
            for r in group.iter_rows(named=True)
        ]
        folders.append({"id": cid, "name": scene_name(cid), "count": len(items), "frames": items})
    folders.sort(key=lambda f: (f["id"] == NOISE, -f["count"], f["id"]))
    return folders


def _search_table(run, frame_ids: Sequence[str], sims: Sequence[float]) -> pl.DataFrame:
    found = pl.DataFrame(
        {"frame_id": list(frame_ids), "similarity": list(sims)},
        schema={"frame_id": pl.String, "similarity": pl.Float32},
    )
    frames = run.read_table("frames").select("frame_id", "shot_id", "timestamp_s", "path")
    out = found.join(frames, on="frame_id", how="left", maintain_order="left")
    if run.has_table("clusters"):
        scene = (
            run.read_table("clusters")
            .filter(pl.col("level") == "scene")
            .select("frame_id", "cluster_id", "name")
        )
        out = out.join(scene, on="frame_id", how="left", maintain_order="left")
    return out.with_columns(
        pl.struct("frame_id", "path")
        .map_elements(
            lambda r: str(frame_image_path(run.run_dir, r["frame_id"], r["path"])), return_dtype=pl.String
        )
        .alias("thumb")
    )


def _run_vectors(run, adapted: bool) -> tuple[list[str], np.ndarray]:
    if not run.has_table("embeddings"):
        raise BadInputError(f"no embeddings in {run.run_dir}: run stage scenes first (notebook 04)")
    emb = run.read_table("embeddings")
    vectors = normalise(np.asarray(emb["vector"].to_list(), dtype=np.float32))
    adapter_path = run.run_dir / ADAPTER_FILE
    if adapted and adapter_path.is_file():
        try:
            adapter = Adapter.load(adapter_path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            raise BadInputError(
                f"{adapter_path} is damaged (it does not load); rerun stage scenes, which trains it again "
                "from the corrections"
            ) from None
        vectors = adapter.transform(vectors)
    return emb["frame_id"].to_list(), vectors


def shots_like(run_dir: str | Path, frame_id: str, k: int = 8) -> pl.DataFrame:
    """The ``k`` frames most like ``frame_id`` ("shots like this one"), best first, in the space
    the clusters were made in (through the adapter when corrections trained one).

    ``frame_id`` may also be a cluster's exemplar that the run no longer keeps (exemplars never
    move, so a rerun of stage 01 that keeps other frames, or a shared library's cluster opened
    by another movie, leaves them without an embedding here): its vector is the one
    ``scene_exemplars`` holds, in the same space."""
    run = Run.open(run_dir)
    ids, vectors = _run_vectors(run, adapted=True)
    if frame_id in ids:
        query = vectors[ids.index(frame_id)]
    else:
        query = _exemplar_vector(run, frame_id)
        if query is None:
            raise BadInputError(
                f"frame {frame_id!r} has no embedding in {run.run_dir}; pick one from the clusters table"
            )
    found = similar_frames(vectors, ids, query, k=k, exclude=frame_id)
    return _search_table(run, found["frame_id"].to_list(), found["similarity"].to_list())


def _exemplar_vector(run, frame_id: str) -> np.ndarray | None:
    """The stored vector of the exemplar whose frame is ``frame_id``, or None."""
    if not run.has_table("scene_exemplars"):
        return None
    rows = run.read_table("scene_exemplars").filter(pl.col("frame_id") == frame_id)
    if rows.is_empty():
        return None
    return np.asarray(rows["vector"][0], dtype=np.float32)


def text_search(run_dir: str | Path, text: str, cfg, k: int = 8) -> pl.DataFrame:
    """Frames that match a description ("a woman at a table"), best first; needs
    ``scenes.embedder: clip`` (the image and text towers share one space)."""
    if cfg.embedder != "clip":
        raise UserError(
            "text search needs CLIP: set scenes.embedder: clip (and scenes.clip_model), "
            "then rerun stage scenes"
        )
    run = Run.open(run_dir)
    ids, vectors = _run_vectors(run, adapted=False)
    embedder = make_embedder(cfg)
    stored = run.read_table("embeddings")["embedder"][0]
    if stored != embedder.name:
        raise UserError(
            f"this run's embeddings were made by {stored}, not {embedder.name}; rerun stage scenes with the "
            "current scenes settings first"
        )
    query = embedder.embed_texts([text])[0]
    found = similar_frames(vectors, ids, query, k=k)
    return _search_table(run, found["frame_id"].to_list(), found["similarity"].to_list())


def export_clusters(
    run_dir: str | Path, level: str = "scene", out_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write ``clusters_<level>.csv`` and ``clusters_<level>.edl`` (default: ``<run>/export/``) for
    an editor (:mod:`.timeline`). At a frame rate CMX3600 does not know, the EDL is written at the
    nearest one it knows (noted in the file) or skipped (no ``edl`` key), with a warning either
    way: an export format never fails the stage."""
    run = Run.open(run_dir)
    if not run.has_table("clusters"):
        raise BadInputError(f"no clusters in {run.run_dir}: run stage scenes first (notebook 04)")
    frames, clusters, shots = run.read_table("frames"), run.read_table("clusters"), run.read_table("shots")
    _check_current(clusters, frames, shots)
    rows = cluster_rows(clusters, frames, level)
    facts = (run.read_manifest("extract") or {}).get("facts", {})
    fps = float(facts.get("fps") or fps_from_frames(frames))
    out = Path(out_dir) if out_dir is not None else run.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"clusters_{level}.csv"}
    atomic_write_bytes(paths["csv"], clusters_csv(rows).encode())
    rate, note = edl_rate(fps)
    edl = out / f"clusters_{level}.edl"
    if rate is None:
        edl.unlink(missing_ok=True)  # an EDL of earlier settings would no longer match the CSV
        warnings.warn(f"clusters_{level}.edl skipped: {note}", stacklevel=2)
        return paths
    offset = timecode_frames(start_timecode(run.movie), rate)
    timeline = build_timeline(rows, shots, fps, run.movie, level, rate=rate, offset=offset)
    atomic_write_bytes(edl, edl_text(timeline, note).encode())
    if note is not None:
        warnings.warn(f"clusters_{level}.edl: {note}", stacklevel=2)
    paths["edl"] = edl
    return paths


def _check_current(clusters: pl.DataFrame, frames: pl.DataFrame, shots: pl.DataFrame) -> None:
    """A :class:`BadInputError` before anything is written when ``clusters`` no longer matches
    stage 01's tables (stage 01 ran again, stage 04 not yet): every cluster frame still a frame, in
    the shot the clusters say, and that shot still a shot. Without it the CSV was rewritten with
    empty times and the EDL failed on a shot that was gone (KeyError), or, when the shot ids
    still existed with other bounds, was written from the wrong shots without a word."""
    placed = (
        clusters.select("frame_id", "shot_id")
        .unique()
        .join(frames.select("frame_id", pl.col("shot_id").alias("now")), on="frame_id", how="left")
    )
    moved = placed.filter(pl.col("now").is_null() | (pl.col("now") != pl.col("shot_id")))
    gone = set(placed["shot_id"].unique().to_list()) - set(shots["shot_id"].to_list())
    if moved.height or gone:
        what = f"{moved.height} of their frames are gone or in another shot" if moved.height else ""
        what = what or f"shot(s) {', '.join(map(str, sorted(gone)[:5]))} are gone"
        raise BadInputError(
            f"clusters are out of date: stage extract ran again since stage scenes ({what}); rerun stage "
            "scenes (notebook 04, or bunny run MOVIE --stages scenes), then export"
        )
