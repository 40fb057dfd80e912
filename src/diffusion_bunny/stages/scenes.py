"""Stage 04 (``scenes``): embeddings, two-level clusters, corrections applied and learned from.

What a run of the stage does, in order:

1. Picks the frames (those stage 02 kept, or all with ``scenes.frames: all``).
2. Embeds the frames that have no embedding yet for this embedder (an embedding is reused while
   the frame file keeps its size: the frame ids of a run are stable, so a rerun or a new frame
   costs only the new frames).
3. With corrections in ``feedback`` and ``scenes.adapter: auto``, trains the adapter on them
   (:mod:`diffusion_bunny.scene_adapter`) and clusters in the adapted space.
4. Clusters: incrementally (new frames against the existing exemplars, old clusters untouched)
   when nothing but the set of frames changed since the last run, or against a shared library
   (``scenes.library_dir``); otherwise afresh, with the previous ids kept for the clusters it
   reproduces.
5. Adds the character level from stage 03's names and applies every correction (latest wins).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diffusion_bunny.config import ScenesConfig, workspace_root
from diffusion_bunny.errors import StageError
from diffusion_bunny.scenes import (
    NOISE,
    ExemplarIndex,
    apply_feedback,
    assign_incremental,
    cluster_scenes,
    clusters_table,
    frame_characters,
    latest_moves,
    next_cluster_number,
    normalise,
    renumber_by_size,
    stable_ids,
)

EMBEDDING_SCHEMA = {
    "frame_id": pl.String,
    "embedder": pl.String,
    "file_bytes": pl.Int64,
    "vector": pl.List(pl.Float32),
}
EXEMPLAR_SCHEMA = {
    "cluster_id": pl.String,
    "frame_id": pl.String,
    "movie_id": pl.String,
    "embedder": pl.String,
    "space": pl.String,
    "vector": pl.List(pl.Float32),
}
ADAPTER_FILE = "models/scene_adapter.npz"


@dataclass
class ScenesResult:
    embeddings: pl.DataFrame
    clusters: pl.DataFrame
    exemplars: pl.DataFrame
    counts: dict[str, Any]
    facts: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def frames_to_cluster(frames: pl.DataFrame, quality: pl.DataFrame | None, which: str) -> pl.DataFrame:
    """The frames stage 04 works on, in frame order."""
    if which == "kept" and quality is not None:
        kept = quality.filter(pl.col("keep")).select("frame_id")
        frames = frames.join(kept, on="frame_id", how="semi")
    return frames.sort("frame_index")


def embed_frames(
    run_dir: Path,
    frames: pl.DataFrame,
    cfg: ScenesConfig,
    previous: pl.DataFrame | None,
    *,
    progress: bool = False,
) -> tuple[pl.DataFrame, int]:
    """The ``embeddings`` rows of ``frames`` (reusing ``previous`` ones that still match) and how
    many were computed now."""
    from diffusion_bunny.embeddings import embedder_name, make_embedder

    name = embedder_name(cfg)
    paths = [run_dir / p for p in frames["path"].to_list()]
    sizes = [p.stat().st_size if p.is_file() else -1 for p in paths]
    cache: dict[tuple[str, int], list[float]] = {}
    if previous is not None and not previous.is_empty():
        same = previous.filter(pl.col("embedder") == name)
        cache = {(f, b): v for f, b, v in same.select("frame_id", "file_bytes", "vector").iter_rows()}
    fids = frames["frame_id"].to_list()
    todo = [i for i, (f, b) in enumerate(zip(fids, sizes, strict=True)) if (f, b) not in cache]
    vectors: list[Any] = [cache.get((f, b)) for f, b in zip(fids, sizes, strict=True)]
    if todo:  # the embedder (for CLIP: the model) is loaded only when a frame needs it
        fresh = make_embedder(cfg).embed_images([paths[i] for i in todo], progress=progress)
        for i, vec in zip(todo, fresh, strict=True):
            vectors[i] = vec.astype(np.float32).tolist()
    table = pl.DataFrame(
        {"frame_id": fids, "embedder": [name] * len(fids), "file_bytes": sizes, "vector": vectors},
        schema=EMBEDDING_SCHEMA,
    )
    return table, len(todo)


def _space(embedder: str, adapter_key: str | None) -> str:
    return embedder if adapter_key is None else f"{embedder}+adapter:{adapter_key}"


def _feedback_key(feedback: pl.DataFrame) -> str:
    blob = feedback.select("anchor_id", "from_cluster", "to_cluster", "level").write_csv().encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def library_path(cfg: ScenesConfig) -> Path | None:
    if cfg.library_dir is None:
        return None
    path = Path(cfg.library_dir).expanduser()
    return path if path.is_absolute() else workspace_root() / path


def scenes_stage(
    run_dir: Path,
    movie_id: str,
    frames: pl.DataFrame,
    quality: pl.DataFrame | None,
    faces: pl.DataFrame | None,
    feedback: pl.DataFrame,
    cfg: ScenesConfig,
    *,
    face_frames: pl.DataFrame | None = None,
    previous: dict[str, pl.DataFrame] | None = None,
    previous_facts: dict[str, Any] | None = None,
    progress: bool = False,
) -> ScenesResult:
    """Stage 04 on one run's tables (see the module docstring for the steps)."""
    previous = previous or {}
    warnings: list[str] = []
    chosen = frames_to_cluster(frames, quality, cfg.frames)
    if chosen.is_empty():
        raise StageError(
            "no frames to cluster: stage 02 kept none (see notebook 02, or set scenes.frames: all)"
        )
    embeddings, computed = embed_frames(run_dir, chosen, cfg, previous.get("embeddings"), progress=progress)
    fids = embeddings["frame_id"].to_list()
    raw = normalise(np.asarray(embeddings["vector"].to_list(), dtype=np.float32))
    embedder_name = embeddings["embedder"][0]
    shot_ids = chosen["shot_id"].to_list()

    # The current state a person sees: the previous clusters with all corrections applied.
    prev_clusters = previous.get("clusters")
    current_scene: dict[str, str] = {}
    if prev_clusters is not None and not prev_clusters.is_empty():
        scene_rows = apply_feedback(prev_clusters, feedback).filter(pl.col("level") == "scene")
        current_scene = dict(scene_rows.select("frame_id", "cluster_id").iter_rows())

    adapter_key = None
    vectors = raw
    adapter_facts: dict[str, Any] = {"triplets": 0}
    adapter_path = run_dir / ADAPTER_FILE
    library = library_path(cfg)
    if cfg.adapter == "auto" and not feedback.is_empty() and library is None:
        from diffusion_bunny.scene_adapter import train_adapter_for, triplets_from_feedback

        labels = current_scene or {f: NOISE for f in fids}
        triplets = triplets_from_feedback(feedback, fids, labels)
        if triplets:
            adapter = train_adapter_for(raw, triplets, cfg)
            adapter.save(adapter_path)
            vectors = adapter.transform(raw)
            adapter_key = _feedback_key(feedback)
            adapter_facts = {
                "triplets": len(triplets),
                "final_loss": adapter.losses[-1] if adapter.losses else None,
            }
    if adapter_key is None:
        adapter_path.unlink(missing_ok=True)  # an adapter from earlier corrections no longer applies
    if library is not None and not feedback.is_empty():
        warnings.append(
            "scenes.library_dir is set: corrections are kept as manual placements, but the adapter "
            "learns per run only (unset library_dir to learn from them)"
        )
    space = _space(embedder_name, adapter_key)

    thresholds = dict(assign_threshold=cfg.assign_threshold, noise_threshold=cfg.noise_threshold)
    prev_ex = previous.get("scene_exemplars")
    same_setup = (
        previous_facts is not None
        and previous_facts.get("space") == space
        and previous_facts.get("thresholds") == thresholds
        and prev_ex is not None
        and prev_clusters is not None
    )
    if library is not None:
        labels, sims, exemplars, mode = _assign_library(library, movie_id, fids, vectors, space, cfg)
    elif same_setup:
        labels, sims, exemplars, mode = _assign_new(
            fids, vectors, prev_clusters, prev_ex, cfg, movie_id, space
        )
    else:
        result = cluster_scenes(vectors, fids, index_min_frames=cfg.index_min_frames, **thresholds)
        old_scene = {}
        if prev_clusters is not None:
            old_scene = dict(
                prev_clusters.filter(pl.col("level") == "scene").select("frame_id", "cluster_id").iter_rows()
            )
        mapping = (
            stable_ids(result.labels, fids, old_scene) if old_scene else renumber_by_size(result.labels, fids)
        )
        labels = [mapping.get(label, NOISE) for label in result.labels]
        sims = result.similarity
        exemplars = _exemplar_rows(
            {mapping[c]: f for c, f in result.exemplars.items()},
            {mapping[c]: v for c, v in result.exemplar_vectors.items()},
            movie_id,
            embedder_name,
            space,
        )
        mode = "full"

    scanned = None
    if face_frames is not None:
        scanned = set(face_frames.filter(pl.col("status") == "ok")["frame_id"].to_list())
    clusters = clusters_table(fids, labels, sims, shot_ids, frame_characters(faces, fids, scanned))
    vec_by_frame = dict(zip(fids, vectors, strict=True))
    moved_before = len(latest_moves(feedback))
    clusters = apply_feedback(clusters, feedback, vec_by_frame)
    scene = clusters.filter(pl.col("level") == "scene")
    counts = {
        "frames": len(fids),
        "embedded_now": computed,
        "scene_clusters": scene.filter(pl.col("cluster_id") != NOISE)["cluster_id"].n_unique(),
        "character_clusters": clusters.filter(
            (pl.col("level") == "character") & (pl.col("cluster_id") != NOISE)
        )["cluster_id"].n_unique(),
        "noise": int((scene["cluster_id"] == NOISE).sum()),
        "manual": int(clusters["manual"].sum()),
        "corrections": moved_before,
    }
    facts = {
        "mode": mode,
        "space": space,
        "embedder": embedder_name,
        "thresholds": thresholds,
        "adapter": adapter_facts,
        "library": str(library) if library else None,
    }
    return ScenesResult(embeddings, clusters, exemplars, counts, facts, warnings)


