"""Learning from a person's corrections: a small adapter on the scene embeddings, and the
simulated reviewer that shows it working.

Every move on the review board says "this frame belongs with that cluster, not with the one it was
in". The adapter (one linear layer, or two layers with a residual connection, in torch) turns that
into a triplet: anchor = the moved frame, positive = the target cluster's centroid, negative = a
frame from another cluster (the one it left, when there was one), and is trained with a triplet
loss on cosine distance. It starts as the identity and every frame is held near its own input (an
average cosine-distance term over all frames), so an adapter learned from a few moves changes the
space only in the directions those moves point at;
frames like the moved ones (the rest of its shot, the same place in another light) follow it when
the stage reclusters through the adapter, frames unlike them stay where they were.

Why our own code: this is a few dozen lines of torch. Metric-learning libraries (for example
pytorch-metric-learning) bring miners and losses for training whole networks on labelled data
sets, not an identity-initialised adapter fitted to a handful of pairs in a notebook.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from diffusion_bunny.scenes import NEW, NOISE, normalise


@dataclass
class Adapter:
    """Weights of a trained adapter (numpy, so applying it needs no torch)."""

    dim: int
    hidden: int
    weights: dict[str, np.ndarray]
    triplets: int = 0
    losses: list[float] = field(default_factory=list)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Unit vectors in the adapted space."""
        x = np.asarray(vectors, dtype=np.float32)
        if self.hidden == 0:
            y = x @ self.weights["w"].T + self.weights["b"]
        else:
            h = np.maximum(x @ self.weights["w1"].T + self.weights["b1"], 0.0)
            y = x + h @ self.weights["w2"].T + self.weights["b2"]
        return normalise(y)

    def save(self, path: Path) -> None:
        import io

        from diffusion_bunny.run import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, dim=self.dim, hidden=self.hidden, triplets=self.triplets, **self.weights)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Adapter:
        with np.load(path) as data:
            weights = {k: data[k] for k in data.files if k not in ("dim", "hidden", "triplets")}
            return cls(int(data["dim"]), int(data["hidden"]), weights, int(data["triplets"]))


@dataclass(frozen=True)
class Triplet:
    anchor: int  # row of the moved frame
    positives: tuple[int, ...]  # rows of the target cluster's other members (its centroid)
    negatives: tuple[int, ...]  # rows a negative is drawn from


def triplets_from_feedback(
    feedback: pl.DataFrame, frame_ids: Sequence[str], labels: dict[str, str]
) -> list[Triplet]:
    """One triplet per scene-level move whose frame still exists and whose target cluster has
    other members (``labels``: frame id -> the scene cluster it is in now, moves applied).

    Moves to the noise bucket or to a brand-new cluster have no centroid to pull towards; they
    stay manual placements without teaching the adapter. Character-level moves say who is in a
    frame, which a scene embedding should not learn.
    """
    row = {fid: i for i, fid in enumerate(frame_ids)}
    members: dict[str, list[int]] = defaultdict(list)
    for fid, cid in labels.items():
        if fid in row and cid != NOISE:
            members[cid].append(row[fid])
    out = []
    last = feedback.filter(pl.col("level") == "scene").unique(["anchor_id"], keep="last", maintain_order=True)
    for anchor_id, source, target in last.select("anchor_id", "from_cluster", "to_cluster").iter_rows():
        if anchor_id not in row or target in (NOISE, NEW):
            continue
        a = row[anchor_id]
        positives = tuple(i for i in members.get(target, []) if i != a)
        if not positives:
            continue
        negatives = tuple(i for i in members.get(source, []) if i != a) if source != NOISE else ()
        if not negatives:
            negatives = tuple(i for cid, rows in members.items() if cid != target for i in rows if i != a)
        if negatives:
            out.append(Triplet(a, positives, negatives))
    return out


