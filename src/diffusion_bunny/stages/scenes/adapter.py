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

import io
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from diffusion_bunny.models.device import torch_threads
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.stages.scenes.clustering import cluster_scenes, normalise, renumber_by_size, stable_ids
from diffusion_bunny.stages.scenes.tables import NEW, NOISE


@dataclass
class Adapter:
    """Weights of a trained adapter (numpy, so applying it needs no torch)."""

    dim: int
    hidden: int
    weights: dict[str, np.ndarray]
    triplets: int = 0
    losses: list[float] = field(default_factory=list)
    #: What it was trained from (the corrections, the settings, the embedder): the stage reuses a
    #: saved adapter of the same key instead of training another one.
    key: str = ""

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
        buf = io.BytesIO()
        np.savez(buf, dim=self.dim, hidden=self.hidden, triplets=self.triplets, key=self.key, **self.weights)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Adapter:
        with np.load(path) as data:
            weights = {k: data[k] for k in data.files if k not in ("dim", "hidden", "triplets", "key")}
            key = str(data["key"]) if "key" in data.files else ""  # one saved before keys: trained again
            return cls(int(data["dim"]), int(data["hidden"]), weights, int(data["triplets"]), key=key)


@dataclass(frozen=True)
class Triplet:
    anchor: int  # row of the moved frame
    positives: tuple[int, ...]  # rows of the target cluster's other members (its centroid)
    negatives: tuple[int, ...]  # rows a negative is drawn from


def triplets_from_feedback(
    feedback: pl.DataFrame, frame_ids: Sequence[str], labels: dict[str, str]
) -> list[Triplet]:
    """One triplet per scene-level move whose frame still exists and whose cluster now has other
    members (``labels``: frame id -> the scene cluster it is in now, moves applied).

    The frame is pulled towards where it is now, not towards the move's ``to_cluster``: a later
    character-level move into another scene's sub-cluster moves the scene too, and the stale
    target taught the adapter the place the person had taken it out of. Moves to the noise bucket
    or to a brand-new cluster have no centroid to pull towards; they stay manual placements
    without teaching the adapter. Character-level moves alone say who is in a frame, which a
    scene embedding should not learn.
    """
    row = {fid: i for i, fid in enumerate(frame_ids)}
    members: dict[str, list[int]] = defaultdict(list)
    for fid, cid in labels.items():
        if fid in row and cid != NOISE:
            members[cid].append(row[fid])
    out = []
    last = feedback.filter(pl.col("level") == "scene").unique(["anchor_id"], keep="last", maintain_order=True)
    for anchor_id, source in last.select("anchor_id", "from_cluster").iter_rows():
        target = labels.get(anchor_id, NOISE)
        if anchor_id not in row or target in (NOISE, NEW):
            continue
        a = row[anchor_id]
        positives = tuple(i for i in members.get(target, []) if i != a)
        if not positives:
            continue
        negatives = (
            tuple(i for i in members.get(source, []) if i != a) if source not in (NOISE, target) else ()
        )
        if not negatives:
            negatives = tuple(i for cid, rows in members.items() if cid != target for i in rows if i != a)
        if negatives:
            out.append(Triplet(a, positives, negatives))
    return out


@torch_threads(1)
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
    """Fit the adapter on ``triplets`` over unit ``vectors`` (full batch, Adam, fixed seed), on
    one torch thread (:func:`~diffusion_bunny.models.device.torch_threads`: the problem is too
    small for more, and spinning threads cost several times over on a busy machine)."""
    import torch  # lazy: torch takes 1.1 s to import

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
        # fused: one kernel for Adam's update of all the weights (the per-tensor steps were a
        # quarter of an epoch on a 313-wide adapter).
        opt = torch.optim.Adam(params, lr=lr, fused=True)
        anchors = torch.tensor([t.anchor for t in triplets])
        # Each triplet's positives as one row of averaging weights: the means of all the
        # triplets' positives are then one matrix product per epoch, not a gather and a mean per
        # triplet (Python-side work that dominated an epoch on the demo's 120 frames).
        positives = torch.zeros(len(triplets), x.shape[0])
        for row, t in zip(positives, triplets, strict=True):
            index = torch.tensor(t.positives)
            row.index_add_(0, index, torch.full((len(index),), 1.0 / len(index)))
        # Every epoch's negatives, drawn up front in the order one draw per triplet per epoch.
        negatives = torch.tensor([[rng.choice(t.negatives) for t in triplets] for _ in range(epochs)])
        normalize = torch.nn.functional.normalize
        for epoch in range(epochs):
            y = normalize(forward(x), dim=1)
            pos = normalize(positives @ y, dim=1)
            a = y[anchors]
            d_pos = 1.0 - (a * pos).sum(1)
            d_neg = 1.0 - (a * y[negatives[epoch]]).sum(1)
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
