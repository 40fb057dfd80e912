"""A simulated reviewer on the demo movie: the ground truth plays the person who fixes stage 04's
clusters one frame at a time, and the learning curve shows how much the adapter learned from
those corrections helps the frames nobody touched (notebook 04 draws it)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import av
import cv2
import numpy as np
import polars as pl

from diffusion_bunny.demo.metrics import adjusted_rand
from diffusion_bunny.errors import UserError
from diffusion_bunny.stages.scenes.adapter import recluster
from diffusion_bunny.stages.scenes.clustering import cluster_id, next_cluster_number
from diffusion_bunny.stages.scenes.embeddings import make_embedder
from diffusion_bunny.stages.scenes.tables import NOISE


def _primary_clusters(
    frame_ids: Sequence[str], labels: Sequence[str], truth_of: dict[str, str]
) -> dict[str, str]:
    """Place -> the largest cluster whose majority is that place (ties: smaller id)."""
    members: dict[str, list[str]] = defaultdict(list)
    for fid, label in zip(frame_ids, labels, strict=True):
        if label != NOISE:
            members[label].append(truth_of[fid])
    primary: dict[str, str] = {}
    for cid in sorted(members, key=lambda c: (-len(members[c]), c)):
        places = members[cid]
        place = max(sorted(set(places)), key=places.count)
        primary.setdefault(place, cid)
    return primary


def simulate_reviewer(
    vectors: np.ndarray, frame_ids: Sequence[str], truth: Sequence[str], cfg, steps: int = 6
) -> pl.DataFrame:
    """A reviewer who knows the true place of every frame fixes one misplaced frame at a time;
    after each fix the adapter is retrained and everything reclustered.

    Each place has a primary cluster: the largest one whose majority is that place. A frame is
    misplaced when it is not in its place's primary cluster (a stray in another place's cluster,
    a piece of a place split in two, or in the noise bucket); it goes there, or to a new cluster
    when its place has none. Which misplaced frame is fixed next is drawn with ``cfg.seed``.
    Returns one row per step: corrections so far, the adjusted Rand index on the frames the
    reviewer never touched and on all frames, and the cluster and noise counts.
    """
    rng = random.Random(cfg.seed)
    truth_of = dict(zip(frame_ids, truth, strict=True))
    moves: list[tuple[str, str, str]] = []
    labels = recluster(vectors, frame_ids, [], None, cfg)
    initial = list(labels)
    rows = []
    for k in range(steps + 1):
        touched = {a for a, _, _ in moves}
        keep = [i for i, fid in enumerate(frame_ids) if fid not in touched]
        rows.append(
            {
                "corrections": k,
                "ari_untouched": adjusted_rand([truth[i] for i in keep], [labels[i] for i in keep]),
                # The same frames as clustered before any correction: what pins alone would give.
                "ari_untouched_without": adjusted_rand([truth[i] for i in keep], [initial[i] for i in keep]),
                "ari_all": adjusted_rand(list(truth), labels),
                "clusters": len({label for label in labels if label != NOISE}),
                "noise": sum(label == NOISE for label in labels),
                "moved": moves[-1][0] if moves else None,
            }
        )
        if k == steps:
            break
        primary = _primary_clusters(frame_ids, labels, truth_of)
        wrong = [
            fid
            for fid, label in zip(frame_ids, labels, strict=True)
            if fid not in touched and primary.get(truth_of[fid]) != label
        ]
        if not wrong:
            rows[-1]["note"] = "nothing left to fix"
            break
        fid = rng.choice(sorted(wrong))
        source = labels[frame_ids.index(fid)]
        target = primary.get(truth_of[fid]) or cluster_id(next_cluster_number(labels))
        moves.append((fid, source, target))
        labels = recluster(vectors, frame_ids, moves, dict(zip(frame_ids, labels, strict=True)), cfg)
    return pl.DataFrame(rows)


def ground_truth_places(movie: Path) -> dict[int, str] | None:
    """Frame index -> true place, from a ``ground_truth.json`` beside the movie whose shots carry a
    ``source`` (the demo movie's); None when there is none."""
    path = Path(movie).with_name("ground_truth.json")
    if not path.is_file():
        return None
    shots = json.loads(path.read_text()).get("shots", [])
    if not shots or any("source" not in s for s in shots):
        return None
    return {i: s["source"] for s in shots for i in range(s["start_frame"], s["end_frame"])}


def learning_curve(
    movie: Path, cfg, *, every: int = 8, steps: int = 8, seeds: Sequence[int] = (0, 1, 2), work_dir: Path
) -> pl.DataFrame:
    """:func:`simulate_reviewer` on every ``every``-th frame of a movie with a ground truth (the
    demo), once per seed; one row per seed and step.

    Why not only the run's own frames: the demo's few kept frames (one to three per shot) leave
    almost nothing for a correction to teach about *other* frames; sampled densely, a pan or a
    zoom gives many frames of one place that drift apart, which is where learning shows.
    """
    places = ground_truth_places(movie)
    if places is None:
        raise UserError(
            f"no ground truth with places beside {movie} (ground_truth.json with shots[].source); the "
            "simulated reviewer needs one (the demo movie has it)"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    paths, truth, ids = [], [], []
    with av.open(str(movie)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % every or index not in places:
                continue
            path = work_dir / f"{index:07d}.jpg"
            cv2.imwrite(str(path), frame.to_ndarray(format="bgr24"), [cv2.IMWRITE_JPEG_QUALITY, 92])
            paths.append(path)
            truth.append(places[index])
            ids.append(f"{index:07d}")
    vectors = make_embedder(cfg).embed_images(paths)
    tables = []
    for seed in seeds:
        curve = simulate_reviewer(vectors, ids, truth, cfg.model_copy(update={"seed": seed}), steps=steps)
        tables.append(curve.with_columns(pl.lit(seed).alias("seed")))
    return pl.concat(tables, how="diagonal_relaxed")
