"""Stage 04 (``scenes``): frames grouped by place and by who is in them, corrected by a person.

The pieces, each a function over arrays or tables so that the stage, the notebook, the review board
and the benchmark share them:

* :func:`cluster_scenes`: threshold clustering by cosine similarity with the original design's two
  thresholds (join at ``assign_threshold``, noise under ``noise_threshold``, otherwise a new
  cluster). A plain "leader" pass over the frames in table order would give a different result
  for every order, so frames are visited in an order that depends only on the vectors and frame
  ids: densest first (the number of other frames within ``assign_threshold``), as in
  Taylor-Butina clustering. Each cluster is represented by its *exemplar* (the frame that opened
  it); a frame joins the most similar exemplar. Exemplars never move, which is what makes
  :func:`assign_incremental` possible: new frames, or a second movie in a shared library, are
  assigned against the existing exemplars and the old clusters are left as they are.
* Neighbour counts come from exact blocked matrix products for small sets and from a usearch HNSW
  index from ``index_min_frames`` on; exemplar lookups likewise (:class:`ExemplarIndex`).
* :func:`character_cluster_id`: sub-clusters inside each scene from stage 03's names
  (``s003/astronaut`` apart from ``s003/grace_hopper``).
* :func:`~.stage.move_to_cluster`: a person's correction, appended to ``feedback`` and applied to
  ``clusters`` under a file lock, so two notebooks writing at once never lose a row.
* :func:`apply_feedback`: the latest correction of each frame wins over any clustering, so a rerun
  (say, through the adapter learned from those corrections) never undoes what a person did.
* :func:`stable_ids`: a recluster keeps the ids (and so the folders on the board) of the clusters
  it reproduces, by greatest overlap.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from usearch.index import Index

from diffusion_bunny.stages.scenes.tables import (
    CLUSTER_SCHEMA,
    LEVELS,
    NEW,
    NOBODY,
    NOISE,
    UNKNOWN,
    UNSCANNED,
)

#: Frames compared at once in the exact path: a 1024 x n float32 block (80 MB at n = 20,000).
BLOCK = 1024
#: Neighbours asked of the HNSW index per frame when counting density; the count saturates there,
#: which only matters for the visiting order among very dense frames.
HNSW_K = 32
#: Exemplars from which lookups go through an HNSW index instead of one matrix-vector product per
#: frame (both cost ~30-50 us a lookup around here on this machine's 2 cores at 164 dimensions).
EXEMPLAR_INDEX_MIN = 2048


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


# ----------------------------------------------------------------------------- neighbours


def _usearch_index(dim: int):
    # Cosine metric on unit vectors; f32 storage keeps similarities exact to ~1e-6, so the
    # thresholds mean the same with and without the index.
    # connectivity 16 / expansion 64: measured on 2 cores at 164 dimensions, usearch's defaults
    # (expansion_add 128) took twice as long to build for the same partition.
    return Index(ndim=dim, metric="cos", dtype="f32", connectivity=16, expansion_add=64, expansion_search=64)


def neighbour_stats(
    vectors: np.ndarray, threshold: float, *, use_index: bool, order: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For every frame: how many *other* frames are within ``threshold`` cosine similarity, and
    its best similarity to another frame (-1 when alone).

    Exact (blocked ``X @ X.T``) for small sets; with ``use_index`` an HNSW index (usearch) answers
    the ``HNSW_K`` nearest neighbours of each frame instead, so the cost grows as n log n rather
    than n squared and the count saturates at ``HNSW_K - 1``.
    """
    n = len(vectors)
    counts = np.zeros(n, dtype=np.int64)
    best = np.full(n, -1.0, dtype=np.float32)
    if n < 2:
        return counts, best
    if not use_index:
        for start in range(0, n, BLOCK):
            block = vectors[start : start + BLOCK] @ vectors.T
            rows = np.arange(block.shape[0])
            block[rows, start + rows] = -np.inf  # not one's own neighbour
            counts[start : start + BLOCK] = (block >= threshold).sum(axis=1)
            best[start : start + BLOCK] = block.max(axis=1)
        return counts, best
    index = _usearch_index(vectors.shape[1])
    # An HNSW graph depends on the insertion order and, built on several threads, on timing: one
    # thread, in ``order`` (the caller's canonical order, e.g. by frame id), makes the approximate
    # neighbours, and so the clusters, the same on every run and for every row order.
    keys = np.asarray(order if order is not None else range(n), dtype=np.uint64)
    index.add(keys, vectors[keys.astype(np.int64)], threads=1)
    k = min(HNSW_K, n)
    matches = index.search(vectors, k)
    found = np.asarray(matches.keys).reshape(n, k).astype(np.int64)
    sims = 1.0 - np.asarray(matches.distances, dtype=np.float32).reshape(n, k)
    valid = (found != np.arange(n)[:, None]) & (found >= 0) & (found < n)
    sims = np.where(valid, sims, -np.inf)
    counts[:] = (sims >= threshold).sum(axis=1)
    best[:] = np.maximum(sims.max(axis=1), -1.0)
    return counts, best