def _exemplar_rows(
    ids: dict[str, str], vectors: dict[str, np.ndarray], movie_id: str, embedder: str, space: str
) -> pl.DataFrame:
    rows = [
        {
            "cluster_id": cid,
            "frame_id": ids[cid],
            "movie_id": movie_id,
            "embedder": embedder,
            "space": space,
            "vector": vectors[cid].astype(np.float32).tolist(),
        }
        for cid in sorted(ids)
    ]
    return pl.DataFrame(rows, schema=EXEMPLAR_SCHEMA)


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
    cfg: ScenesConfig,
    movie_id: str,
    space: str,
):
    """Same space and thresholds as last time: keep every old frame's cluster, assign only the
    frames that are new against the existing exemplars."""
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
            first_number=next_cluster_number(prev_ex["cluster_id"].to_list() + list(old.values())),
        )
        for j, i in enumerate(new_rows):
            labels[i] = result.labels[j]
            sims[i] = result.similarity[j]
        embedder = prev_ex["embedder"][0] if prev_ex.height else space.split("+")[0]
        exemplars = pl.concat(
            [prev_ex, _exemplar_rows(result.exemplars, result.exemplar_vectors, movie_id, embedder, space)]
        )
    return labels, sims, exemplars, f"incremental ({len(new_rows)} new frames)"