def train_adapter(
    vectors: np.ndarray,
    triplets: Sequence[Triplet],
    *,
    hidden: int = 0,
    epochs: int = 300,
    lr: float = 0.01,
    margin: float = 0.2,
    identity_weight: float = 1.0,
    seed: int = 0,
) -> Adapter:
    """Fit the adapter on ``triplets`` over unit ``vectors`` (full batch, Adam, fixed seed)."""
    import torch

    x = torch.from_numpy(normalise(vectors))
    dim = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if hidden == 0:
        w = torch.nn.Parameter(torch.eye(dim))
        b = torch.nn.Parameter(torch.zeros(dim))
        params = [w, b]

        def forward(v):
            return v @ w.T + b

    else:
        w1 = torch.nn.Parameter(torch.randn(hidden, dim, generator=gen) / np.sqrt(dim))
        b1 = torch.nn.Parameter(torch.zeros(hidden))
        w2 = torch.nn.Parameter(torch.zeros(dim, hidden))  # residual branch starts at zero
        b2 = torch.nn.Parameter(torch.zeros(dim))
        params = [w1, b1, w2, b2]

        def forward(v):
            return v + torch.relu(v @ w1.T + b1) @ w2.T + b2

    losses: list[float] = []
    if triplets:
        opt = torch.optim.Adam(params, lr=lr)
        anchors = torch.tensor([t.anchor for t in triplets])
        for _ in range(epochs):
            negatives = torch.tensor([rng.choice(t.negatives) for t in triplets])
            y = torch.nn.functional.normalize(forward(x), dim=1)
            pos = torch.stack(
                [torch.nn.functional.normalize(y[list(t.positives)].mean(0), dim=0) for t in triplets]
            )
            a = y[anchors]
            d_pos = 1.0 - (a * pos).sum(1)
            d_neg = 1.0 - (a * y[negatives]).sum(1)
            # Every frame is asked to stay where it was (cosine distance to its own input): a few
            # triplets then bend the space only where they must. A penalty on the weights alone
            # was measured to let one triplet collapse the whole demo into two clusters.
            drift = (1.0 - (y * x).sum(1)).mean()
            loss = torch.relu(d_pos - d_neg + margin).mean() + identity_weight * drift
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    names = ["w", "b"] if hidden == 0 else ["w1", "b1", "w2", "b2"]
    weights = {n: p.detach().numpy().astype(np.float32).copy() for n, p in zip(names, params, strict=True)}
    return Adapter(dim, hidden, weights, len(triplets), losses)


def train_adapter_for(vectors: np.ndarray, triplets: Sequence[Triplet], cfg) -> Adapter:
    """:func:`train_adapter` with the ``scenes`` settings (the stage and the simulated reviewer
    must train alike, or the learning curve would show another adapter than the stage uses)."""
    return train_adapter(
        vectors,
        triplets,
        hidden=cfg.adapter_hidden,
        epochs=cfg.adapter_epochs,
        lr=cfg.adapter_lr,
        margin=cfg.adapter_margin,
        identity_weight=cfg.adapter_identity_weight,
        seed=cfg.seed,
    )


def _ari_labels(labels: Sequence[str]) -> list[str]:
    # Every noise frame is its own singleton: the noise bucket is not a group of alike frames.
    return [f"{NOISE}:{i}" if label == NOISE else label for i, label in enumerate(labels)]


def adjusted_rand(truth: Sequence[str], labels: Sequence[str]) -> float:
    from sklearn.metrics import adjusted_rand_score

    if len(truth) < 2:
        return float("nan")
    return float(adjusted_rand_score(list(truth), _ari_labels(labels)))


def recluster(
    vectors: np.ndarray,
    frame_ids: Sequence[str],
    moves: Sequence[tuple[str, str, str]],
    previous: dict[str, str] | None,
    cfg,
) -> list[str]:
    """Scene labels after learning from ``moves`` (anchor, from, to): the adapter trained on them,
    a fresh clustering in the adapted space with the previous ids kept, the moved frames where
    the person put them. The same steps as the stage, without the tables."""
    from diffusion_bunny.scenes import cluster_scenes, renumber_by_size, stable_ids

    space = vectors
    if moves and cfg.adapter == "auto":
        fb = pl.DataFrame(
            [{"anchor_id": a, "from_cluster": f, "to_cluster": t, "level": "scene"} for a, f, t in moves]
        )
        labels_now = dict(previous or {})
        labels_now.update({a: t for a, _, t in moves})
        triplets = triplets_from_feedback(fb, frame_ids, labels_now)
        if triplets:
            space = train_adapter_for(vectors, triplets, cfg).transform(vectors)
    result = cluster_scenes(
        space,
        frame_ids,
        assign_threshold=cfg.assign_threshold,
        noise_threshold=cfg.noise_threshold,
        index_min_frames=cfg.index_min_frames,
    )
    pinned = {a: t for a, _, t in moves}
    # The pinned frames' clusters count as previous ones, so a cluster a person opened keeps its id.
    before = {**(previous or {}), **pinned}
    if before:
        mapping = stable_ids(result.labels, frame_ids, before)
    else:
        mapping = renumber_by_size(result.labels, frame_ids)
    labels = [mapping.get(label, NOISE) for label in result.labels]
    return [pinned.get(fid, label) for fid, label in zip(frame_ids, labels, strict=True)]


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
    from diffusion_bunny.scenes import cluster_id, next_cluster_number

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
    import json

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
    import av
    import cv2

    from diffusion_bunny.embeddings import make_embedder
    from diffusion_bunny.errors import UserError

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