class ExemplarIndex:
    """The clusters' exemplars, searchable for the most similar one.

    A Python list of vectors searched with one matrix-vector product while small; past
    ``index_min`` exemplars, a usearch HNSW index (exemplars are only ever added, which HNSW
    handles without rebuilding).
    """

    @classmethod
    def for_frames(cls, dim: int, index_min_frames: int) -> ExemplarIndex:
        """The index a clustering with ``scenes.index_min_frames`` uses: an HNSW index from
        ``EXEMPLAR_INDEX_MIN`` exemplars on (or earlier, when frames go indexed sooner), never when
        ``index_min_frames`` is 0 (exact)."""
        return cls(dim, min(index_min_frames, EXEMPLAR_INDEX_MIN) if index_min_frames > 0 else 0)

    def __init__(self, dim: int, index_min: int):
        self.dim = dim
        self.index_min = index_min
        self.ids: list[str] = []
        self._rows: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        self._index = None

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, cluster_id: str, vector: np.ndarray) -> None:
        self.ids.append(cluster_id)
        self._rows.append(np.asarray(vector, dtype=np.float32))
        self._matrix = None
        if self._index is not None:
            self._index.add(np.uint64(len(self.ids) - 1), self._rows[-1], threads=1)
        elif len(self.ids) >= self.index_min > 0:
            self._index = _usearch_index(self.dim)
            self._index.add(np.arange(len(self._rows), dtype=np.uint64), np.stack(self._rows), threads=1)

    def best(self, vector: np.ndarray) -> tuple[int, float]:
        """Position of the most similar exemplar and the similarity; (-1, -inf) when empty."""
        if not self.ids:
            return -1, float("-inf")
        if self._index is not None:
            match = self._index.search(vector, 1)
            key = int(np.asarray(match.keys).ravel()[0])
            return key, 1.0 - float(np.asarray(match.distances).ravel()[0])
        if self._matrix is None:
            self._matrix = np.stack(self._rows)
        sims = self._matrix @ vector
        pos = int(np.argmax(sims))
        return pos, float(sims[pos])

    def vectors(self) -> np.ndarray:
        return np.stack(self._rows) if self._rows else np.zeros((0, self.dim), np.float32)


# ----------------------------------------------------------------------------- clustering


@dataclass(frozen=True)
class SceneClustering:
    """Result of :func:`cluster_scenes` / :func:`assign_incremental`, aligned with the input rows."""

    labels: list[str]  # cluster id per frame, NOISE for the noise bucket
    similarity: np.ndarray  # similarity to the frame's exemplar (nan in noise)
    exemplars: dict[str, str]  # cluster id -> frame id of its exemplar (new clusters only)
    exemplar_vectors: dict[str, np.ndarray]  # cluster id -> exemplar vector (new clusters only)


def cluster_id(number: int) -> str:
    return f"s{number:03d}"


def _id_number(cid: str) -> int:
    try:
        return int(cid.split("/")[0].lstrip("s"))
    except ValueError:
        return 0


def next_cluster_number(existing: Sequence[str]) -> int:
    numbers = [_id_number(c) for c in existing if c not in (NOISE, NEW)]
    return max(numbers, default=0) + 1


