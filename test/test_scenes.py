"""Stage 04 (``scenes``): clustering rules, corrections, the adapter, search and export."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from diffusion_bunny.scene_adapter import Adapter, train_adapter, triplets_from_feedback
from diffusion_bunny.scenes import (
    NOISE,
    apply_feedback,
    assign_incremental,
    cluster_scenes,
    clusters_table,
    frame_characters,
    neighbour_stats,
    normalise,
    renumber_by_size,
    similar_frames,
    stable_ids,
)


def blobs(n_per: int, centres: int, dim: int = 32, spread: float = 0.05, seed: int = 0, outliers: int = 0):
    """Unit vectors around ``centres`` random directions (similarity within a blob ~0.95, across
    ~0), plus ``outliers`` lone random directions."""
    rng = np.random.default_rng(seed)
    c = normalise(rng.normal(size=(centres, dim)))
    vecs = np.repeat(c, n_per, axis=0) + rng.normal(scale=spread, size=(centres * n_per, dim))
    truth = np.repeat(np.arange(centres), n_per)
    if outliers:
        vecs = np.vstack([vecs, rng.normal(size=(outliers, dim))])
        truth = np.concatenate([truth, -1 - np.arange(outliers)])
    ids = [f"m_{i:07d}" for i in range(len(vecs))]
    return normalise(vecs), ids, truth


def partition(labels, ids):
    groups: dict[str, set[str]] = {}
    for label, fid in zip(labels, ids, strict=True):
        groups.setdefault(label, set()).add(fid)
    return {frozenset(g) for label, g in groups.items() if label != NOISE}, {
        f for label, f in zip(labels, ids, strict=True) if label == NOISE
    }


def test_blobs_become_clusters_and_lone_frames_noise():
    vecs, ids, truth = blobs(6, 4, outliers=3)
    result = cluster_scenes(vecs, ids)
    groups, noise = partition(result.labels, ids)
    expected = {frozenset(f for f, t in zip(ids, truth, strict=True) if t == k) for k in range(4)}
    assert groups == expected
    assert noise == {f for f, t in zip(ids, truth, strict=True) if t < 0}
    assert all(result.similarity[i] >= 0.85 for i, label in enumerate(result.labels) if label != NOISE)
    assert all(np.isnan(result.similarity[i]) for i, label in enumerate(result.labels) if label == NOISE)


def test_middling_lone_frame_opens_its_own_cluster():
    # A frame at similarity ~0.7 to a cluster: not close enough to join, too close for noise.
    base = normalise(np.array([[1.0, 0.0, 0.0]] * 3 + [[0.7, 0.714, 0.0]]))
    result = cluster_scenes(base, ["a", "b", "c", "d"])
    assert result.labels[:3] == [result.labels[0]] * 3
    assert result.labels[3] not in (NOISE, result.labels[0])
    far = normalise(np.array([[1.0, 0.0, 0.0]] * 3 + [[0.3, 0.0, 0.954]]))
    assert cluster_scenes(far, ["a", "b", "c", "d"]).labels[3] == NOISE


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_result_does_not_depend_on_frame_order(seed):
    # Overlapping blobs (spread 0.25): a leader pass in table order would split them differently
    # for every order.
    vecs, ids, _ = blobs(8, 5, dim=16, spread=0.25, seed=7, outliers=4)
    reference = partition(cluster_scenes(vecs, ids).labels, ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    shuffled = cluster_scenes(vecs[perm], [ids[i] for i in perm])
    assert partition(shuffled.labels, [ids[i] for i in perm]) == reference


def test_hnsw_index_agrees_with_exact_search():
    vecs, ids, _ = blobs(30, 40, dim=48, spread=0.04, seed=3, outliers=20)
    exact = cluster_scenes(vecs, ids, index_min_frames=0)
    indexed = cluster_scenes(vecs, ids, index_min_frames=100)
    assert partition(indexed.labels, ids) == partition(exact.labels, ids)
    counts_exact, best_exact = neighbour_stats(vecs, 0.85, use_index=False)
    counts_idx, best_idx = neighbour_stats(vecs, 0.85, use_index=True)
    assert np.array_equal(counts_exact, counts_idx)  # blobs of 30 < HNSW_K: no saturation
    assert np.allclose(best_exact, best_idx, atol=1e-4)


def test_incremental_assignment_leaves_old_clusters_alone():
    vecs, ids, _ = blobs(5, 3, seed=4)
    first = cluster_scenes(vecs[:10], ids[:10])  # blobs 0 and 1
    from diffusion_bunny.scenes import ExemplarIndex

    index = ExemplarIndex(vecs.shape[1], 0)
    for cid, vec in first.exemplar_vectors.items():
        index.add(cid, vec)
    more = assign_incremental(
        vecs[10:],
        ids[10:],
        assign_threshold=0.85,
        noise_threshold=0.5,
        index_min_frames=0,
        exemplars=index,
        first_number=3,
    )
    assert set(more.labels) == {"s003"}  # blob 2 is a new cluster after s001, s002
    # A new frame of blob 0 joins blob 0's existing cluster.
    again = assign_incremental(
        vecs[:1] * 0.999,
        ["new_0"],
        assign_threshold=0.85,
        noise_threshold=0.5,
        index_min_frames=0,
        exemplars=index,
        first_number=4,
    )
    assert again.labels == [first.labels[0]]
    assert not again.exemplars


def test_ids_by_size_and_kept_across_reclustering():
    labels = ["x", "y", "y", "y", NOISE, "x"]
    ids = list("abcdef")
    assert renumber_by_size(labels, ids) == {"y": "s001", "x": "s002"}
    previous = {"a": "s007", "f": "s007", "b": "s002", "c": "s002", "d": "s002"}
    # The reclustering splits y: the larger part keeps s002, the rest gets a fresh id.
    mapping = stable_ids(["p", "q", "q", "r", NOISE, "p"], ids, previous)
    assert mapping["p"] == "s007" and mapping["q"] == "s002" and mapping["r"] == "s008"


def faces_table(rows):
    return pl.DataFrame(rows, schema={"frame_id": pl.String, "character": pl.String}, orient="row")


def test_character_sub_clusters_follow_stage_03_names():
    chars = frame_characters(faces_table([("a", "ann"), ("a", "bob"), ("b", "ann"), ("c", None)]))
    assert chars == {"a": ("ann", "bob"), "b": ("ann",), "c": ("unknown",)}
    table = clusters_table(
        ["a", "b", "c", "d", "e"],
        ["s001", "s001", "s001", "s002", NOISE],
        np.full(5, 0.9),
        [0, 0, 1, 2, 3],
        chars,
    )
    char = dict(table.filter(pl.col("level") == "character").select("frame_id", "cluster_id").iter_rows())
    assert char == {"a": "s001/ann+bob", "b": "s001/ann", "c": "s001/unknown", "d": "s002/nobody", "e": NOISE}
    assert table.filter(pl.col("cluster_id") == NOISE)["similarity"].null_count() == 2
    assert table.filter(pl.col("frame_id") == "a")["name"].to_list() == ["scene 01", "scene 01 · ann, bob"]


def feedback_rows(*moves):
    from datetime import UTC, datetime, timedelta

    from diffusion_bunny.scenes import FEEDBACK_SCHEMA

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return pl.DataFrame(
        [
            {
                "event_id": f"e{i}",
                "ts": t0 + timedelta(seconds=i),
                "anchor_id": a,
                "from_cluster": f,
                "to_cluster": t,
                "label": 1,
                "level": lvl,
            }
            for i, (a, f, t, lvl) in enumerate(moves)
        ],
        schema=FEEDBACK_SCHEMA,
    )


def test_latest_correction_wins_and_moves_both_levels():
    chars = {"a": ("ann",), "b": ("bob",)}
    table = clusters_table(["a", "b", "c"], ["s001", "s002", NOISE], np.full(3, 0.9), [0, 1, 2], chars)
    fb = feedback_rows(
        ("a", "s001", "s002", "scene"),
        ("c", NOISE, "s001", "scene"),
        ("c", "s001", "s002", "scene"),  # changed their mind: the later move wins
        ("b", "s002/bob", "s001/bob", "character"),
    )
    out = apply_feedback(table, fb)
    got = {(f, lvl): c for f, lvl, c in out.select("frame_id", "level", "cluster_id").iter_rows()}
    assert got[("a", "scene")] == "s002" and got[("a", "character")] == "s002/ann"
    assert got[("c", "scene")] == "s002" and got[("c", "character")] == "s002/nobody"
    assert got[("b", "scene")] == "s001" and got[("b", "character")] == "s001/bob"
    assert out.filter(pl.col("manual"))["frame_id"].unique().sort().to_list() == ["a", "b", "c"]


def test_adapter_starts_as_identity_and_learns_a_move():
    vecs, ids, _ = blobs(4, 3, dim=16, seed=5)
    ident = train_adapter(vecs, [], epochs=5)
    assert np.allclose(ident.transform(vecs), vecs, atol=1e-6)
    # Move one frame of blob 0 into blob 1: the adapter pulls it (and its blob mates) towards blob 1.
    labels = {fid: f"s{int(i // 4) + 1:03d}" for i, fid in enumerate(ids)}
    labels[ids[0]] = "s002"
    triplets = triplets_from_feedback(feedback_rows((ids[0], "s001", "s002", "scene")), ids, labels)
    assert len(triplets) == 1 and triplets[0].anchor == 0 and set(triplets[0].negatives) == {1, 2, 3}
    for hidden in (0, 8):
        adapter = train_adapter(vecs, triplets, hidden=hidden, epochs=200, lr=0.05, identity_weight=0.1)
        out = adapter.transform(vecs)
        centroid_b = normalise(out[4:8].mean(0, keepdims=True))[0]
        before = normalise(vecs[4:8].mean(0, keepdims=True))[0]
        assert out[0] @ centroid_b > vecs[0] @ before + 0.2
        assert adapter.losses[-1] < adapter.losses[0]


def test_adapter_round_trips_through_a_file(tmp_path):
    vecs, ids, _ = blobs(3, 2, dim=8, seed=6)
    labels = {fid: ("s001" if i < 3 else "s002") for i, fid in enumerate(ids)}
    labels[ids[0]] = "s002"
    triplets = triplets_from_feedback(feedback_rows((ids[0], "s001", "s002", "scene")), ids, labels)
    adapter = train_adapter(vecs, triplets, hidden=4, epochs=20)
    adapter.save(tmp_path / "a.npz")
    again = Adapter.load(tmp_path / "a.npz")
    assert np.allclose(again.transform(vecs), adapter.transform(vecs))


def test_similar_frames_best_first():
    vecs, ids, _ = blobs(3, 2, dim=8, seed=8)
    table = similar_frames(vecs, ids, vecs[0], k=3, exclude=ids[0])
    assert table["frame_id"].to_list()[:2] == [ids[1], ids[2]] or set(table["frame_id"][:2]) == {
        ids[1],
        ids[2],
    }
    assert table["similarity"].to_list() == sorted(table["similarity"].to_list(), reverse=True)