def _assign_library(
    library: Path, movie_id: str, fids: list[str], vectors: np.ndarray, space: str, cfg: ScenesConfig
):
    """Assign this run's frames against the shared library's exemplars (never reclustering them),
    adding the clusters it opens to the library, under the library's lock."""
    from filelock import FileLock

    from diffusion_bunny.run import atomic_write_parquet

    library.mkdir(parents=True, exist_ok=True)
    path = library / "scene_exemplars.parquet"
    with FileLock(str(library / ".library.lock"), timeout=120):
        lib = pl.read_parquet(path) if path.is_file() else pl.DataFrame(schema=EXEMPLAR_SCHEMA)
        if lib.height and lib["space"][0] != space:
            raise StageError(
                f"the scene library {library} holds {lib['space'][0]} vectors, this run makes {space}; "
                "use the library's scenes.embedder or another scenes.library_dir"
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
            first_number=next_cluster_number(lib["cluster_id"].to_list()),
        )
        added = _exemplar_rows(
            result.exemplars, result.exemplar_vectors, movie_id, space.split("+")[0], space
        )
        lib = pl.concat([lib, added])
        atomic_write_parquet(path, lib)
    mine = lib.filter(pl.col("movie_id") == movie_id)
    return result.labels, result.similarity, mine, f"library ({added.height} new clusters)"
