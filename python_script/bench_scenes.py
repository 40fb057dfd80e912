"""Benchmark stage 04's clustering on 20,000 frames whose embeddings exist (target: under 60 s).

What it measures, in one run on the same vectors, each timed with ``time.perf_counter``:

1. ``cluster_scenes`` as the stage runs it with the default ``scenes.index_min_frames`` (exact
   blocked all-pairs similarities under it, usearch HNSW neighbours from it on; exemplar lookups
   through an index once there are many clusters);
2. the same through the other neighbour path (HNSW when the default is exact, and the reverse),
   to show where the index pays and that both give the same partition (adjusted Rand index);
3. incremental assignment of 2,000 new frames against the clusters of the first run;
4. the reference a user might otherwise reach for: scikit-learn's DBSCAN with the cosine metric
   (``eps = 1 - assign_threshold``), and its agreement with ours.

Vectors: without ``--embeddings``, synthetic unit vectors shaped like the descriptor embedder's
(313 dimensions): ``--places`` places, each a random direction with frames spread around it so
that frames of one place score about 0.9 against each other, plus ``--noise-share`` lone frames.
The adjusted Rand index against those true places is printed for both tools. With
``--embeddings PARQUET`` (an ``embeddings`` table of a run), its vectors are tiled with a little
jitter up to ``--frames``.

    uv run python python_script/bench_scenes.py [--frames 20000] [--places 400] [--noise-share 0.03]
        [--embeddings RUN/tables/embeddings.parquet] [--skip-other] [--skip-dbscan]

Exit status 0 even when the target is missed (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from diffusion_bunny.stages.scenes.clustering import (
    ExemplarIndex,
    assign_incremental,
    cluster_scenes,
    normalise,
)
from diffusion_bunny.stages.scenes.settings import ScenesSettings
from diffusion_bunny.stages.scenes.tables import NOISE

TARGET_S = 60.0


def synthetic(n: int, places: int, noise_share: float, dim: int, seed: int):
    """Unit vectors around ``places`` directions (within-place similarity ~0.9) plus lone frames."""
    rng = np.random.default_rng(seed)
    n_noise = int(n * noise_share)
    centres = normalise(rng.normal(size=(places, dim)))
    sizes = rng.multinomial(n - n_noise, rng.dirichlet(np.ones(places) * 2.0))
    truth = np.repeat(np.arange(places), sizes)
    # Spread: a perturbation of norm ~0.3 gives cosine ~0.95 to the centre and ~0.9 between frames.
    vecs = centres[truth] + rng.normal(scale=0.3 / np.sqrt(dim), size=(len(truth), dim))
    vecs = np.vstack([vecs, rng.normal(size=(n_noise, dim))])
    truth = np.concatenate([truth, -1 - np.arange(n_noise)])
    order = rng.permutation(n)
    return normalise(vecs[order]), truth[order]


def tiled(path: Path, n: int, seed: int):
    import polars as pl

    base = normalise(np.asarray(pl.read_parquet(path, glob=False)["vector"].to_list(), dtype=np.float32))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=n)
    vecs = base[idx] + rng.normal(scale=0.1 / np.sqrt(base.shape[1]), size=(n, base.shape[1]))
    return normalise(vecs), idx


def _singletons(labels) -> list[str]:
    # Noise (ours: "noise", DBSCAN: -1, synthetic truth: negative) is no group: each its own label.
    return [
        f"noise{i}"
        if label in (NOISE, -1) or (isinstance(label, (int, np.integer)) and label < 0)
        else str(label)
        for i, label in enumerate(labels)
    ]


def ari(truth, labels) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(_singletons(list(truth)), _singletons(list(labels))))


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--places", type=int, default=400)
    parser.add_argument("--noise-share", type=float, default=0.03)
    parser.add_argument("--dim", type=int, default=313, help="dimensions of the synthetic vectors")
    parser.add_argument("--new", type=int, default=2_000, help="frames added incrementally")
    parser.add_argument(
        "--embeddings", type=Path, help="an embeddings table to tile instead of synthetic vectors"
    )
    parser.add_argument("--skip-other", action="store_true")
    parser.add_argument("--skip-dbscan", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = ScenesSettings()
    total = args.frames + args.new
    if args.embeddings:
        vecs, truth = tiled(args.embeddings, total, args.seed)
        source = f"{args.embeddings} tiled with jitter"
    else:
        vecs, truth = synthetic(total, args.places, args.noise_share, args.dim, args.seed)
        source = f"synthetic: {args.places} places, {args.noise_share:.0%} lone frames, {args.dim} dims"
    ids = [f"m_{i:07d}" for i in range(total)]
    old, new = slice(0, args.frames), slice(args.frames, total)
    print(
        f"cpu: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; load {os.getloadavg()}"
    )
    print(f"vectors: {args.frames} frames (+{args.new} incremental), {source}")
    print(
        f"thresholds: assign {cfg.assign_threshold}, noise {cfg.noise_threshold}; "
        f"index from {cfg.index_min_frames} frames"
    )

    params = dict(assign_threshold=cfg.assign_threshold, noise_threshold=cfg.noise_threshold)
    ours, t_ours = timed(
        lambda: cluster_scenes(vecs[old], ids[old], index_min_frames=cfg.index_min_frames, **params)
    )
    indexed = args.frames >= cfg.index_min_frames
    rows = [(f"stage 04 clustering ({'usearch HNSW' if indexed else 'exact, default'})", t_ours, ours.labels)]
    if not args.skip_other:
        # The other neighbour path on the same vectors: the index when the default is exact.
        other = 0 if indexed else 1
        alt, t_alt = timed(lambda: cluster_scenes(vecs[old], ids[old], index_min_frames=other, **params))
        rows.append((f"stage 04 clustering ({'usearch HNSW' if other else 'exact'})", t_alt, alt.labels))

    index = ExemplarIndex.for_frames(vecs.shape[1], cfg.index_min_frames)
    for cid, vec in ours.exemplar_vectors.items():
        index.add(cid, vec)
    inc, t_inc = timed(
        lambda: assign_incremental(
            vecs[new],
            ids[new],
            index_min_frames=cfg.index_min_frames,
            exemplars=index,
            first_number=len(ours.exemplars) + 1,
            **params,
        )
    )
    if not args.skip_dbscan:
        from sklearn.cluster import DBSCAN

        db, t_db = timed(
            lambda: DBSCAN(
                eps=1 - cfg.assign_threshold, min_samples=2, metric="cosine", n_jobs=-1
            ).fit_predict(vecs[old])
        )
        rows.append(("scikit-learn DBSCAN (cosine)", t_db, list(db)))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(
        f"{'tool':42s} {'wall s':>8s} {'clusters':>9s} {'noise':>7s} {'ARI truth':>10s} {'ARI vs ours':>12s}"
    )
    print("-" * 92)
    for name, seconds, labels in rows:
        clusters = len({label for label in labels if label not in (NOISE, -1)})
        noise = sum(label in (NOISE, -1) for label in labels)
        print(
            f"{name:42s} {seconds:8.2f} {clusters:9d} {noise:7d} {ari(truth[old], labels):10.3f} "
            f"{ari(ours.labels, labels):12.3f}"
        )
    print(
        f"{'incremental: +' + str(args.new) + ' frames':42s} {t_inc:8.2f} "
        f"{len(inc.exemplars):9d} {sum(label == NOISE for label in inc.labels):7d} "
        f"{ari(truth[new], inc.labels):10.3f} {'(new clusters)':>12s}"
    )
    print(f"\npeak RSS {peak:.0f} MiB")
    verdict = "PASS" if t_ours < TARGET_S else "FAIL"
    print(f"target: clustering {args.frames} frames {t_ours:.1f} s (target < {TARGET_S:.0f} s)  {verdict}")
    if not args.skip_dbscan:
        print(f"ratio: DBSCAN / stage 04 = {t_db / t_ours:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