def visiting_order(frame_ids: Sequence[str], density: np.ndarray) -> list[int]:
    """Densest first, ties by frame id: a function of the set of frames, never of their order."""
    return sorted(range(len(frame_ids)), key=lambda i: (-int(density[i]), frame_ids[i]))


def assign_incremental(
    vectors: np.ndarray,
    frame_ids: Sequence[str],
    *,
    assign_threshold: float,
    noise_threshold: float,
    index_min_frames: int,
    exemplars: ExemplarIndex | None = None,
    first_number: int = 1,
) -> SceneClustering:
    """Assign frames against existing exemplars (none: a fresh clustering), opening new clusters.

    The rule, per frame in :func:`visiting_order`: join the most similar exemplar when the
    similarity is at least ``assign_threshold``; otherwise, a frame with no neighbour within
    ``assign_threshold`` among the frames being assigned, and neither an exemplar nor another of
    those frames within ``noise_threshold``, goes to the noise bucket (nothing here looks like
    it); anything else opens a new cluster with itself as the exemplar. Old clusters are never
    changed. (Against the exemplars alone, the first such frame of a fresh clustering met none
    and went to noise, and so did the next while none was open: two frames at 0.93 with
    ``assign_threshold`` 0.94 ended in noise and 0 scenes. A film of one frame still does: with
    nothing to compare it with, it is like nothing else.)
    """
    vectors = normalise(vectors)
    n = len(frame_ids)
    if vectors.shape[0] != n:
        raise ValueError(f"{vectors.shape[0]} vectors for {n} frames")
    use_index = index_min_frames > 0 and n >= index_min_frames
    by_id = sorted(range(n), key=lambda i: frame_ids[i])
    density, nearest = neighbour_stats(vectors, assign_threshold, use_index=use_index, order=by_id)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    index = exemplars if exemplars is not None else ExemplarIndex.for_frames(dim, index_min_frames)
    labels = [NOISE] * n
    similarity = np.full(n, np.nan, dtype=np.float32)
    new_exemplars: dict[str, str] = {}
    new_vectors: dict[str, np.ndarray] = {}
    number = first_number
    for i in visiting_order(frame_ids, density):
        pos, sim = index.best(vectors[i])
        if pos >= 0 and sim >= assign_threshold:
            labels[i] = index.ids[pos]
            similarity[i] = sim
        elif density[i] == 0 and max(sim, float(nearest[i])) < noise_threshold:
            continue  # noise
        else:
            cid = cluster_id(number)
            number += 1
            index.add(cid, vectors[i])
            labels[i] = cid
            similarity[i] = 1.0
            new_exemplars[cid] = frame_ids[i]
            new_vectors[cid] = vectors[i]
    return SceneClustering(labels, similarity, new_exemplars, new_vectors)


def cluster_scenes(
    vectors: np.ndarray,
    frame_ids: Sequence[str],
    *,
    assign_threshold: float = 0.85,
    noise_threshold: float = 0.5,
    index_min_frames: int = 2000,
) -> SceneClustering:
    """A fresh scene clustering of all frames (see :func:`assign_incremental` for the rule)."""
    return assign_incremental(
        vectors,
        frame_ids,
        assign_threshold=assign_threshold,
        noise_threshold=noise_threshold,
        index_min_frames=index_min_frames,
    )


def renumber_by_size(labels: Sequence[str], frame_ids: Sequence[str]) -> dict[str, str]:
    """Old id -> new id with ``s001`` the largest cluster (ties: earliest frame id), so a fresh
    clustering reads from the most common place down."""
    members: dict[str, list[str]] = defaultdict(list)
    for label, fid in zip(labels, frame_ids, strict=True):
        if label != NOISE:
            members[label].append(fid)
    order = sorted(members, key=lambda c: (-len(members[c]), min(members[c])))
    return {old: cluster_id(i + 1) for i, old in enumerate(order)}


