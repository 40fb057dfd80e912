"""Stage 03's pure half: encodings to names, without touching a detector.

Per-character thresholds from the references, open-set identification, tracks that follow one
person through a shot, majority votes along a track, clusters of the unknown faces; naming a
cluster or changing a threshold re-labels a run in well under a second."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dlib
import numpy as np
import polars as pl

from diffusion_bunny.errors import StageError
from diffusion_bunny.models.faces import ReferenceSet, face_distances
from diffusion_bunny.models.hub_characters.finder import cluster_appearances
from diffusion_bunny.stages.characters.settings import CharactersSettings
from diffusion_bunny.stages.characters.tables import FACES_SCHEMA, apply_appearance_edits


def character_thresholds(refs: ReferenceSet, cfg: CharactersSettings) -> dict[str, float]:
    """Each character's acceptance distance.

    The default is ``tolerance`` (0.6, face_recognition's own). A character with several
    references gets a tighter one where its references agree closely: the largest distance
    between two of its own references plus ``threshold_margin``, never under ``min_threshold``
    nor over ``tolerance``. A consistent reference set (one actor, similar light) then rejects
    look-alikes its loose default would accept, while a varied set keeps the full tolerance.

    A copy of a photo (re-saved, resized, mirrored) says nothing of how the face varies: the
    reference loader leaves it out (:func:`~diffusion_bunny.stages.characters.references.same_photo`),
    as counted here its spread of 0 set the threshold at ``min_threshold`` and the Hamilton clip's
    singer, 0.44-0.47 from his photo, was named nowhere.
    """
    out: dict[str, float] = {}
    for index, name in enumerate(refs.names):
        own = refs.encodings[refs.owners == index]
        threshold = cfg.tolerance
        if cfg.adaptive_thresholds and len(own) >= 2:
            spread = float(face_distances(own, own).max())
            threshold = min(cfg.tolerance, max(cfg.min_threshold, spread + cfg.threshold_margin))
        out[name] = round(threshold, 4)
    return out


@dataclass(frozen=True)
class Identification:
    """Per face: the accepted character (or None), and the nearest character with its distance."""

    character: list[str | None]
    nearest: list[str | None]
    nearest_distance: np.ndarray
    threshold: np.ndarray


def identify(encodings: np.ndarray, refs: ReferenceSet, thresholds: dict[str, float]) -> Identification:
    """Open-set nearest-reference identification: a face takes the character whose nearest
    reference is closest, if that distance is within the character's threshold; else unknown."""
    n = len(encodings)
    if n == 0 or len(refs) == 0:
        return Identification([None] * n, [None] * n, np.full(n, np.nan), np.full(n, np.nan))
    dist = face_distances(np.asarray(encodings, np.float32), refs.encodings)
    per_char = np.stack([dist[:, refs.owners == i].min(axis=1) for i in range(len(refs.names))], axis=1)
    best = per_char.argmin(axis=1)
    best_dist = per_char[np.arange(n), best]
    limits = np.asarray([thresholds[refs.names[i]] for i in best])
    nearest = [refs.names[i] for i in best]
    character = [name if d <= t else None for name, d, t in zip(nearest, best_dist, limits, strict=True)]
    return Identification(character, nearest, best_dist.astype(np.float64), limits.astype(np.float64))


def distances_to(encodings: np.ndarray, refs: ReferenceSet, name: str) -> np.ndarray:
    """Distance of each encoding to the nearest reference of ``name``."""
    own = refs.encodings[refs.owners == refs.names.index(name)]
    return face_distances(np.asarray(encodings, np.float32), own).min(axis=1)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (top, right, bottom, left) boxes."""
    top, bottom = max(a[0], b[0]), min(a[2], b[2])
    left, right = max(a[3], b[3]), min(a[1], b[1])
    inter = max(0, bottom - top) * max(0, right - left)
    area = (a[2] - a[0]) * (a[1] - a[3]) + (b[2] - b[0]) * (b[1] - b[3]) - inter
    return inter / area if area > 0 else 0.0


def link_tracks(
    shot_ids: list[int],
    frame_indices: list[int],
    boxes: list[tuple[int, int, int, int]],
    encodings: np.ndarray,
    *,
    max_distance: float,
    min_iou: float,
) -> list[int]:
    """Track id per face: faces of one shot in consecutive sampled frames that are the same
    person (encodings within ``max_distance``, boxes overlapping by at least ``min_iou``) are
    linked, one-to-one, closest pairs first, and a track is a chain of such links.

    Sampled frames can be seconds apart, so the encoding is the main evidence and the box only a
    guard (``min_iou`` 0 turns it off); a face never links to two faces of one frame.
    """
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_frame: dict[tuple[int, int], list[int]] = {}
    for i, (shot, index) in enumerate(zip(shot_ids, frame_indices, strict=True)):
        by_frame.setdefault((shot, index), []).append(i)
    keys = sorted(by_frame)
    for prev, cur in itertools.pairwise(keys):
        if prev[0] != cur[0]:
            continue
        a, b = by_frame[prev], by_frame[cur]
        dist = face_distances(encodings[a], encodings[b])
        pairs = sorted((float(dist[i, j]), i, j) for i in range(len(a)) for j in range(len(b)))
        used_a: set[int] = set()
        used_b: set[int] = set()
        for d, i, j in pairs:
            if d > max_distance or i in used_a or j in used_b:
                continue
            if box_iou(boxes[a[i]], boxes[b[j]]) < min_iou:
                continue
            used_a.add(i)
            used_b.add(j)
            parent[find(b[j])] = find(a[i])
    roots: dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(n)]


def vote_tracks(
    tracks: list[int],
    characters: list[str | None],
    distances: np.ndarray,
    voters: Sequence[bool] | None = None,
) -> tuple[list[str | None], list[int]]:
    """One identity per track by majority vote over its faces (unknown counts as a vote).

    A tie between a name and unknown goes to the name: a match within a character's threshold is
    positive evidence, an unknown only the absence of it (a turned head, motion blur). A tie
    between two names goes to the one with the smaller mean distance. ``voters``: the faces that
    vote (all by default); the others take their track's name. An untrusted face (turned, tiny)
    does not name itself, so its "unknown" says nothing: three turns of the head after one
    confident frontal match outvoted it, and the whole track went unknown. Returns the voted
    character per face and the number of faces in each face's track.
    """
    members: dict[int, list[int]] = {}
    for i, track in enumerate(tracks):
        members.setdefault(track, []).append(i)
    voted: list[str | None] = list(characters)
    sizes = [0] * len(tracks)
    for faces in members.values():
        ballots = [i for i in faces if voters is None or voters[i]]
        counts = Counter(characters[i] for i in ballots) or Counter({None: 1})
        top = max(counts.values())
        tied = [name for name, count in counts.items() if count == top]
        named = [name for name in tied if name is not None]
        if named:
            winner: str | None = min(
                named, key=lambda name: float(np.mean([distances[i] for i in faces if characters[i] == name]))
            )
        else:
            winner = None
        for i in faces:
            voted[i] = winner
            sizes[i] = len(faces)
    return voted, sizes


def _cluster_tracks(
    features: np.ndarray,
    tracks: list[int],
    cluster: Callable[[np.ndarray], Sequence[int]],
    min_size: int = 1,
    frames: Sequence[str] | None = None,
) -> list[int]:
    """Cluster the tracks' mean features with ``cluster`` (means -> one label per track, -1 for
    noise), so a track's sightings share a cluster: one label per sighting, clusters numbered by
    size, largest first (0, 1, ...), and -1 for noise or a cluster under ``min_size`` sightings.
    ``frames``: each sighting's frame, when two sightings of one frame are never one individual
    (:func:`_apart`)."""
    track_ids = sorted(set(tracks))
    tracks_arr = np.asarray(tracks)
    means = np.stack([features[tracks_arr == t].mean(axis=0) for t in track_ids])
    per_track = dict(zip(track_ids, cluster(means), strict=True))
    if frames is not None:
        seen: dict[int, set[str]] = {}
        for t, f in zip(tracks, frames, strict=True):
            seen.setdefault(t, set()).add(f)
        per_track = _apart(per_track, dict(zip(track_ids, means, strict=True)), seen)
    raw = [per_track[t] for t in tracks]
    sizes = Counter(r for r in raw if r >= 0)
    kept = sorted(((k, v) for k, v in sizes.items() if v >= min_size), key=lambda kv: (-kv[1], kv[0]))
    order = {label: rank for rank, (label, _) in enumerate(kept)}
    return [order.get(r, -1) for r in raw]


def _apart(
    labels: dict[int, int], means: dict[int, np.ndarray], frames: dict[int, set[str]]
) -> dict[int, int]:
    """``labels`` (track -> cluster) with the tracks of a cluster that share a frame in different
    clusters: two faces in one picture are two people, and a cluster holding both (an audience's
    faces, near one another in dlib's space) named them alike, or could not be named at all. The
    longest track stays; each other one joins the part of its cluster whose mean is nearest among
    those it shares no frame with, else starts a new cluster (a greedy colouring: no library
    clusters under "cannot link" constraints, and a cluster here holds a handful of tracks)."""
    out = dict(labels)
    fresh = max(labels.values(), default=-1) + 1
    for label in sorted({v for v in labels.values() if v >= 0}):
        members = sorted((t for t, v in labels.items() if v == label), key=lambda t: (-len(frames[t]), t))
        parts: list[tuple[list[int], set[str]]] = []
        for t in members:
            free = [p for p in parts if not p[1] & frames[t]]
            if not free:
                parts.append(([t], set(frames[t])))
                continue
            best = min(
                free, key=lambda p: float(np.linalg.norm(np.mean([means[m] for m in p[0]], 0) - means[t]))
            )
            best[0].append(t)
            best[1].update(frames[t])
        for k, (part, _) in enumerate(parts[1:]):
            out.update(dict.fromkeys(part, fresh + k))
        fresh += max(0, len(parts) - 1)
    return out


def cluster_faces(
    encodings: np.ndarray, tracks: list[int], threshold: float, frames: Sequence[str] | None = None
) -> list[int]:
    """Cluster faces with dlib's Chinese whispers on their tracks' mean encodings, so the faces of
    one track always share a cluster, and (given each face's frame) two faces of one frame never
    do. Clusters are numbered by size, largest first (0, 1, ...).

    Chinese whispers needs no number of clusters and finds singletons as their own clusters; dlib
    ships it next to the descriptor it was designed for, with the same 0.5-0.6 edge threshold.
    """
    if len(encodings) == 0:
        return []

    def whispers(means: np.ndarray) -> list[int]:
        vectors = [dlib.vector(m.astype(float).tolist()) for m in means]
        return dlib.chinese_whispers_clustering(vectors, threshold)

    return _cluster_tracks(encodings, tracks, whispers, frames=frames)


def cluster_drawn(features: np.ndarray, tracks: list[int], threshold: float) -> list[int]:
    """Identity clusters of drawn characters nobody named (found by the hub's text queries): the
    tracks' mean features clustered by
    :func:`~diffusion_bunny.models.hub_characters.finder.cluster_appearances` (cosine distance,
    average linkage, cut at ``threshold``), so a track's sightings share a cluster; numbered by
    size, largest first, and -1 (noise) for a cluster of one sighting, no character to name yet."""
    if len(features) == 0:
        return []
    return _cluster_tracks(
        features, tracks, lambda means: cluster_appearances(means, threshold, min_size=1), min_size=2
    )


def drawn_min_score(cfg: CharactersSettings) -> float:
    """The score a drawn character's sighting needs to name it, from the backend that found it."""
    return cfg.hub.min_score if cfg.backend == "hub" else cfg.fitted.min_score


# ---------------------------------------------------------------------------------------------
# Labelling (pure)


def _embeddings(rows: pl.DataFrame) -> np.ndarray:
    """The ``embedding`` column of rows of one kind as a matrix (one length per kind)."""
    if rows.height == 0:
        return np.zeros((0, 0), np.float32)
    return np.asarray(rows["embedding"].to_list(), dtype=np.float32).reshape(rows.height, -1)


def _label_kind(
    base: pl.DataFrame, kind: str, refs: ReferenceSet, cfg: CharactersSettings, track_offset: int
) -> dict[str, np.ndarray | list]:
    """Identity, track and vote columns of the rows of one ``kind`` (in ``base``'s order)."""
    n = base.height
    enc = _embeddings(base)
    if kind == "face":
        thresholds = character_thresholds(refs, cfg)
        idn = identify(enc, refs, thresholds)
        trusted = trusted_faces(base, cfg)
        # An untrusted face (tiny, or turned too far for dlib's frontal face chip) never names
        # itself: its encoding can sit near the wrong character's. Its track may still name it.
        own = [c if ok else None for c, ok in zip(idn.character, trusted, strict=True)]
        idn = Identification(own, idn.nearest, idn.nearest_distance, idn.threshold)
        max_distance = cfg.track_distance
    else:
        # The drawn characters' detector names what it finds; its distance is 1 - its score.
        labels = base["label"].to_list()
        distance = 1.0 - base["detector_score"].to_numpy()
        limit = 1.0 - drawn_min_score(cfg)
        own = [name if d <= limit else None for name, d in zip(labels, distance, strict=True)]
        idn = Identification(own, labels, distance, np.full(n, limit))
        trusted = np.ones(n, bool)
        max_distance = cfg.drawn_track_distance
    boxes = list(zip(base["top"], base["right"], base["bottom"], base["left"], strict=True))
    tracks = link_tracks(
        base["shot_id"].fill_null(-1).to_list(),
        base["frame_index"].fill_null(-1).to_list(),
        boxes,
        enc,
        max_distance=max_distance,
        min_iou=cfg.track_iou,
    )
    voted, sizes = vote_tracks(tracks, idn.character, idn.nearest_distance, list(trusted))
    distance = np.full(n, np.nan)
    threshold = np.full(n, np.nan)
    for name in {v for v in voted if v is not None}:
        mask = np.asarray([v == name for v in voted])
        if kind == "face":
            distance[mask] = distances_to(enc[mask], refs, name)
            threshold[mask] = character_thresholds(refs, cfg)[name]
        else:
            distance[mask] = idn.nearest_distance[mask]
            threshold[mask] = limit
    named = ~np.isnan(distance)
    low = named & (
        (distance > threshold - cfg.low_confidence_margin)
        | np.asarray([v != r for v, r in zip(voted, idn.character, strict=True)])
        | ~trusted
    )
    cluster: list[str | None] = [None] * n
    unknown = np.flatnonzero(~named)
    if unknown.size and kind == "face":
        ids = base["frame_id"].to_list()
        labels = cluster_faces(
            enc[unknown], [tracks[i] for i in unknown], cfg.cluster_threshold, [ids[i] for i in unknown]
        )
        for i, label in zip(unknown, labels, strict=True):
            cluster[i] = f"cluster_{label:02d}"
    elif unknown.size:
        labels = cluster_drawn(enc[unknown], [tracks[i] for i in unknown], cfg.hub.cluster_distance)
        for i, label in zip(unknown, labels, strict=True):
            cluster[i] = None if label < 0 else f"drawn_{label:02d}"
    return {
        "character": voted,
        "distance": np.where(named, distance, np.nan),
        "raw_character": idn.character,
        "nearest": idn.nearest,
        "nearest_distance": idn.nearest_distance,
        "threshold": threshold,
        "low_confidence": low,
        "trusted": trusted,
        "track_id": [t + track_offset for t in tracks],
        "track_size": sizes,
        "cluster": cluster,
    }


def label_faces(
    detections: pl.DataFrame,
    frames: pl.DataFrame,
    refs: ReferenceSet,
    cfg: CharactersSettings,
    edits: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The ``faces`` table: detections with identity, track and cluster columns, a person's
    ``edits`` (notebook 03's fixes) in place before faces are matched to drawn figures
    (:func:`faces_of_drawn`), so that a name given by hand is what that matching sees.

    * ``raw_character``: the face's own open-set match (None when no character is within its
      threshold), ``nearest`` / ``nearest_distance`` the closest character whatever the distance;
      for a drawn character, the fitted detector's name and 1 - its score;
    * ``character``: the identity of the face's track by majority vote, ``distance`` its distance
      to that character's nearest reference (both null when unknown);
    * ``low_confidence``: named, but within ``low_confidence_margin`` of the threshold or only by
      the vote of its track; the notebook marks these for a person to check;
    * ``cluster``: ``cluster_NN`` for the faces nobody could name (largest cluster first).

    Faces and drawn characters are labelled apart (their embeddings are of different models)
    and a track never joins the two. Drawn characters the fitted detector scores under
    ``characters.fitted.min_score`` are not appearances: they are left out (the hub applies its
    own thresholds when it searches). Drawn characters nobody named are clustered by their
    features (``drawn_NN``; one sighting alone is noise, no cluster).
    """
    base = detections.join(
        frames.select("frame_id", "shot_id", "frame_index", "timestamp_s"), on="frame_id", how="left"
    )
    if "kind" not in base.columns:
        base = base.with_columns(pl.lit(None, pl.Utf8).alias("kind"), pl.lit(None, pl.Utf8).alias("label"))
    # Detections of a stage that knew only faces have no kind.
    base = base.with_columns(pl.col("kind").fill_null("face"))
    # The hub keeps its sightings at its own thresholds (a discovered one scores under a named one).
    floor = cfg.fitted.min_score if cfg.backend == "offline" else 0.0
    base = base.filter((pl.col("kind") == "face") | (pl.col("detector_score") >= floor)).sort(
        "frame_index", "face_id"
    )
    if base.height == 0:
        return pl.DataFrame(schema=FACES_SCHEMA)
    parts = []
    offset = 0
    for kind in ("face", "drawn"):
        rows = base.filter(pl.col("kind") == kind)
        if rows.height == 0:
            continue
        columns = _label_kind(rows, kind, refs, cfg, offset)
        offset = max(columns["track_id"]) + 1
        parts.append(
            rows.with_columns(
                pl.Series("character", columns["character"], dtype=pl.Utf8),
                pl.Series("distance", columns["distance"], dtype=pl.Float64).fill_nan(None),
                pl.Series("raw_character", columns["raw_character"], dtype=pl.Utf8),
                pl.Series("nearest", columns["nearest"], dtype=pl.Utf8),
                pl.Series("nearest_distance", columns["nearest_distance"], dtype=pl.Float64).fill_nan(None),
                pl.Series("threshold", columns["threshold"], dtype=pl.Float64).fill_nan(None),
                pl.Series("low_confidence", columns["low_confidence"], dtype=pl.Boolean),
                pl.Series("trusted", columns["trusted"], dtype=pl.Boolean),
                pl.Series("track_id", columns["track_id"], dtype=pl.Int64),
                pl.Series("track_size", columns["track_size"], dtype=pl.Int64),
                pl.Series("cluster", columns["cluster"], dtype=pl.Utf8),
                pl.lit(False).alias("edited"),
            ).select(list(FACES_SCHEMA))
        )
    return faces_of_drawn(apply_appearance_edits(pl.concat(parts), edits)).sort("frame_index", "face_id")


def faces_of_drawn(faces: pl.DataFrame, inside: float = 0.6) -> pl.DataFrame:
    """``faces`` with the unnamed faces on a named drawn character's figure dropped, and the rest
    of their tracks named after that character.

    The face detector also fires on drawn faces (a drawn girl, a painted knight), and a drawn girl
    is one appearance of hers, not her and an unknown person: an unnamed face with at least
    ``inside`` of its box on the figure of a character the drawn detector named in the same frame
    is dropped. The figure is the character's box, widened by a quarter of the face's width on
    each side and raised by the face's height (:func:`_figure`): the fitted detector, taught from
    head crops and whole figures alike, often boxes a body without its head (a painted knight's
    breastplate, his face just above it), and such a face read as "1 other person" in every
    caption of the shot. The dropped face's track (the same face followed through the shot's
    sampled frames) is hers too: its faces in the frames where the detector missed her (cut by
    the frame's edge, turned away) are named after her, marked low confidence for a person to
    check; but not in a frame where the detector found her elsewhere: that face is then
    something else on the same track (a skull on a warlord's pole, adopted as the warlord's
    face and exported as his close-up). The character's box takes in the face it lost, so that
    its crop (stage 06) is not a body without a head. A face on two figures is the one it
    overlaps most. Named faces stay (a person named from photos is a person), and so do faces a
    person named or unnamed by hand. A face on a drawn sighting fixed to none by hand stays an
    appearance its track names not (it came back as her, where she was said not to be)."""
    is_drawn = pl.col("kind") == "drawn"
    drawn = faces.filter(is_drawn & pl.col("character").is_not_null())
    nobody = faces.filter(is_drawn & pl.col("character").is_null() & pl.col("edited").fill_null(False))
    loose = faces.filter((pl.col("kind") == "face") & pl.col("character").is_null() & ~pl.col("edited"))
    if drawn.height == 0 or loose.height == 0:
        return faces
    figures: dict[str, list[tuple[str, str]]] = {}
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for r in drawn.iter_rows(named=True):
        figures.setdefault(r["frame_id"], []).append((r["face_id"], r["character"]))
        boxes[r["face_id"]] = (r["left"], r["top"], r["right"], r["bottom"])
    unnamed = _on_figures(loose, nobody, inside)
    gone: set[str] = set()
    grown: dict[str, tuple[int, int, int, int]] = {}
    track_names: dict[int, Counter[str]] = {}
    for r in loose.iter_rows(named=True):
        face = (r["left"], r["top"], r["right"], r["bottom"])
        overlaps = [
            (on, drawn_id, name)
            for drawn_id, name in figures.get(r["frame_id"], [])
            if (on := _on_figure(face, boxes[drawn_id], inside))
        ]
        if overlaps:
            _, drawn_id, name = max(overlaps)
            gone.add(r["face_id"])
            track_names.setdefault(r["track_id"], Counter())[name] += 1
            old = grown.get(drawn_id, boxes[drawn_id])
            grown[drawn_id] = (
                min(old[0], face[0]),
                min(old[1], face[1]),
                max(old[2], face[2]),
                max(old[3], face[3]),
            )
    named = {track: names.most_common(1)[0][0] for track, names in track_names.items()}
    if not named:
        return faces
    heir = pl.col("face_id").is_in(list(gone)).not_() & pl.col("track_id").is_in(list(named))
    heir = heir & (pl.col("kind") == "face") & pl.col("character").is_null() & ~pl.col("edited")
    name = pl.col("track_id").replace_strict(named, default=None, return_dtype=pl.Utf8)
    found = [f"{frame}|{who}" for frame, names in figures.items() for _, who in names]
    heir = heir & ~pl.concat_str(pl.col("frame_id"), pl.lit("|"), name).is_in(found)
    heir = heir & ~pl.col("face_id").is_in(list(unnamed))
    boxes_grown = pl.DataFrame(
        [(face_id, *box) for face_id, box in grown.items()],
        schema={"face_id": pl.Utf8, "left": pl.Int64, "top": pl.Int64, "right": pl.Int64, "bottom": pl.Int64},
        orient="row",
    )
    return (
        faces.filter(~pl.col("face_id").is_in(list(gone)))
        .update(boxes_grown, on="face_id")
        .with_columns(
            pl.when(heir).then(name).otherwise(pl.col("character")).alias("character"),
            pl.when(heir).then(True).otherwise(pl.col("low_confidence")).alias("low_confidence"),
            pl.when(heir).then(pl.lit(None, pl.Utf8)).otherwise(pl.col("cluster")).alias("cluster"),
        )
    )


def _on_figures(loose: pl.DataFrame, figures: pl.DataFrame, inside: float) -> set[str]:
    """The ids of ``loose`` faces with at least ``inside`` of their box on one of ``figures`` of
    their frame (:func:`_on_figure`)."""
    by_frame: dict[str, list[tuple[int, int, int, int]]] = {}
    for r in figures.iter_rows(named=True):
        by_frame.setdefault(r["frame_id"], []).append((r["left"], r["top"], r["right"], r["bottom"]))
    return {
        r["face_id"]
        for r in loose.filter(pl.col("frame_id").is_in(list(by_frame))).iter_rows(named=True)
        if any(
            _on_figure((r["left"], r["top"], r["right"], r["bottom"]), box, inside)
            for box in by_frame[r["frame_id"]]
        )
    }


def _on_figure(face: tuple[int, int, int, int], box: tuple[int, int, int, int], inside: float) -> float:
    """The area of ``face`` on the figure of a drawn sighting boxed ``box`` (:func:`_figure`)
    where it is at least ``inside`` of the face's own, else 0."""
    left, top, right, bottom = _figure(box, face)
    w, h = min(face[2], right) - max(face[0], left), min(face[3], bottom) - max(face[1], top)
    area = max(1, (face[2] - face[0]) * (face[3] - face[1]))
    return w * h if w > 0 and h > 0 and w * h >= inside * area else 0


def _figure(box: tuple[int, int, int, int], face: tuple[int, int, int, int]) -> tuple[float, ...]:
    """A drawn character's figure as a face on it may lie: its box (left, top, right, bottom)
    widened by a quarter of the face's width on each side and raised by the face's height."""
    fw, fh = face[2] - face[0], face[3] - face[1]
    return (box[0] - fw / 4, box[1] - fh, box[2] + fw / 4, box[3])


def trusted_faces(faces: pl.DataFrame, cfg: CharactersSettings) -> np.ndarray:
    """Per face: whether its encoding can name it. dlib's ResNet was trained on frontal face
    chips of 150 px; a face under ``trust_min_px`` or turned beyond ``trust_max_yaw`` (profile)
    gives an encoding that can sit nearer another person than its own."""
    height = (faces["bottom"] - faces["top"]).to_numpy()
    yaw = faces["yaw"].fill_null(0.0).to_numpy() if "yaw" in faces.columns else np.zeros(faces.height)
    return (height >= cfg.trust_min_px) & (np.abs(yaw) <= cfg.trust_max_yaw)


def frame_face_sharpness(faces: pl.DataFrame) -> pl.DataFrame:
    """``frame_id, face_sharpness``: the sharpness of each frame's largest face (the subject)."""
    return (
        faces.with_columns((pl.col("bottom") - pl.col("top")).alias("_h"))
        .sort("_h", descending=True)
        .group_by("frame_id", maintain_order=True)
        .first()
        .select("frame_id", pl.col("sharpness").alias("face_sharpness"))
    )


def frames_to_scan(
    frames: pl.DataFrame, quality: pl.DataFrame | None, cfg: CharactersSettings
) -> pl.DataFrame:
    """The frames stage 03 looks at: those stage 02 kept, or all with ``characters.frames: all``."""
    if cfg.frames == "all":
        return frames
    if quality is None:
        raise StageError(
            "table 'quality' is missing; run stage quality first, or set characters.frames=all "
            "to look for faces in every extracted frame"
        )
    kept = quality.filter(pl.col("keep"))["frame_id"]
    return frames.filter(pl.col("frame_id").is_in(kept.implode()))