def stable_ids(
    labels: Sequence[str],
    frame_ids: Sequence[str],
    previous: dict[str, str],
    reserved: Sequence[str] = (),
    placed: dict[str, str] | None = None,
) -> dict[str, str]:
    """New cluster id -> the id to show: the previous id of the cluster it overlaps most (greedy,
    largest overlaps first, each previous id used once), fresh ids after the largest previous one
    for the rest. ``previous`` maps frame id -> previous cluster id; fresh ids also go past
    ``reserved``, the ids a person's corrections use (a folder made by hand has no exemplar, and
    once its frame left the clusters nothing else held its id: an unrelated cluster took it, and
    the frame, back, was put in with that cluster's).

    ``placed`` maps the frames a person put somewhere (left out of ``previous``) to where they put
    them. A cluster no previous one claims takes the id of the folder most of its placed frames
    went to, when no other cluster has that id; or even when one has, when the placed frames are
    at least half of it (a person merged its place into that folder: two clusters, one id). Without
    this a folder made by hand kept only the frames moved into it, the rest of the place it split
    off going to a fresh id, and a cluster merged into another came back under a fresh id, its
    exemplar drawing the place's new frames there."""
    overlap: Counter[tuple[str, str]] = Counter()
    votes: Counter[tuple[str, str]] = Counter()
    sizes: Counter[str] = Counter()
    for label, fid in zip(labels, frame_ids, strict=True):
        if label == NOISE:
            continue
        sizes[label] += 1
        old = previous.get(fid)
        if old is not None and old != NOISE:
            overlap[(label, old)] += 1
        put = (placed or {}).get(fid)
        if put is not None and put != NOISE:
            votes[(label, put)] += 1
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for (new, old), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if new in mapping or old in used:
            continue
        mapping[new] = old
        used.add(old)
    carried: Counter[str] = Counter()  # frames nobody moved that had an id in the last clustering
    for (new, _old), count in overlap.items():
        carried[new] += count
    for (new, put), count in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0])):
        # A merge also outnumbers the frames the cluster carries from a cluster of the last
        # clustering: the part of a split cluster that took in a few moved frames is no merge.
        merged = 2 * count >= sizes[new] and count > carried[new]
        if new not in mapping and (put not in used or merged):
            mapping[new] = put
            used.add(put)
    number = next_cluster_number([*previous.values(), *used, *reserved, *(placed or {}).values()])
    for new in sorted(sizes, key=lambda c: (-sizes[c], c)):
        if new not in mapping:
            mapping[new] = cluster_id(number)
            number += 1
    return mapping


# ----------------------------------------------------------------------------- tables


def frame_characters(
    faces: pl.DataFrame | None, frames: Sequence[str] = (), scanned: set[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Frame id -> sorted names of the characters stage 03 named in it; ``("unknown",)`` when it
    found faces but named none; ``("unscanned",)`` for those of ``frames`` stage 03 did not search
    (``scanned``: the frames it did; None: treat every frame as searched). Without the last, a
    frame stage 03 never looked at (say ``scenes.frames: all`` with stage 03 on the kept ones)
    would read as showing nobody. A face a person fixed to none in notebook 03 (``edited``, no
    name: a false sighting) is nobody, as in stage 05's captions: a frame of only such faces was
    filed under "unknown" beside the frames of people no one named."""
    out: dict[str, set[str]] = defaultdict(set)
    if faces is not None and "edited" in faces.columns:
        faces = faces.filter(~(pl.col("character").is_null() & pl.col("edited").fill_null(False)))
    if faces is not None and not faces.is_empty():
        for fid, name in faces.select("frame_id", "character").iter_rows():
            out[fid].add(name if name else UNKNOWN)
    result: dict[str, tuple[str, ...]] = {}
    for fid, names in out.items():
        named = sorted(n for n in names if n != UNKNOWN)
        result[fid] = tuple(named) if named else (UNKNOWN,)
    if scanned is not None:
        for fid in frames:
            if fid not in scanned and fid not in result:
                result[fid] = (UNSCANNED,)
    return result


def character_cluster_id(scene: str, names: Sequence[str]) -> str:
    if scene == NOISE:
        return NOISE
    return f"{scene}/{'+'.join(names) if names else NOBODY}"


def scene_name(cid: str) -> str:
    if cid == NOISE:
        return "noise"
    scene, _, who = cid.partition("/")
    label = f"scene {_id_number(scene):02d}"
    return f"{label} · {who.replace('+', ', ')}" if who else label


def clusters_table(
    frame_ids: Sequence[str],
    scene_labels: Sequence[str],
    similarity: np.ndarray,
    shot_ids: Sequence[int],
    characters: dict[str, tuple[str, ...]],
    manual: set[tuple[str, str]] | None = None,
) -> pl.DataFrame:
    """The two levels as one ``clusters`` table (docs/run-folder.md's columns, name, shot_id, manual)."""
    manual = manual or set()
    rows: dict[str, list[Any]] = {k: [] for k in CLUSTER_SCHEMA}
    for fid, scene, sim, shot in zip(frame_ids, scene_labels, similarity, shot_ids, strict=True):
        names = characters.get(fid, ())
        for level, cid in (("scene", scene), ("character", character_cluster_id(scene, names))):
            rows["frame_id"].append(fid)
            rows["level"].append(level)
            rows["cluster_id"].append(cid)
            rows["similarity"].append(None if cid == NOISE or np.isnan(sim) else float(sim))
            rows["name"].append(scene_name(cid))
            rows["shot_id"].append(int(shot))
            rows["characters"].append("+".join(names) if names else NOBODY)
            rows["manual"].append((fid, level) in manual)
    return pl.DataFrame(rows, schema=CLUSTER_SCHEMA)


def latest_moves(feedback: pl.DataFrame | None) -> dict[tuple[str, str], str]:
    """(frame id, level) -> where a person put it last."""
    return {(fid, level): target for fid, level, target in ordered_moves(feedback)}


def ordered_moves(feedback: pl.DataFrame | None) -> list[tuple[str, str, str]]:
    """Each (frame id, level)'s last move as (frame id, level, cluster), in the order they were
    made (at one time, the scene's before the character's)."""
    if feedback is None or feedback.is_empty():
        return []
    last = feedback.sort("ts", maintain_order=True).unique(["anchor_id", "level"], keep="last")
    rows = last.select("anchor_id", "level", "to_cluster", "ts").iter_rows()
    ordered = sorted(rows, key=lambda r: (r[3] is not None, r[3], LEVELS.index(r[1])))
    return [(fid, level, target) for fid, level, target, _ in ordered]


def apply_feedback(
    clusters: pl.DataFrame, feedback: pl.DataFrame | None, vectors: dict[str, np.ndarray] | None = None
) -> pl.DataFrame:
    """``clusters`` with every frame a person moved where they put it last (marked ``manual``).

    A scene-level move also moves the frame's character row into the same scene (same names);
    a character-level move into another scene's sub-cluster moves its scene row too (both then
    ``manual``). Moves to a
    frame that is no longer in the table (stage 02 dropped it) are ignored here; the feedback
    row stays for the adapter.
    """
    moves = ordered_moves(feedback)
    if not moves:
        return clusters
    table = {(f, lvl): cid for f, lvl, cid in clusters.select("frame_id", "level", "cluster_id").iter_rows()}
    who = dict(clusters.select("frame_id", "characters").iter_rows())
    manual = {(f, lvl) for f, lvl, m in clusters.select("frame_id", "level", "manual").iter_rows() if m}
    # In the order they were made, as the board showed each one: the latest wins where a scene
    # move and a character move disagree (scene moves first won over any character move, so a
    # frame moved to another scene, or to noise, after a character move went back at the next run).
    for fid, level, target in moves:
        if (fid, "scene") not in table:
            continue
        scene = table[(fid, "scene")]
        _place(table, fid, level, target, who.get(fid) or NOBODY)
        manual.add((fid, level))
        if table[(fid, "scene")] != scene:
            # A character move into another scene's sub-cluster moved the scene row too: the
            # person put it there (it read as the clustering's on the board, the CSV and the counts).
            manual.add((fid, "scene"))
    # The same, once the move is in the table (an incremental run starts from the clusters as
    # they were left, where the scene row is already moved and reads as the clustering's).
    manual |= {(fid, "scene") for fid in crossed_scenes(feedback) if (fid, "scene") in table}
    keys = list(clusters.select("frame_id", "level").iter_rows())
    out = clusters.with_columns(
        pl.Series("cluster_id", [table[k] for k in keys], pl.String),
        pl.Series("manual", [k in manual for k in keys], pl.Boolean),
    )
    return _refresh_similarity(out, clusters, vectors)


def crossed_scenes(feedback: pl.DataFrame | None) -> set[str]:
    """The frames a person moved at the character level into another scene's sub-cluster (the
    move's scene differs from the one it came from): their scene rows are the person's."""
    if feedback is None or feedback.is_empty() or "from_cluster" not in feedback.columns:
        return set()
    moves = feedback.filter(pl.col("level") == "character").select("anchor_id", "from_cluster", "to_cluster")
    return {
        fid
        for fid, came, went in moves.iter_rows()
        if came and went and went != NOISE and came.partition("/")[0] != went.partition("/")[0]
    }


def _place(table: dict[tuple[str, str], str], fid: str, level: str, target: str, who: str) -> None:
    if level == "scene":
        table[(fid, "scene")] = target
        table[(fid, "character")] = NOISE if target == NOISE else f"{target}/{who}"
    else:
        table[(fid, "character")] = target
        if target != NOISE:
            table[(fid, "scene")] = target.partition("/")[0]


def _refresh_similarity(
    out: pl.DataFrame, before: pl.DataFrame, vectors: dict[str, np.ndarray] | None
) -> pl.DataFrame:
    """Names follow the ids; the similarity of a frame that changed cluster is recomputed against
    its new cluster's centroid when vectors are given (else left empty)."""
    changed = out["cluster_id"] != before["cluster_id"]
    sims = out["similarity"].to_list()
    if changed.any():
        moved = out.filter(changed)
        # Only the clusters frames moved into: a move on the board must not average every cluster.
        wanted = set(moved.select("level", "cluster_id").iter_rows())
        centroids = cluster_centroids(out, vectors, wanted) if vectors else {}
        for i in np.flatnonzero(changed.to_numpy()):
            fid, level, cid = out["frame_id"][int(i)], out["level"][int(i)], out["cluster_id"][int(i)]
            c = centroids.get((level, cid))
            sims[i] = None if c is None or fid not in vectors else float(vectors[fid] @ c)
    return out.with_columns(
        pl.Series("similarity", sims, pl.Float32),
        pl.col("cluster_id").map_elements(scene_name, return_dtype=pl.String).alias("name"),
    )


def cluster_centroids(
    clusters: pl.DataFrame, vectors: dict[str, np.ndarray], wanted: set[tuple[str, str]] | None = None
) -> dict[tuple[str, str], np.ndarray]:
    """(level, cluster id) -> unit mean vector of its members (noise has none), for the clusters in
    ``wanted`` (None: all)."""
    groups: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for fid, level, cid in clusters.select("frame_id", "level", "cluster_id").iter_rows():
        if cid != NOISE and fid in vectors and (wanted is None or (level, cid) in wanted):
            groups[(level, cid)].append(vectors[fid])
    out = {}
    for key, members in groups.items():
        mean = np.mean(members, axis=0)
        norm = np.linalg.norm(mean)
        out[key] = (mean / norm).astype(np.float32) if norm > 0 else mean.astype(np.float32)
    return out


def new_cluster_id(existing: set[str]) -> str:
    return cluster_id(next_cluster_number(sorted(existing)))


# ----------------------------------------------------------------------------- search


def similar_frames(
    vectors: np.ndarray, frame_ids: Sequence[str], query: np.ndarray, k: int = 8, exclude: str | None = None
) -> pl.DataFrame:
    """The ``k`` frames most similar to ``query`` (a unit vector), best first."""
    sims = normalise(vectors) @ normalise(query[None, :])[0]
    order = np.argsort(-sims, kind="stable")
    rows = [(frame_ids[i], float(sims[i])) for i in order if frame_ids[i] != exclude][:k]
    return pl.DataFrame(rows, schema={"frame_id": pl.String, "similarity": pl.Float32}, orient="row")
