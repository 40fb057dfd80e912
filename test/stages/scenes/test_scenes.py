"""Stage 04 (``scenes``): clustering rules, corrections, the adapter, search and export."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from diffusion_bunny.config import load_config
from diffusion_bunny.errors import BadInputError, StageError
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.scenes import summary as summary_of
from diffusion_bunny.stages.scenes.adapter import Adapter, train_adapter, triplets_from_feedback
from diffusion_bunny.stages.scenes.clustering import (
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
from diffusion_bunny.stages.scenes.stage import (
    HAND_MADE_FILE,
    LIBRARY_FILE,
    _hand_made_ids,
    library_key,
    move_to_cluster,
)
from diffusion_bunny.stages.scenes.tables import JOIN_FILE, NOISE


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


@pytest.mark.parametrize("index_min", [0, 2])
def test_lone_frames_like_each_other_open_clusters_before_any_exists(index_min):
    """Noise is a frame like nothing else: measured against the other frames too, not only against
    the exemplars open so far. With none open yet (a short film, a strict assign_threshold) every
    lone frame went to noise: two frames at 0.8, or four at 0.9 under assign_threshold 0.97, gave
    0 scenes. A frame far from all the others still goes to noise."""
    pair = normalise(np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]]))
    labels = cluster_scenes(pair, ["a", "b"], index_min_frames=index_min).labels
    assert NOISE not in labels and len(set(labels)) == 2
    close = np.zeros((4, 5), np.float32)
    close[:, 0] = np.sqrt(0.9)
    close[np.arange(4), np.arange(1, 5)] = np.sqrt(0.1)  # each pair at similarity 0.9
    labels = cluster_scenes(close, list("abcd"), assign_threshold=0.97, index_min_frames=index_min).labels
    assert NOISE not in labels and len(set(labels)) == 4
    # Beside a cluster, two lone frames like each other (0.8) but like no exemplar open a cluster each.
    vecs = normalise(np.array([[1.0, 0, 0, 0]] * 3 + [[0, 0, 1.0, 0], [0, 0, 0.8, 0.6], [0, 1.0, 0, 0]]))
    labels = cluster_scenes(vecs, list("abcdef"), index_min_frames=index_min).labels
    assert labels[:3] == [labels[0]] * 3 and NOISE not in labels[3:5] and len(set(labels[:5])) == 3
    assert labels[5] == NOISE


@pytest.mark.parametrize(("seed", "index_min"), [(1, 0), (2, 0), (3, 0), (4, 10), (5, 10)])
def test_result_does_not_depend_on_frame_order(seed, index_min):
    # Overlapping blobs (spread 0.25): a leader pass in table order would split them differently
    # for every order.
    vecs, ids, _ = blobs(8, 5, dim=16, spread=0.25, seed=7, outliers=4)
    reference = partition(cluster_scenes(vecs, ids, index_min_frames=index_min).labels, ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    shuffled = cluster_scenes(vecs[perm], [ids[i] for i in perm], index_min_frames=index_min)
    assert partition(shuffled.labels, [ids[i] for i in perm]) == reference


def test_hnsw_index_agrees_with_exact_search():
    vecs, ids, _ = blobs(30, 40, dim=48, spread=0.04, seed=3, outliers=20)
    exact = cluster_scenes(vecs, ids, index_min_frames=0)
    indexed = cluster_scenes(vecs, ids, index_min_frames=100)
    assert partition(indexed.labels, ids) == partition(exact.labels, ids)
    counts_exact, best_exact = neighbour_stats(vecs, 0.85, use_index=False)
    counts_idx, best_idx = neighbour_stats(vecs, 0.85, use_index=True)
    # Blobs of 30 < HNSW_K: no saturation; the search is approximate, so allow a rare miss.
    assert (counts_exact == counts_idx).mean() > 0.99
    # Approximate search: the nearest neighbour of a lone outlier may be missed, never a blob mate's.
    in_blob = counts_exact > 0
    assert np.allclose(best_exact[in_blob], best_idx[in_blob], atol=1e-4)


def test_incremental_assignment_leaves_old_clusters_alone():
    vecs, ids, _ = blobs(5, 3, seed=4)
    first = cluster_scenes(vecs[:10], ids[:10])  # blobs 0 and 1
    from diffusion_bunny.stages.scenes.clustering import ExemplarIndex

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


def test_a_cluster_of_frames_a_person_placed_takes_the_id_of_where_they_went():
    """A place split off into a folder made by hand (s009), or merged into another cluster (s002),
    came back under a fresh id at the next clustering: the folder kept only the frames moved into
    it, and the merged place's exemplar drew its new frames to an id no frame showed."""
    ids = list("abcdefgh")
    previous = {"a": "s002", "b": "s002", "c": "s003"}  # the frames nobody moved
    # d-f were moved from s003 to a new folder s009; g-h merged from s004 into s002.
    placed = {"d": "s009", "e": "s009", "f": "s009", "g": "s002", "h": "s002"}
    labels = ["p", "p", "q", "r", "r", "r", "t", "t"]
    mapping = stable_ids(labels, ids, previous, ["s004", "s009"], placed)
    assert mapping == {"p": "s002", "q": "s003", "r": "s009", "t": "s002"}
    # A folder whose frames joined an unclaimed cluster of other frames names it (a split the
    # adapter learned); a claimed id is shared only when the person's frames are half of it.
    mapping = stable_ids(["p", "p", "q", "r", "r", "r", "r", "r"], ids, previous, (), {"d": "s002"})
    assert mapping["r"] == "s004"
    mapping = stable_ids(["p", "p", "q", "r", "u", "u", "u", "u"], ids, previous, (), {"d": "s009"})
    assert mapping["r"] == "s009" and mapping["u"] == "s010"
    # A cluster that split keeps its id on one part; the other part, which took in frames moved
    # to a claimed folder, is not merged there (its own frames were never moved).
    split = {**previous, "d": "s007", "e": "s007", "f": "s007", "g": "s007"}
    mapping = stable_ids(["p", "p", "q", "u", "u", "u", "r", "r"], ids, split, (), {"h": "s002"})
    assert mapping["u"] == "s007" and mapping["r"] == "s008"
    # The fresh ids go past every id a person placed frames in.
    assert stable_ids(["p", "z"], ["a", "z"], {"a": "s002"}, (), {"y": "s012"})["z"] == "s013"


def faces_table(rows):
    return pl.DataFrame(rows, schema={"frame_id": pl.String, "character": pl.String}, orient="row")


def test_character_sub_clusters_follow_stage_03_names():
    chars = frame_characters(faces_table([("a", "ann"), ("a", "bob"), ("b", "ann"), ("c", None)]))
    assert chars == {"a": ("ann", "bob"), "b": ("ann",), "c": ("unknown",)}
    # Stage 03 searched a-d only: e was never looked at, d was and shows nobody.
    searched = frame_characters(faces_table([("a", "ann")]), ["a", "d", "e"], scanned={"a", "b", "c", "d"})
    assert searched == {"a": ("ann",), "e": ("unscanned",)}
    # Stage 04 without stage 03's tables (--stages extract,quality,scenes): nobody was looked for.
    from diffusion_bunny.stages.scenes.stage import _characters

    assert _characters(None, None, ["a", "b"]) == {"a": ("unscanned",), "b": ("unscanned",)}
    # A face fixed to none in notebook 03 (edited, no name) is nobody: c shows no one unknown.
    fixed = faces_table([("a", "ann"), ("a", None), ("c", None)]).with_columns(
        pl.Series("edited", [False, True, True])
    )
    assert frame_characters(fixed) == {"a": ("ann",)}
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

    from diffusion_bunny.stages.scenes.tables import FEEDBACK_SCHEMA

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


def test_a_scene_move_after_a_character_move_is_where_the_frame_stays():
    """The board shows each move as it is made; a rerun must place the frame there too. A frame
    moved in a character sub-cluster, then to another scene (or to noise), went back to the
    sub-cluster's scene at the next run, as scene moves were applied before every character move."""
    chars = {"a": ("alice",), "b": ("bob",)}
    table = clusters_table(["a", "b"], ["s001", "s001"], np.full(2, 0.9), [0, 1], chars)
    fb = feedback_rows(
        ("a", "s001/alice", "s003/alice", "character"),
        ("a", "s003", "s005", "scene"),  # later: the whole frame to scene 5
        ("b", "s001/bob", "s003/bob", "character"),
        ("b", "s003", NOISE, "scene"),  # later: to noise
    )
    got = {
        (f, lvl): c
        for f, lvl, c in apply_feedback(table, fb).select("frame_id", "level", "cluster_id").iter_rows()
    }
    assert (got[("a", "scene")], got[("a", "character")]) == ("s005", "s005/alice")
    assert (got[("b", "scene")], got[("b", "character")]) == (NOISE, NOISE)
    # The other order: the character move, made later, wins with its scene.
    fb = feedback_rows(("a", "s001", "s005", "scene"), ("a", "s005/alice", "s003/alice", "character"))
    got = {
        (f, lvl): c
        for f, lvl, c in apply_feedback(table, fb).select("frame_id", "level", "cluster_id").iter_rows()
    }
    assert (got[("a", "scene")], got[("a", "character")]) == ("s003", "s003/alice")


def test_a_character_move_into_another_scene_marks_the_scene_row_manual():
    """A character-level move into another scene's sub-cluster moves the frame's scene row: the
    person put it there, so the board's scene view, the CSV and counts.manual say so. It was left
    ``manual`` false, as if the clustering had placed it. A move inside the frame's own scene
    leaves the scene row the clustering's."""
    chars = {"a": ("alice",), "b": ("bob",)}
    table = clusters_table(["a", "b"], ["s001", "s002"], np.full(2, 0.9), [0, 1], chars)
    fb = feedback_rows(
        ("a", "s001/alice", "s002/unknown", "character"), ("b", "s002/bob", "s002/unknown", "character")
    )
    out = apply_feedback(table, fb)
    got = {
        (f, lvl): (c, m)
        for f, lvl, c, m in out.select("frame_id", "level", "cluster_id", "manual").iter_rows()
    }
    assert got[("a", "scene")] == ("s002", True) and got[("a", "character")] == ("s002/unknown", True)
    assert got[("b", "scene")] == ("s002", False) and got[("b", "character")] == ("s002/unknown", True)
    # The next run starts from the clusters as they were left (incremental: the scene row already
    # moved, its manual flag reset): the person's placement is still said to be theirs.
    again = apply_feedback(out.with_columns(pl.lit(False).alias("manual")), fb)
    manual = {(f, lvl): m for f, lvl, m in again.select("frame_id", "level", "manual").iter_rows()}
    assert manual[("a", "scene")] and not manual[("b", "scene")]


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


def test_the_adapter_learns_where_a_later_character_move_put_the_frame():
    """A scene move to s002, then a character move into a sub-cluster of s003: the frame is in s003
    (apply_feedback moves its scene too), so the triplet pulls it towards s003. It pulled it
    towards s002, the place the person had taken it out of again."""
    ids = [f"m_{i:07d}" for i in range(9)]
    fb = feedback_rows((ids[0], "s001", "s002", "scene"), (ids[0], "s002/nobody", "s003/ann", "character"))
    table = clusters_table(ids, [f"s{i // 3 + 1:03d}" for i in range(9)], np.full(9, 0.9), [0] * 9, {})
    labels = scene_map(apply_feedback(table, fb))
    assert labels[ids[0]] == "s003"
    (triplet,) = triplets_from_feedback(fb, ids, labels)
    assert triplet.anchor == 0 and set(triplet.positives) == {6, 7, 8} and set(triplet.negatives) == {1, 2}
    # Taken back by hand where it came from: pulled there, pushed from the other places.
    back = feedback_rows(
        (ids[0], "s001", "s002", "scene"), (ids[0], "s002/nobody", "s001/nobody", "character")
    )
    (triplet,) = triplets_from_feedback(back, ids, scene_map(apply_feedback(table, back)))
    assert set(triplet.positives) == {1, 2} and set(triplet.negatives) == {3, 4, 5, 6, 7, 8}


def test_a_moved_frame_the_last_clusters_lack_still_teaches_the_adapter(tmp_path):
    """A frame moved by hand, then left out of one run by stage 02 (a stricter threshold) and
    put back: the previous clusters lack it, so it counted as noise and trained nothing, and
    the run that said "no adapter" was judged up to date from then on."""
    from diffusion_bunny.stages.scenes.settings import ScenesSettings
    from diffusion_bunny.stages.scenes.stage import _adapted_vectors

    vecs, ids, _ = blobs(4, 3, dim=16, seed=5)
    fb = feedback_rows((ids[0], "s001", "s002", "scene"))
    # The last run's clusters: every frame but the moved one (stage 02 had dropped it).
    table = clusters_table(
        ids[1:], [f"s{i // 4 + 1:03d}" for i in range(1, 12)], np.full(11, 0.9), [0] * 11, {}
    )
    _, key, facts = _adapted_vectors(
        vecs, ids, fb, table, ScenesSettings(), tmp_path / "adapter.npz", learn=True, embedder="test"
    )
    assert key is not None and facts["triplets"] == 1 and (tmp_path / "adapter.npz").is_file()


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
    # The query's two blob mates come first (in either order), then a frame of the other blob.
    assert set(table["frame_id"][:2]) == {ids[1], ids[2]} and table["frame_id"][2] in ids[3:]
    assert table["similarity"].to_list() == sorted(table["similarity"].to_list(), reverse=True)


# ----------------------------------------------------------------------------- the stage on the demo


@pytest.fixture
def scenes_run(demo_run, tmp_path):
    """A copy of the demo run (stages 01-02) with stage 04 done."""
    import shutil

    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    shutil.copytree(demo_run.run_dir, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    cfg = load_config(root=tmp_path)
    run_stage(run, "scenes", cfg, progress=False)
    return run, cfg


def demo_places(run) -> dict[str, str]:
    """Frame id -> the demo ground truth's place (the source picture of the frame's shot)."""
    from diffusion_bunny.demo.reviewer import ground_truth_places

    places = ground_truth_places(run.movie)
    return {
        fid: places[i] for fid, i in run.read_table("frames").select("frame_id", "frame_index").iter_rows()
    }


def scene_map(clusters: pl.DataFrame) -> dict[str, str]:
    """Frame id -> its scene cluster."""
    return dict(clusters.filter(pl.col("level") == "scene").select("frame_id", "cluster_id").iter_rows())


def test_stage_clusters_the_demo_by_place(scenes_run):
    from sklearn.metrics import adjusted_rand_score

    run, _ = scenes_run
    clusters = run.read_table("clusters")
    emb = run.read_table("embeddings")
    kept = run.read_table("quality").filter(pl.col("keep"))["frame_id"].sort().to_list()
    assert sorted(emb["frame_id"].to_list()) == kept
    assert emb["embedder"].unique().to_list() == ["descriptor-v1"]
    assert set(clusters["level"].unique()) == {"scene", "character"}
    assert clusters.group_by("level").len()["len"].to_list() == [len(kept)] * 2
    scene = clusters.filter(pl.col("level") == "scene")
    places = demo_places(run)
    # Every cluster holds one place (precision); places seen in several shots may still be split.
    for (cid,), group in scene.filter(pl.col("cluster_id") != NOISE).group_by("cluster_id"):
        assert len({places[f] for f in group["frame_id"]}) == 1, cid
    ari = adjusted_rand_score([places[f] for f in scene["frame_id"]], scene["cluster_id"].to_list())
    assert ari > 0.6
    # The exemplar table names one frame per cluster, each in its own cluster at similarity 1.
    ex = run.read_table("scene_exemplars")
    assert set(ex["cluster_id"]) == set(scene["cluster_id"]) - {NOISE}
    # The summary says how many character sub-clusters are a scene's frames with nobody named.
    character = clusters.filter((pl.col("level") == "character") & (pl.col("cluster_id") != NOISE))
    unscanned = character.filter(pl.col("characters") == "unscanned")["cluster_id"].n_unique()
    counts = run.read_manifest("scenes")["counts"]
    # Stage 03 did not run on this copy: every scene's frames are one sub-cluster of frames not
    # searched (they were filed as showing nobody).
    assert counts["unscanned_clusters"] == unscanned == counts["character_clusters"] > 0
    assert counts["nobody_clusters"] == 0
    line = summary_of(run.read_manifest("scenes"))
    assert (
        f"({counts['character_clusters']} character sub-clusters, {unscanned} of them in frames stage 03 "
        "did not search)" in line
    )
    assert "of them with nobody" not in summary_of(
        {**run.read_manifest("scenes"), "counts": {**counts, "nobody_clusters": 0}}
    )


def test_move_to_cluster_appends_feedback_and_survives_a_rerun(scenes_run):
    from diffusion_bunny import move_to_cluster
    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import board_state

    run, cfg = scenes_run
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    ids = sorted(set(scene["cluster_id"]) - {NOISE})
    frame = scene.filter(pl.col("cluster_id") == ids[0])["frame_id"][0]
    row = move_to_cluster(run.run_dir, frame, ids[1])
    assert (row["anchor_id"], row["from_cluster"], row["to_cluster"], row["label"]) == (
        frame,
        ids[0],
        ids[1],
        1,
    )
    feedback = run.read_table("feedback")
    assert feedback.height == 1 and feedback["event_id"][0] == row["event_id"]
    after = run.read_table("clusters").filter(pl.col("frame_id") == frame)
    assert after.filter(pl.col("level") == "scene")["cluster_id"][0] == ids[1]
    assert after.filter(pl.col("level") == "scene")["manual"][0]
    # Its similarity is now to the centroid of the cluster it joined.
    emb = run.read_table("embeddings")
    vec = dict(zip(emb["frame_id"], normalise(np.asarray(emb["vector"].to_list())), strict=True))
    members = scene_map(run.read_table("clusters"))
    centroid = normalise(np.mean([vec[f] for f, c in members.items() if c == ids[1]], axis=0)[None])[0]
    sim = after.filter(pl.col("level") == "scene")["similarity"][0]
    assert sim == pytest.approx(float(vec[frame] @ centroid), abs=1e-5)
    assert after.filter(pl.col("level") == "character")["cluster_id"][0].startswith(ids[1] + "/")
    folder = next(f for f in board_state(run.run_dir) if f["id"] == ids[1])
    assert frame in [item["frame_id"] for item in folder["frames"]]
    assert all(Path(item["thumb"]).is_file() for item in folder["frames"])
    # The correction makes the stage stale; the rerun learns from it and keeps it.
    run_stage(run, "scenes", cfg, progress=False)
    manifest = run.read_manifest("scenes")
    assert manifest["counts"]["corrections"] == 1 and manifest["facts"]["mode"] == "full"
    assert manifest["facts"]["adapter"]["triplets"] == 1
    assert (run.run_dir / "models" / "scene_adapter.npz").is_file()
    assert "+adapter:" in manifest["facts"]["space"]
    final = run.read_table("clusters").filter((pl.col("frame_id") == frame) & (pl.col("level") == "scene"))
    assert final["cluster_id"][0] == ids[1] and final["manual"][0]
    # Run again with the same correction (another threshold): the adapter it saved is the space,
    # reused, not trained again from the labels it made (which gave another one under one name).
    adapter_file = run.run_dir / "models" / "scene_adapter.npz"
    saved = adapter_file.read_bytes()
    moved = {"scenes.noise_threshold": cfg.scenes.noise_threshold + 0.01}
    other = load_config(None, moved, root=run.run_dir.parent)
    run_stage(run, "scenes", other, progress=False)
    again = run.read_manifest("scenes")
    assert again["facts"]["adapter"] == {"triplets": 1, "reused": True}
    assert again["facts"]["space"] == manifest["facts"]["space"] and adapter_file.read_bytes() == saved
    run_stage(run, "scenes", cfg, progress=False)
    # A move to a new cluster: nothing to pull towards, so no triplet and no adapter.
    current = set(run.read_table("clusters")["cluster_id"].str.split("/").list.first())
    new = move_to_cluster(run.run_dir, frame, "new")
    assert new["to_cluster"] not in current and new["from_cluster"] == ids[1]
    run_stage(run, "scenes", cfg, progress=False)
    manifest = run.read_manifest("scenes")
    assert manifest["facts"]["adapter"]["triplets"] == 0
    assert not (run.run_dir / "models" / "scene_adapter.npz").exists()
    final = run.read_table("clusters").filter((pl.col("frame_id") == frame) & (pl.col("level") == "scene"))
    assert final["cluster_id"][0] == new["to_cluster"] and final["manual"][0]
    assert run.read_table("feedback").height == 2  # the stage, on its own, never rewrites feedback


def test_damaged_embeddings_or_adapter_and_unreadable_frames_are_said_not_bugs(scenes_run):
    """A damaged embeddings table failed every move on the board as a bug (a parquet error), a
    damaged adapter did the same to "shots like this one", and ``scenes.frames: all`` stopped on
    the first frame stage 02 had already found unreadable."""
    from diffusion_bunny import move_to_cluster
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import frames_to_cluster, shots_like
    from diffusion_bunny.stages.scenes.tables import ADAPTER_FILE

    run, cfg = scenes_run
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    ids = sorted(set(scene["cluster_id"]) - {NOISE})
    frame = scene.filter(pl.col("cluster_id") == ids[0])["frame_id"][0]
    run.table_path("embeddings").write_bytes(b"garbage")
    move_to_cluster(run.run_dir, frame, ids[1])  # the move lands; its similarity comes with the rerun
    after = run.read_table("clusters").filter((pl.col("frame_id") == frame) & (pl.col("level") == "scene"))
    assert after["cluster_id"][0] == ids[1] and after["manual"][0]
    with pytest.raises(StageError, match="embeddings"):
        shots_like(run.run_dir, frame)
    run_stage(run, "scenes", cfg, progress=False)  # rewrites the table, trains the adapter from the move
    assert (run.run_dir / ADAPTER_FILE).is_file()
    (run.run_dir / ADAPTER_FILE).write_bytes(b"not an adapter")
    with pytest.raises(BadInputError, match=r"scene_adapter\.npz is damaged .*rerun stage scenes"):
        shots_like(run.run_dir, frame)
    frames, quality = run.read_table("frames"), run.read_table("quality")
    unreadable = frames["frame_id"][3]
    quality = quality.with_columns(
        pl.when(pl.col("frame_id") == unreadable)
        .then(pl.lit("unreadable"))
        .otherwise("reject_reason")
        .alias("reject_reason")
    )
    every = frames_to_cluster(frames, quality, "all")["frame_id"].to_list()
    assert unreadable not in every and len(every) == frames.height - 1


def test_frames_moved_into_a_folder_leave_its_own_frames_in_it(scenes_run):
    """Two frames moved into a folder of one frame: the rerun gave the folder's id to the cluster
    they came from (two of its members had it), and the folder's own frame, never moved, went to
    a new id apart from them (the Hamilton clip's frame 235)."""
    from diffusion_bunny import move_to_cluster
    from diffusion_bunny.stages import run_stage

    run, cfg = scenes_run
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    sizes = scene.group_by("cluster_id").len().sort(["len", "cluster_id"])
    small, big = sizes["cluster_id"][0], sizes["cluster_id"][-1]
    own = scene.filter(pl.col("cluster_id") == small)["frame_id"].sort().to_list()
    members = scene.filter(pl.col("cluster_id") == big)["frame_id"].sort().to_list()
    moved, stay = members[: len(own) + 1], members[len(own) + 1 :]
    assert stay, "the largest cluster must keep a frame of its own"
    for frame in moved:
        move_to_cluster(run.run_dir, frame, small)
    run_stage(run, "scenes", cfg, progress=False)
    after = scene_map(run.read_table("clusters"))
    assert {after[f] for f in own + moved} == {small}
    assert big in {after[f] for f in stay}  # (the adapter, learning from the moves, may split the rest)


def test_an_emptied_cluster_id_is_not_given_to_another_place(scenes_run):
    """Every frame of one cluster moved into another, then a rerun: the emptied id went to an
    unrelated place, which `captions.scene_names` then named with the old place's name."""
    from diffusion_bunny import move_to_cluster
    from diffusion_bunny.stages import run_stage

    run, cfg = scenes_run
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    top = max(scene["cluster_id"].unique().to_list())
    into = min(scene["cluster_id"].unique().to_list())
    for frame in scene.filter(pl.col("cluster_id") == top)["frame_id"].to_list():
        move_to_cluster(run.run_dir, frame, into)
    run_stage(run, "scenes", cfg, progress=False)  # the adapter learns the moves: clustered afresh
    assert run.read_manifest("scenes")["facts"]["mode"] == "full"
    after = run.read_table("clusters").filter(pl.col("level") == "scene")
    assert top not in set(after["cluster_id"].to_list())
    assert top not in set(run.read_table("scene_exemplars")["cluster_id"].to_list())
    # Nor to a folder the board makes.
    assert move_to_cluster(run.run_dir, after["frame_id"][0], "new")["to_cluster"] > top


def test_moves_keep_their_frames_together_when_the_clusters_table_is_gone(scenes_run):
    """With ``clusters.parquet`` deleted, the rerun handed out fresh ids: each move's folder id
    then named a folder of the moved frame alone, and the frames it had joined went elsewhere
    (s001 = [the moved frame], s012 = the folder's own frames), without a word. The last run's
    exemplars (a frame per cluster) still say which cluster each id was."""
    from diffusion_bunny import move_to_cluster
    from diffusion_bunny.stages import run_stage

    run, cfg = scenes_run
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    sizes = scene.group_by("cluster_id").len().sort(["len", "cluster_id"])
    small, big = sizes["cluster_id"][0], sizes["cluster_id"][-1]
    own = scene.filter(pl.col("cluster_id") == small)["frame_id"].sort().to_list()
    moved = scene.filter(pl.col("cluster_id") == big)["frame_id"].sort().to_list()[0]
    move_to_cluster(run.run_dir, moved, small)
    (run.run_dir / "tables" / "clusters.parquet").unlink()
    run_stage(run, "scenes", cfg, progress=False)
    after = scene_map(run.read_table("clusters"))
    assert {after[f] for f in [*own, moved]} == {small}


def test_bad_moves_are_clear_errors(scenes_run):
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, _ = scenes_run
    frame = run.read_table("clusters")["frame_id"][0]
    with pytest.raises(BadInputError, match="frame 'nope' is not in this run's clusters"):
        move_to_cluster(run.run_dir, "nope", "s001")
    with pytest.raises(BadInputError, match="cluster 's999' does not exist at the scene level"):
        move_to_cluster(run.run_dir, frame, "s999")
    with pytest.raises(BadInputError, match="level must be one of"):
        move_to_cluster(run.run_dir, frame, "s001", level="shot")
    with pytest.raises(BadInputError, match="only be made at the scene level"):
        move_to_cluster(run.run_dir, frame, "new", level="character")
    assert not run.has_table("feedback") or run.read_table("feedback").is_empty()


def _mover(run_dir, frames, targets, barrier):
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    barrier.wait()
    for i, frame in enumerate(frames):
        move_to_cluster(run_dir, frame, targets[i % len(targets)])


def test_a_new_cluster_never_takes_an_id_exemplars_or_moves_still_hold(scenes_run):
    """A cluster emptied by hand keeps its exemplars (an incremental run sends its place's new
    frames to it) and the moves into it: a "new" cluster takes an id past those, else the place's
    new frames would join the person's unrelated new cluster."""
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, _ = scenes_run
    exemplars = run.read_table("scene_exemplars")
    top = max(int(c[1:]) for c in exemplars["cluster_id"])
    held = exemplars.head(1).with_columns(pl.lit(f"s{top + 5:03d}").alias("cluster_id"))
    run.write_table("scene_exemplars", pl.concat([exemplars, held]))
    frames = run.read_table("clusters").filter(pl.col("level") == "scene")["frame_id"].to_list()
    first = move_to_cluster(run.run_dir, frames[0], "new")
    assert first["to_cluster"] == f"s{top + 6:03d}"
    # Moved out again, its id is still the person's: the next new cluster goes past it.
    move_to_cluster(run.run_dir, frames[0], NOISE)
    assert move_to_cluster(run.run_dir, frames[1], "new")["to_cluster"] == f"s{top + 7:03d}"


def test_two_writers_never_lose_a_feedback_row(scenes_run):
    run, _ = scenes_run
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    frames = scene["frame_id"].to_list()
    # Only targets that always exist: a cluster may empty out as frames leave it.
    targets = [NOISE, "new"]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    jobs = [
        ctx.Process(
            target=_mover, args=(str(run.run_dir), frames[k::2] * 3, targets[k:] + targets[:k], barrier)
        )
        for k in (0, 1)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    feedback = run.read_table("feedback")
    assert feedback.height == len(frames) * 3
    assert feedback["event_id"].n_unique() == feedback.height
    # clusters agrees with the last move of every frame
    last = feedback.sort("ts").unique("anchor_id", keep="last")
    now = scene_map(run.read_table("clusters"))
    assert all(now[a] == t for a, t in last.select("anchor_id", "to_cluster").iter_rows())


def test_new_frames_are_assigned_incrementally(scenes_run):
    from diffusion_bunny.stages import run_stage

    run, cfg = scenes_run
    quality = run.read_table("quality")
    before = run.read_table("clusters")
    kept = quality.filter(pl.col("keep"))["frame_id"].to_list()
    # Stage 02 had dropped one frame at first; now it keeps it.
    dropped = kept[len(kept) // 2]
    run.write_table(
        "quality",
        quality.with_columns(
            pl.when(pl.col("frame_id") == dropped).then(False).otherwise(pl.col("keep")).alias("keep")
        ),
    )
    run_stage(run, "scenes", cfg, progress=False, force=True)
    # Same embeddings and thresholds: the remaining frames keep their clusters.
    assert run.read_manifest("scenes")["facts"]["mode"] == "incremental (0 new frames)"
    without = scene_map(run.read_table("clusters"))
    run.write_table("quality", quality)
    run_stage(run, "scenes", cfg, progress=False)
    manifest = run.read_manifest("scenes")
    assert manifest["facts"]["mode"] == "incremental (1 new frames)"
    assert manifest["counts"]["embedded_now"] == 1  # only the frame that came back is embedded
    now = scene_map(run.read_table("clusters"))
    assert {f: c for f, c in now.items() if f != dropped} == without
    first = scene_map(before)
    assert now[dropped] == first[dropped] or now[dropped] not in without.values()


def test_a_second_movie_joins_the_library_clusters(scenes_run, tmp_path):
    import shutil

    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    run, _ = scenes_run
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(tmp_path / "library")})
    run_stage(run, "scenes", cfg, progress=False, force=True)
    lib = pl.read_parquet(tmp_path / "library" / "scene_exemplars.parquet")
    first = scene_map(run.read_table("clusters"))
    # The "second movie": the same frames under another movie key (a re-release, say).
    shutil.copytree(run.run_dir, tmp_path / "second")
    second = Run.open(tmp_path / "second")
    meta = second.meta()
    meta["movie_key"] = "0ther000"
    (second.run_dir / "run.json").write_text(__import__("json").dumps(meta))
    run_stage(second, "scenes", cfg, progress=False, force=True)
    assert second.read_manifest("scenes")["facts"]["mode"] == "library (0 new clusters)"
    again = scene_map(second.read_table("clusters"))
    assert again == first
    assert pl.read_parquet(tmp_path / "library" / "scene_exemplars.parquet").equals(lib)
    # A correction in library mode is kept as a placement; no adapter is trained, and the warning says so.
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    frame = next(iter(again))
    move_to_cluster(second.run_dir, frame, "noise")
    # An adapter this run trained before it joined the library no longer applies.
    stale = second.run_dir / "models" / "scene_adapter.npz"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"an adapter from before")
    with pytest.warns(UserWarning, match=r"no adapter is trained from them \(models/scene_adapter.npz"):
        run_stage(second, "scenes", cfg, progress=False)
    assert second.read_manifest("scenes")["facts"]["adapter"]["triplets"] == 0 and not stale.exists()
    placed = second.read_table("clusters").filter(
        (pl.col("frame_id") == frame) & (pl.col("level") == "scene")
    )
    assert placed["cluster_id"][0] == "noise" and placed["manual"][0]
    # A new cluster made by hand in a member run takes an id no movie holds in the library (this
    # run's exemplars are its own only: it took another movie's), and the library opens none
    # with an id a correction made.
    lib = pl.read_parquet(tmp_path / "library" / "scene_exemplars.parquet")
    other = lib.head(1).with_columns(pl.lit("s900").alias("cluster_id"), pl.lit("0ther111").alias("movie_id"))
    pl.concat([lib, other]).write_parquet(tmp_path / "library" / "scene_exemplars.parquet")
    made = move_to_cluster(second.run_dir, frame, "new")
    assert made["to_cluster"] == "s901"
    # A run that opens clusters (the library forgets its clusters but the one named by hand):
    pl.concat([lib.head(0), other]).write_parquet(tmp_path / "library" / "scene_exemplars.parquet")
    run_stage(second, "scenes", cfg, progress=False)
    opened = set(pl.read_parquet(tmp_path / "library" / "scene_exemplars.parquet")["cluster_id"]) - {"s900"}
    assert opened and min(int(c[1:]) for c in opened) > 901
    # A library of another model's vectors under the same name (a CLIP folder now holding
    # another model): one line naming both, not a raw reshape error (a bug's exit).

    longer = pl.read_parquet(tmp_path / "library" / "scene_exemplars.parquet").with_columns(
        pl.col("vector").list.concat(pl.col("vector"))
    )
    longer.write_parquet(tmp_path / "library" / "scene_exemplars.parquet")
    with pytest.raises(StageError, match=r"holds .* vectors of \d+ numbers, this run makes .* of \d+"):
        run_stage(second, "scenes", cfg, progress=False, force=True)


def test_export_csv_and_edl_read_back(scenes_run):
    import opentimelineio as otio

    from diffusion_bunny.stages.scenes.stage import export_clusters

    run, _ = scenes_run
    paths = export_clusters(run.run_dir)
    csv = pl.read_csv(paths["csv"])
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    assert csv.height == scene.height and set(csv["cluster_id"]) == set(scene["cluster_id"])
    timeline = otio.adapters.read_from_file(str(paths["edl"]), adapter_name="cmx_3600")
    clips = list(timeline.find_clips())
    shots = run.read_table("shots").rows_by_key("shot_id", unique=True, named=True)
    pairs = scene.select("cluster_id", "shot_id").unique()
    assert len(clips) == pairs.height
    for clip in clips:
        _, _, rest = clip.name.partition(" ")
        shot = shots[int(rest.rsplit(" ", 1)[1])]
        assert clip.source_range.start_time.to_frames() == shot["start_frame"]
        assert clip.source_range.duration.to_frames() == shot["end_frame"] - shot["start_frame"]
    text = paths["edl"].read_text()
    assert text.startswith("TITLE:") and "* FROM CLIP NAME:" in text


def test_simulated_reviewer_on_the_run_frames(scenes_run):
    from diffusion_bunny.demo.reviewer import simulate_reviewer

    run, cfg = scenes_run
    emb = run.read_table("embeddings")
    places = demo_places(run)
    curve = simulate_reviewer(
        np.asarray(emb["vector"].to_list(), np.float32),
        emb["frame_id"].to_list(),
        [places[f] for f in emb["frame_id"]],
        cfg.scenes,
        steps=8,
    )
    assert curve["corrections"][0] == 0
    assert curve["ari_untouched"][0] == curve["ari_untouched_without"][0] == curve["ari_all"][0]
    # The reviewer stops when every untouched frame is in its place's cluster.
    assert curve["ari_untouched"][-1] == pytest.approx(1.0)


def test_learning_from_corrections_beats_corrections_alone(demo, tmp_path):
    """The demo movie sampled every 8th frame, ground truth as the reviewer, a strict
    assign_threshold (0.95) so that pans and zooms split places: after 8 corrections the frames
    nobody touched cluster better through the adapter than as first clustered."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.demo.reviewer import learning_curve

    cfg = load_config(root=tmp_path, overrides={"scenes.assign_threshold": 0.95})
    curve = learning_curve(
        demo.path, cfg.scenes, every=8, steps=8, seeds=(0, 1), work_dir=tmp_path / "frames"
    )
    last = curve.group_by("seed").agg(pl.all().last())
    assert last["corrections"].to_list() == [8, 8]
    assert (last["ari_untouched"] > last["ari_untouched_without"] + 0.02).all()
    assert curve.filter(pl.col("corrections") == 0)["ari_untouched"].max() < 0.9


def test_plots_and_sheet_of_the_clusters(scenes_run):
    from diffusion_bunny.stages.scenes.plots import (
        cluster_sheet,
        cluster_sizes_plot,
        learning_curve_plot,
        similarity_histogram,
    )

    run, cfg = scenes_run
    clusters = run.read_table("clusters")
    n_scene = clusters.filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))[
        "cluster_id"
    ].n_unique()
    sizes = cluster_sizes_plot(clusters)
    assert f"scene clusters: {n_scene}," in sizes.labels.title
    assert len(sizes.data) == clusters.filter(pl.col("level") == "scene")["cluster_id"].n_unique()
    hist = similarity_histogram(clusters, cfg.scenes.assign_threshold, cfg.scenes.noise_threshold)
    assert "0.85" in hist.labels.title
    curve = pl.DataFrame(
        {
            "corrections": [0, 1],
            "ari_untouched": [0.5, 0.8],
            "ari_untouched_without": [0.5, 0.6],
            "seed": [0, 0],
        }
    )
    assert len(learning_curve_plot(curve).data) == 4
    for plot in (sizes, hist, learning_curve_plot(curve)):
        assert plot.draw() is not None
    sheet = cluster_sheet(run.run_dir, clusters, run.read_table("frames"))
    groups = clusters.filter(pl.col("level") == "scene")["cluster_id"].n_unique()
    assert sheet.height == groups * (22 + 63 + 14 + 4)
    # Thumbnails were pasted: the sheet is not blank white.
    assert len(np.unique(np.asarray(sheet.resize((64, 64))).reshape(-1, 3), axis=0)) > 50


def test_shots_like_this_one(scenes_run):
    from diffusion_bunny.stages.scenes.stage import shots_like, text_search

    run, cfg = scenes_run
    places = demo_places(run)
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    # A frame of the place seen most often: its nearest frames are of the same place.
    biggest = (
        scene.group_by("cluster_id").len().filter(pl.col("cluster_id") != NOISE).sort("len")[-1, "cluster_id"]
    )
    frame = scene.filter(pl.col("cluster_id") == biggest)["frame_id"][0]
    found = shots_like(run.run_dir, frame, k=3)
    assert found.height == 3 and frame not in found["frame_id"].to_list()
    assert places[found["frame_id"][0]] == places[frame]
    assert found["similarity"].to_list() == sorted(found["similarity"].to_list(), reverse=True)
    assert {"shot_id", "timestamp_s", "cluster_id", "thumb"} <= set(found.columns)
    assert Path(found["thumb"][0]).is_file()
    with pytest.raises(BadInputError, match="has no embedding"):
        shots_like(run.run_dir, "nope")
    from diffusion_bunny.errors import UserError

    with pytest.raises(UserError, match=r"set scenes\.embedder: clip"):
        text_search(run.run_dir, "a woman at a table", cfg.scenes)


def test_shots_like_an_exemplar_the_run_no_longer_keeps(scenes_run):
    """Exemplars never move: after stage 01 keeps other frames, the largest cluster's exemplar
    may be a frame with no embedding in the run. Notebook 04 asked for shots like it and the
    whole ``bunny run`` stopped ("has no embedding"); its stored vector answers instead."""
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import shots_like

    run, cfg = scenes_run
    places = demo_places(run)
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    biggest = (
        scene.group_by("cluster_id").len().filter(pl.col("cluster_id") != NOISE).sort("len")[-1, "cluster_id"]
    )
    gone = run.read_table("scene_exemplars").filter(pl.col("cluster_id") == biggest)["frame_id"][0]
    frames = run.read_table("frames")
    run.write_table("frames", frames.filter(pl.col("frame_id") != gone))
    run_stage(run, "scenes", cfg, progress=False)
    assert gone not in run.read_table("embeddings")["frame_id"].to_list()
    assert gone in run.read_table("scene_exemplars")["frame_id"].to_list()

    found = shots_like(run.run_dir, gone, k=3)
    assert found.height == 3 and gone not in found["frame_id"].to_list()
    assert places[found["frame_id"][0]] == places[gone]


def test_a_correction_of_a_frame_no_longer_kept_is_said(scenes_run):
    """A frame moved on the board, then left out by a rerun of stage 01 or 02: the move places
    nothing, and stage 04's line says so rather than counting it as a move on the board."""
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes import summary
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, cfg = scenes_run
    scene = run.read_table("clusters").filter(pl.col("level") == "scene")
    moved, kept = scene["frame_id"][0], scene["frame_id"][1]
    move_to_cluster(run.run_dir, moved, "new")
    move_to_cluster(run.run_dir, kept, "noise")
    frames = run.read_table("frames")
    run.write_table("frames", frames.filter(pl.col("frame_id") != moved))
    run_stage(run, "scenes", cfg, progress=False)
    manifest = run.read_manifest("scenes")
    assert manifest["counts"]["corrections"] == 2
    assert manifest["counts"]["corrections_on_frames_gone"] == 1
    assert "2 correction(s) by hand so far (1 of them on frames no longer kept)" in summary(manifest)
    clusters = run.read_table("clusters")
    assert moved not in clusters["frame_id"].to_list()
    assert (
        clusters.filter((pl.col("frame_id") == kept) & (pl.col("level") == "scene"))["cluster_id"][0]
        == "noise"
    )


def test_clip_embedder_clusters_and_searches_by_text(scenes_run, tmp_path):
    from tiny_models import write_tiny_clip

    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import text_search

    run, _ = scenes_run
    model = write_tiny_clip(tmp_path / "tiny-clip")
    cfg = load_config(root=tmp_path, overrides={"scenes.embedder": "clip", "scenes.clip_model": str(model)})
    run_stage(run, "scenes", cfg, progress=False)
    emb = run.read_table("embeddings")
    assert emb["embedder"].unique().to_list() == [f"clip:{model}"]
    vectors = np.asarray(emb["vector"].to_list())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert run.read_manifest("scenes")["facts"]["mode"] == "full"  # a new space: clustered afresh
    found = text_search(run.run_dir, "a woman at a table", cfg.scenes, k=4)
    assert found.height == 4
    assert found["similarity"].to_list() == sorted(found["similarity"].to_list(), reverse=True)
    # The ranking is the model's: the text tower's vector against the stored image vectors.
    from diffusion_bunny.stages.scenes.embeddings import make_embedder

    query = make_embedder(cfg.scenes).embed_texts(["a woman at a table"])[0]
    best = emb["frame_id"][int(np.argmax(vectors @ query))]
    assert found["frame_id"][0] == best
    # A rerun whose embeddings are all cached never loads the model (here: no longer there).
    import shutil

    shutil.rmtree(model)
    run_stage(run, "scenes", cfg, progress=False, force=True)
    assert run.read_manifest("scenes")["counts"]["embedded_now"] == 0


@pytest.mark.parametrize(
    ("rate", "edl_at"),
    [
        # An AVI from a capture card: about 15 fps, a rate no SMPTE timecode has.
        (__import__("fractions").Fraction(1000000, 66667), 24000 / 1001),
        (__import__("fractions").Fraction(25, 2), 24000 / 1001),
        (120, 60.0),
    ],
)
def test_unusual_frame_rate_writes_the_edl_at_the_nearest_timecode_rate(rate, edl_at, tmp_path):
    """A real movie at an odd rate through stages 01, 02 and 04, then the export: the EDL is
    written at the nearest SMPTE rate with a note in the file and a warning, every event at the
    right time (within one timecode frame), instead of ``SMPTE timecode does not support``."""
    import opentimelineio as otio
    from clips import write_clip

    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import export_clusters

    movie = tmp_path / "capture.avi"
    # Shots of at least 0.6 s: shorter ones are kept but give no frame (min_shot_seconds 0.5).
    n = max(12, round(float(rate) * 0.6))
    write_clip(movie, [(1, n, 0.0), (2, n, 0.0), (1, n, 0.0)], width=160, height=96, fps=rate)
    run = Run.create(tmp_path / "run", movie)
    cfg = load_config(root=tmp_path)
    for stage in ("extract", "quality", "scenes"):
        run_stage(run, stage, cfg, progress=False)
    fps = float(run.read_manifest("extract")["facts"]["fps"])
    assert abs(fps - float(rate)) < 1e-3
    with pytest.warns(UserWarning, match=r"does not support.*written at"):
        paths = export_clusters(run.run_dir)
    text = paths["edl"].read_text()
    assert "* NOTE: the movie runs at" in text
    timeline = otio.adapters.read_from_file(str(paths["edl"]), adapter_name="cmx_3600", rate=edl_at)
    shots = run.read_table("shots").rows_by_key("shot_id", unique=True, named=True)
    clips = list(timeline.find_clips())
    assert clips
    for clip in clips:
        shot = shots[int(clip.name.rsplit(" ", 1)[1])]
        start = clip.source_range.start_time.to_seconds()
        assert abs(start - shot["start_frame"] / fps) <= 1 / edl_at + 1e-6


def test_edl_is_skipped_with_a_warning_when_no_rate_fits():
    from diffusion_bunny.stages.scenes.timeline import edl_rate

    assert edl_rate(25.0) == (25.0, None)
    assert edl_rate(30000 / 1001)[1] is None
    rate, note = edl_rate(0.0)
    assert rate is None and "not a positive number" in note


def test_a_move_made_while_stage_04_computes_is_not_lost(scenes_run, monkeypatch):
    """Stage 04 writes ``clusters`` under the lock move_to_cluster takes and places
    the moves made while it computed, so a board move during a rerun survives the rerun."""
    import diffusion_bunny.stages.scenes.stage as scenes
    from diffusion_bunny.stages import run_stage

    run, cfg = scenes_run
    clusters = run.read_table("clusters").filter(pl.col("level") == "scene")
    frame = clusters["frame_id"][0]
    target = next(c for c in clusters["cluster_id"].unique().sort() if c != clusters["cluster_id"][0])
    real = scenes.embed_frames

    def embed_then_someone_moves(*args, **kwargs):
        out = real(*args, **kwargs)
        scenes.move_to_cluster(run.run_dir, frame, target)  # a person on the board, meanwhile
        return out

    monkeypatch.setattr(scenes, "embed_frames", embed_then_someone_moves)
    run_stage(run, "scenes", cfg, force=True, progress=False)
    after = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("frame_id") == frame))
    assert after["cluster_id"].to_list() == [target] and after["manual"].to_list() == [True]


@pytest.mark.parametrize(
    ("empty", "message"),
    [("frames", "stage 01 kept none"), ("quality", "stage 02 kept none")],
)
def test_no_frame_to_cluster_names_the_stage_that_kept_none(scenes_run, empty, message):
    """A movie of flashes only (every shot under extract.min_shot_seconds) reaches stage 04 with
    no frame at all: its error points at stage 01, not at notebook 02's rules."""
    from diffusion_bunny.errors import StageError
    from diffusion_bunny.stages import run_stage

    run, cfg = scenes_run
    if empty == "frames":
        run.write_table("frames", run.read_table("frames").clear())
    run.write_table("quality", run.read_table("quality").with_columns(keep=pl.lit(False)))
    with pytest.raises(StageError, match=message):
        run_stage(run, "scenes", cfg, progress=False)


@pytest.mark.parametrize(("rate", "fcm"), [(24, "NON-DROP FRAME"), (30000 / 1001, "DROP FRAME")])
def test_an_edl_of_over_999_events_keeps_its_columns_and_says_its_frame_count(rate, fcm):
    """A feature film gives over 999 (cluster, shot) events: the adapter wrote ``1000``, shifting
    every CMX3600 column; numbers start again at 001 now. The ``FCM`` line says whether the
    timecodes count drop frame (the adapter wrote none; at 29.97 an editor may drift)."""
    import opentimelineio as otio

    from diffusion_bunny.stages.scenes.timeline import edl_text

    timeline = otio.schema.Timeline(name="film")
    track = otio.schema.Track()
    timeline.tracks.append(track)
    for i in range(1001):
        clip = otio.schema.Clip(
            name=f"s001 shot {i}",
            source_range=otio.opentime.TimeRange(
                otio.opentime.RationalTime(i * 10, rate), otio.opentime.RationalTime(10, rate)
            ),
        )
        clip.metadata["cmx_3600"] = {"reel": "FILM"}
        track.append(clip)
    text = edl_text(timeline, note="a test")
    lines = text.splitlines()
    assert lines[1] == f"FCM: {fcm}"
    events = [line for line in lines if line[:3].isdigit()]
    assert len(events) == 1001 and all(line[3:5] == "  " for line in events)
    assert (
        events[998].startswith("999 ") and events[999].startswith("001 ") and events[1000].startswith("002 ")
    )
    back = otio.adapters.read_from_string(text, "cmx_3600", rate=rate)
    assert len(list(back.find_clips())) == 1001


def test_an_edl_counts_from_the_movies_own_start_timecode(tmp_path):
    """A camera's file or an editor's export starts at 01:00:00:00: its EDL counted from zero,
    an hour before every shot, so an editor's relink found nothing."""
    import av
    import opentimelineio as otio

    from diffusion_bunny.stages.scenes.timeline import (
        build_timeline,
        edl_text,
        start_timecode,
        timecode_frames,
    )

    movie = tmp_path / "cam.mov"
    with av.open(str(movie), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.metadata["timecode"] = "01:00:00:00"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert start_timecode(movie) == "01:00:00:00"
    assert start_timecode(tmp_path / "missing.mov") is None
    start = timecode_frames(start_timecode(movie), 25)
    assert (
        start == 25 * 3600 and timecode_frames("not a timecode", 25) == 0 and timecode_frames(None, 25) == 0
    )
    rows = pl.DataFrame(
        {"cluster_id": ["s001", "s001"], "name": ["hall", "hall"], "shot_id": [0, 1], "frame_index": [1, 3]}
    )
    shots = pl.DataFrame({"shot_id": [0, 1], "start_frame": [0, 2], "end_frame": [2, 4]})
    rows = pl.DataFrame(
        {"cluster_id": ["s001"] * 3, "name": ["hall"] * 3, "shot_id": [0, 1, 2], "frame_index": [1, 3, 5]}
    )
    shots = pl.DataFrame({"shot_id": [0, 1, 2], "start_frame": [0, 2, 4], "end_frame": [2, 4, 6]})
    timeline = build_timeline(rows, shots, 25.0, movie, rate=25.0, offset=start)
    back = otio.adapters.read_from_string(edl_text(timeline), "cmx_3600", rate=25)
    starts = [c.source_range.start_time.to_timecode() for c in back.find_clips()]
    assert starts == ["01:00:00:00", "01:00:00:02", "01:00:00:04"]  # each shot's own, not summed


def test_an_edl_places_a_variable_rate_films_shots_by_their_time(tmp_path):
    """Frames are counted at the film's mean rate: on variable-frame-rate footage (20 frames at
    10 fps, then 60 at 30) the second shot, from frame 20 at 2 s, was placed at frame 20 of the
    mean rate's timecode (1.0 s); placed by its time it starts at 00:00:02:00."""
    import opentimelineio as otio

    from diffusion_bunny.stages.scenes.timeline import build_timeline, edl_text

    rows = pl.DataFrame(
        {"cluster_id": ["s001"] * 2, "name": ["hall"] * 2, "shot_id": [0, 1], "frame_index": [5, 40]}
    )
    shots = pl.DataFrame(
        {
            "shot_id": [0, 1],
            "start_frame": [0, 20],
            "end_frame": [20, 80],
            "start_s": [0.0, 2.0],
            "end_s": [2.0, 4.0],
        }
    )
    timeline = build_timeline(rows, shots, 20.0, tmp_path / "vfr.mkv", rate=25.0)
    back = otio.adapters.read_from_string(edl_text(timeline), "cmx_3600", rate=25)
    ranges = [
        (c.source_range.start_time.to_timecode(), c.source_range.end_time_exclusive().to_timecode())
        for c in back.find_clips()
    ]
    assert ranges == [("00:00:00:00", "00:00:02:00"), ("00:00:02:00", "00:00:04:00")]


def _hand_feedback(frame: str, source: str, target: str | None) -> pl.DataFrame:
    """A feedback table written by hand with DESIGN.md's columns: ``ts`` as text, ``label`` Int32,
    no ``level``."""
    return pl.DataFrame(
        {
            "event_id": ["e1"],
            "ts": ["2025-01-01T00:00:00Z"],
            "anchor_id": [frame],
            "from_cluster": [source],
            "to_cluster": pl.Series([target], dtype=pl.String),
            "label": pl.Series([1], dtype=pl.Int32),
        }
    )


def test_corrections_dated_in_the_future_are_said(tmp_path):
    """A row typed by hand in local time east of UTC (read as UTC) is dated in the future, and the
    latest move of a frame wins by its time: it undid the board's moves made after it, unsaid."""
    from datetime import UTC, datetime

    from diffusion_bunny.stages.scenes.stage import checked_feedback, future_moves

    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    typed = _hand_feedback("m_0000081", "s001", "s005").with_columns(ts=pl.lit("2026-12-01T13:00:00"))
    feedback = checked_feedback(typed, tmp_path / "feedback.parquet")
    assert future_moves(feedback, now) == [
        "1 correction(s) in feedback.parquet are dated in the future (first: frame m_0000081 at "
        "2026-12-01 13:00 UTC), so they win over every move made since; write their ts in UTC (or "
        "with its zone)"
    ]
    assert future_moves(feedback, datetime(2026, 12, 1, 12, 59, 30, tzinfo=UTC)) == []  # a minute's grace
    assert future_moves(checked_feedback(_hand_feedback("m", "s001", "s005"), tmp_path / "f"), now) == []


def test_a_feedback_table_made_by_hand_is_read_or_refused_in_one_line(scenes_run):
    """A feedback table with DESIGN.md's columns (no level), ``ts`` as text or ``label`` as Int32 is
    read (every move a scene move); an unknown level, a move with no target or a missing column is
    one BadInputError naming it. Each crashed the stage, and every board move, as a bug."""
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import move_to_cluster
    from diffusion_bunny.stages.scenes.tables import FEEDBACK_SCHEMA

    run, cfg = scenes_run
    scene = scene_map(run.read_table("clusters"))
    ids = sorted(set(scene.values()) - {NOISE})
    frame = next(f for f, c in scene.items() if c == ids[0])
    other = next(f for f, c in scene.items() if c == ids[0] and f != frame)
    run.write_table("feedback", _hand_feedback(frame, ids[0], ids[1]))
    run_stage(run, "scenes", cfg, progress=False)
    placed = run.read_table("clusters").filter((pl.col("frame_id") == frame) & (pl.col("level") == "scene"))
    assert placed["cluster_id"].to_list() == [ids[1]] and placed["manual"].to_list() == [True]
    # A board move appends to it, in the board's own types.
    move_to_cluster(run.run_dir, other, ids[1])
    feedback = run.read_table("feedback")
    assert feedback.height == 2 and dict(feedback.schema) == FEEDBACK_SCHEMA
    assert feedback["level"].to_list() == ["scene", "scene"]

    bad = {
        "level 'Scene' is neither scene nor character": _hand_feedback(frame, ids[0], ids[1]).with_columns(
            level=pl.lit("Scene")
        ),
        "1 row.* have no to_cluster": _hand_feedback(frame, ids[0], None),
        "has no column anchor_id": _hand_feedback(frame, ids[0], ids[1]).drop("anchor_id"),
        r"column ts \(String\) does not read as Datetime": _hand_feedback(frame, ids[0], ids[1]).with_columns(
            ts=pl.lit("yesterday")
        ),
        # "new" is the board's word for a folder not made yet; "kitchen" was shown as "scene 00".
        r"to_cluster 'new' is no cluster; a move's target is noise, a scene such as s003": _hand_feedback(
            frame, ids[0], "new"
        ),
        r"to_cluster 'kitchen' is no cluster": _hand_feedback(frame, ids[0], "kitchen"),
        # A scene move into a sub-cluster was stored as the scene "s002/biden" (its character row
        # "s002/biden/nobody"); a character move to a bare scene as the sub-cluster "s002".
        rf"a scene move's to_cluster '{ids[1]}/ann' is not a scene such as s003": _hand_feedback(
            frame, ids[0], f"{ids[1]}/ann"
        ),
        rf"a character move's to_cluster '{ids[1]}' is not a sub-cluster": _hand_feedback(
            frame, ids[0], ids[1]
        ).with_columns(level=pl.lit("character")),
    }
    for message, table in bad.items():
        run.write_table("feedback", table)
        with pytest.raises(BadInputError, match=message):
            run_stage(run, "scenes", cfg, progress=False)
        with pytest.raises(BadInputError, match=message):
            move_to_cluster(run.run_dir, other, ids[0])


def test_an_export_of_clusters_older_than_the_shots_is_refused_before_writing(scenes_run):
    """Stage 01 run again (the film one shot now, or a cut moved), stage 04 not yet: the export
    says the clusters are out of date and leaves the files it wrote before as they were. It
    rewrote the CSV with empty times, then failed on a gone shot (KeyError), or wrote an EDL of
    other shots without a word."""
    from diffusion_bunny.stages.scenes.stage import export_clusters

    run, _ = scenes_run
    paths = export_clusters(run.run_dir)
    before = {k: p.read_bytes() for k, p in paths.items()}
    shots, frames = run.read_table("shots"), run.read_table("frames")
    one = shots.head(1).with_columns(end_frame=pl.lit(int(shots["end_frame"].max())))
    run.write_table("shots", one)
    run.write_table("frames", frames.with_columns(shot_id=pl.lit(0, pl.Int64)))
    with pytest.raises(BadInputError, match=r"clusters are out of date: .*rerun stage scenes"):
        export_clusters(run.run_dir)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    # The shot ids still there, a cut moved: a frame of shot 1 now in shot 2.
    clustered = frames.join(run.read_table("clusters").select("frame_id").unique(), on="frame_id", how="semi")
    moved = clustered.filter(pl.col("shot_id") == 1).sort("frame_index")["frame_id"][-1]
    run.write_table("shots", shots)
    run.write_table(
        "frames",
        frames.with_columns(shot_id=pl.when(pl.col("frame_id") == moved).then(2).otherwise("shot_id")),
    )
    with pytest.raises(BadInputError, match="1 of their frames are gone or in another shot"):
        export_clusters(run.run_dir)
    run.write_table("frames", frames)
    assert export_clusters(run.run_dir) == paths


def _keep(run, frame: str, keep: bool, quality: pl.DataFrame) -> None:
    """Stage 02 keeping, or dropping, one frame (its other verdicts as in ``quality``)."""
    run.write_table(
        "quality",
        quality.with_columns(keep=pl.when(pl.col("frame_id") == frame).then(keep).otherwise(pl.col("keep"))),
    )


def test_a_folder_made_by_hand_keeps_its_id_while_its_frame_is_gone(scenes_run):
    """A folder made by hand has no exemplar: with its frame dropped by stage 02, a fresh
    clustering (another threshold) named an unrelated cluster with its id, and the frame, kept
    again, was put in with that cluster's frames. Every id a correction used is skipped now."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, cfg = scenes_run
    quality = run.read_table("quality")
    frame = sorted(scene_map(run.read_table("clusters")))[0]
    made = move_to_cluster(run.run_dir, frame, "new")["to_cluster"]
    _keep(run, frame, False, quality)
    run_stage(run, "scenes", cfg, progress=False)
    strict = load_config(None, {"scenes.assign_threshold": 0.95}, root=run.run_dir.parent)
    run_stage(run, "scenes", strict, progress=False)
    assert run.read_manifest("scenes")["facts"]["mode"] == "full"
    now = scene_map(run.read_table("clusters"))
    # The strict threshold opens clusters numbered past the folder's id, which one of them took.
    assert any(int(c[1:]) > int(made[1:]) for c in now.values() if c != NOISE)
    assert made not in now.values()
    assert made not in run.read_table("scene_exemplars")["cluster_id"].to_list()
    _keep(run, frame, True, quality)
    run_stage(run, "scenes", strict, progress=False)
    assert [f for f, c in scene_map(run.read_table("clusters")).items() if c == made] == [frame]


def test_a_library_never_opens_a_cluster_under_an_id_made_by_hand(scenes_run, tmp_path):
    """Movie A in a library, a frame of it moved to a new folder; movie B then opened a cluster of
    another place under that id (nothing in the library held it), and B's own new folder could
    take it too. The library keeps the ids of the folders made by hand in any of its movies."""
    import json
    import shutil

    from diffusion_bunny.config import load_config
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage
    from diffusion_bunny.stages.scenes.stage import move_to_cluster

    run, _ = scenes_run
    library = tmp_path / "library"
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    run_stage(run, "scenes", cfg, progress=False, force=True)
    made = move_to_cluster(run.run_dir, sorted(scene_map(run.read_table("clusters")))[0], "new")["to_cluster"]
    shutil.copytree(run.run_dir, tmp_path / "second")
    second = Run.open(tmp_path / "second")
    (second.run_dir / "tables" / "feedback.parquet").unlink()
    (second.run_dir / "tables" / "backup" / "feedback.parquet").unlink(missing_ok=True)
    (second.run_dir / "run.json").write_text(json.dumps({**second.meta(), "movie_key": "0ther000"}))
    # A stricter threshold: B's frames, the same pictures, open clusters of their own.
    strict = load_config(
        root=tmp_path, overrides={"scenes.library_dir": str(library), "scenes.assign_threshold": 0.97}
    )
    run_stage(second, "scenes", strict, progress=False, force=True)
    lib = pl.read_parquet(library / "scene_exemplars.parquet")
    opened = lib.filter(pl.col("movie_id") == "0ther000")["cluster_id"].to_list()
    assert opened and made not in lib["cluster_id"].to_list()
    assert made not in scene_map(second.read_table("clusters")).values()
    # B's own new folder goes past A's too.
    other = move_to_cluster(second.run_dir, sorted(scene_map(second.read_table("clusters")))[1], "new")
    assert other["to_cluster"] not in {made, *lib["cluster_id"].to_list()}


def test_a_new_folder_of_a_library_run_whose_library_is_not_reachable_is_one_line(tmp_path):
    """A run folder copied from another machine names a library that is not here: making a new
    folder created it (or, where it could not be made, failed with a PermissionError traceback)."""
    import json

    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages.scenes.stage import _new_folder_id
    from diffusion_bunny.stages.scenes.tables import FEEDBACK_SCHEMA

    run = Run(tmp_path / "run")
    run.manifests_dir.mkdir(parents=True)
    gone = tmp_path / "other_machine" / "library"
    run.manifest_path("scenes").write_text(json.dumps({"facts": {"library": str(gone)}}))
    with pytest.raises(BadInputError, match="is not reachable here"):
        _new_folder_id(run, {"s001"}, pl.DataFrame(schema=FEEDBACK_SCHEMA))
    assert not gone.exists()
    gone.mkdir(parents=True)
    assert _new_folder_id(run, {"s001"}, pl.DataFrame(schema=FEEDBACK_SCHEMA)) == "s002"


def test_a_new_folder_made_while_a_library_run_is_under_way_takes_a_library_id(scenes_run, tmp_path):
    """The runner removes stage 04's manifest as the stage starts (and a failed run writes none):
    a folder made on the board then took an id picked from the movie's own clusters, one another
    movie's folder made by hand held in the library, and not recorded there. The run's record of
    its library (JOIN_FILE) tells the library then; a record that does not read is one line."""
    run, _ = scenes_run
    library = tmp_path / "library"
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    run_stage(run, "scenes", cfg, progress=False, force=True)
    (theirs,) = _hand_made_ids(library, set(), 1)  # another movie's folder made by hand
    run.manifest_path("scenes").unlink()  # a run under way, or one that failed
    frame = sorted(scene_map(run.read_table("clusters")))[0]
    made = move_to_cluster(run.run_dir, frame, "new")["to_cluster"]
    held = pl.read_parquet(library / HAND_MADE_FILE)["cluster_id"].to_list()
    assert made != theirs and made in held
    (run.run_dir / JOIN_FILE).write_text("{cut")
    with pytest.raises(BadInputError, match="scene library of this run's clusters cannot be told"):
        move_to_cluster(run.run_dir, frame, "new")


def test_a_library_made_again_in_its_folder_makes_its_movies_stale(scenes_run, tmp_path):
    """A library deleted and made again (another movie ran first into the empty folder): the
    movies of the old one stayed done (only the scenes settings counted), their ids clashing with
    the new library's. The library's id is stage 04's input: they are stale, and the next run
    joins the new one; right after a run against a library, the stage is done."""
    import shutil

    from diffusion_bunny.stages import stage_state

    run, _ = scenes_run
    library = tmp_path / "library"
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    run_stage(run, "scenes", cfg, progress=False, force=True)
    assert stage_state(run, "scenes", cfg) == ("done", "up to date")
    shutil.rmtree(library)
    library_key(library)  # made again by another movie's first run
    state, reason = stage_state(run, "scenes", cfg)
    assert state == "stale" and "library" in reason
    run_stage(run, "scenes", cfg, progress=False)
    assert run.read_manifest("scenes")["facts"]["library_key"] == library_key(library)
    assert pl.read_parquet(library / "scene_exemplars.parquet")["movie_id"].to_list()
    assert stage_state(run, "scenes", cfg)[0] == "done"


def test_a_library_that_is_a_file_or_damaged_is_one_line(tmp_path):
    """``scenes.library_dir`` naming a file, or a library table cut short, failed every movie "with
    a bug" (FileExistsError, parquet's ComputeError): one line naming the setting or the table."""
    import numpy as np

    from diffusion_bunny.stages.scenes.settings import ScenesSettings
    from diffusion_bunny.stages.scenes.stage import _assign_library

    cfg = ScenesSettings()
    vectors = np.eye(3, dtype=np.float32)
    args = ("m0vie000", ["a", "b", "c"], vectors, "descriptor-v1", cfg)
    plain = tmp_path / "libfile"
    plain.write_text("not a folder")
    with pytest.raises(StageError, match=r"libfile \(scenes.library_dir\) cannot be a folder here"):
        _assign_library(plain, *args)
    library = tmp_path / "library"
    _assign_library(library, *args)
    table = library / "scene_exemplars.parquet"
    table.write_bytes(table.read_bytes()[:100])
    with pytest.raises(StageError, match=r"scene_exemplars.parquet is damaged \(.*\); put back a copy"):
        _assign_library(library, *args)
    (library / "hand_made_clusters.parquet").write_bytes(b"PAR1 cut")
    table.unlink()
    with pytest.raises(StageError, match=r"hand_made_clusters.parquet is damaged"):
        _assign_library(library, *args)


def test_a_folder_made_by_hand_before_the_library_kept_them_is_reserved_for_every_movie(tmp_path):
    """A folder a person made in a library movie with an earlier version is in that movie's
    corrections only: the next movie's new cluster took its id, and one id named two places. A run
    of that movie against the library records it, and no other movie opens a cluster under it."""
    import numpy as np

    from diffusion_bunny.stages.scenes.settings import ScenesSettings
    from diffusion_bunny.stages.scenes.stage import _assign_library

    cfg, library = ScenesSettings(), tmp_path / "library"
    rng = np.random.default_rng(0)

    def place(axis: int) -> np.ndarray:  # six frames of one place
        v = np.tile(np.eye(8, dtype=np.float32)[axis], (6, 1)) + rng.normal(0, 0.01, (6, 8)).astype(
            np.float32
        )
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    first, fids = np.vstack([place(0), place(1)]), [f"a{i}" for i in range(12)]
    _assign_library(library, "m0vie000", fids, first, "descriptor-v1", cfg)
    opened = set(pl.read_parquet(library / "scene_exemplars.parquet")["cluster_id"])
    assert opened and not (library / HAND_MADE_FILE).exists()
    mine = f"s{max(int(c[1:]) for c in opened) + 1:03d}"  # the folder made by hand then
    _assign_library(library, "m0vie000", fids, first, "descriptor-v1", cfg, {mine, min(opened)})
    assert pl.read_parquet(library / HAND_MADE_FILE)["cluster_id"].to_list() == [mine]
    labels, *_ = _assign_library(
        library, "0ther000", [f"b{i}" for i in range(6)], place(2), "descriptor-v1", cfg
    )
    assert set(labels) and not set(labels) & (opened | {mine})


def test_a_library_that_lost_its_id_is_one_line_not_a_new_library(tmp_path):
    """A damaged ``library.json`` gave a library that holds clusters a new id, so every movie
    with corrections joined it again (its folders made by hand renamed); one that is a folder was
    "bug: IsADirectoryError". A missing one is put back from the id a run knows for it, and made
    anew only where no run knows one (a library used before it had an id)."""
    import numpy as np

    from diffusion_bunny.stages.scenes.settings import ScenesSettings
    from diffusion_bunny.stages.scenes.stage import LIBRARY_FILE, _assign_library

    library = tmp_path / "library"
    key = library_key(library)  # an empty library: made
    assert library_key(library) == key
    vectors = np.eye(3, dtype=np.float32)
    _assign_library(library, "m0vie000", ["a", "b", "c"], vectors, "descriptor-v1", ScenesSettings())
    path = library / LIBRARY_FILE
    for what, spoil in [("damaged", lambda: path.write_text("{cut")), ("not a file", path.mkdir)]:
        path.unlink(missing_ok=True)
        spoil()
        with pytest.raises(StageError, match=rf"library.json is {what}; put back a copy.*scene_library_join"):
            library_key(library)
    path.rmdir()
    assert library_key(library, known=key) == key  # missing: put back from a run's record
    path.unlink()
    other = library_key(library)  # missing, and no run knows it: a library older than its id
    assert other != key and library_key(library) == other
    # Nothing of it there (a share not mounted, moved away) for a run that knows it: one line, and
    # no library made again under its id, which a new movie then filled from s001.
    library.rename(tmp_path / "unmounted")
    with pytest.raises(
        StageError, match=r"scene library .* is not there, though this movie was placed in it"
    ):
        library_key(library, known=key)
    assert not library.exists()


def test_a_library_table_put_back_from_an_older_copy_gives_no_id_twice(tmp_path):
    """The damaged table's line says to put back a copy: an older one numbered the next movie's
    places with the ids other movies had opened since (their scene tokens collided). A table
    rewritten by hand without a column, or with vectors of another type, failed as a bug."""
    import shutil

    import numpy as np

    from diffusion_bunny.stages.scenes.settings import ScenesSettings
    from diffusion_bunny.stages.scenes.stage import _assign_library

    library = tmp_path / "library"
    library_key(library)
    table = library / "scene_exemplars.parquet"
    rng = np.random.default_rng(1)

    def place(movie: str) -> set[str]:
        # Two places of two frames each, a place of its own per movie (random directions).
        base = rng.normal(size=(2, 64))
        vectors = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(4, 64))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        fids = [f"{movie}_{i}" for i in range(4)]
        labels, *_ = _assign_library(
            library, movie, fids, vectors, "descriptor-v1", ScenesSettings(), held=table.is_file()
        )
        return set(labels) - {NOISE}

    first = place("m0vie00a")
    shutil.copy(table, tmp_path / "older.parquet")
    second = place("m0vie00b")
    shutil.copy(tmp_path / "older.parquet", table)  # the older copy put back
    third = place("m0vie00e")
    assert len(first) == len(second) == len(third) == 2
    assert not third & second and not third & first, (first, second, third)
    # Rewritten by hand: one line naming the table, not a polars error.
    lib = pl.read_parquet(table)
    for spoilt in (lib.drop("space"), lib.with_columns(pl.lit(None, pl.List(pl.Float32)).alias("vector"))):
        spoilt.write_parquet(table)
        with pytest.raises(StageError, match=r"scene library's table .*scene_exemplars\.parquet is damaged"):
            place("m0vie00f")
    lib.with_columns(pl.col("vector").cast(pl.List(pl.Float64))).write_parquet(table)
    assert len(place("m0vie00f")) == 2  # Float64 vectors are read as the Float32 they were


def test_a_library_that_lost_its_exemplar_table_is_one_line_not_an_empty_library(scenes_run, tmp_path):
    """The library's scene_exemplars.parquet deleted: the next run started an empty library
    without a word, and the frames a person moved ended up alone. A run whose last clustering
    was made in that library (or a library with folders made by hand) stops in one line."""
    run, _ = scenes_run
    library = tmp_path / "library"
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    run_stage(run, "scenes", cfg, progress=False, force=True)
    table = library / "scene_exemplars.parquet"
    table.unlink()
    with pytest.raises(StageError, match=r"scene_exemplars.parquet is missing, .*; put back a copy"):
        run_stage(run, "scenes", cfg, progress=False, force=True)
    run.manifest_path("scenes").unlink(missing_ok=True)
    (run.run_dir / JOIN_FILE).unlink()
    _hand_made_ids(library, set(), 1)  # a folder made by hand in another movie of the library
    with pytest.raises(StageError, match=r"scene_exemplars.parquet is missing"):
        run_stage(run, "scenes", cfg, progress=False, force=True)
    assert not table.exists()
    # A movie never placed in the library, no folder made by hand: library.json's count tells.
    (library / HAND_MADE_FILE).unlink()
    assert json.loads((library / LIBRARY_FILE).read_text())["exemplars"] > 0
    with pytest.raises(StageError, match=r"scene_exemplars.parquet is missing"):
        run_stage(run, "scenes", cfg, progress=False, force=True)
    assert not table.exists()


def test_the_cluster_sheet_keeps_a_4_3_films_shape(tmp_path):
    """The cluster sheet drew every frame into a 16:9 tile: a 4:3 film's circle became an
    ellipse. Its tiles take the film's shape."""
    import cv2
    import numpy as np

    from diffusion_bunny.stages.scenes.plots import cluster_sheet

    (tmp_path / "frames").mkdir()
    picture = np.full((480, 640, 3), 255, np.uint8)
    cv2.circle(picture, (320, 240), 150, (0, 0, 0), -1)
    cv2.imwrite(str(tmp_path / "frames" / "m_0000001.jpg"), picture)
    frames = pl.DataFrame({"frame_id": ["m_0000001"], "path": ["frames/m_0000001.jpg"]})
    clusters = pl.DataFrame(
        {
            "frame_id": ["m_0000001"],
            "level": ["scene"],
            "cluster_id": ["s001"],
            "name": ["s001"],
            "similarity": [1.0],
            "manual": [False],
        }
    )
    sheet = np.asarray(cluster_sheet(tmp_path, clusters, frames, side=160).convert("L"))
    dark = np.argwhere(sheet < 60)
    height, width = np.ptp(dark[:, 0]) + 1, np.ptp(dark[:, 1]) + 1
    assert abs(width / height - 1.0) < 0.1, (width, height)


def _library_of_another_movie(run, library: Path) -> dict[str, str]:
    """A scene library that already holds another movie's clusters under the ids this run's own
    clusters have, each one place over (the picture of own ``s001`` is the library's ``s002``,
    and so on): returns own id -> the library id of the same picture."""
    own = run.read_table("scene_exemplars")
    shifted = {c: f"s{int(c[1:]) + 1:03d}" for c in own["cluster_id"].to_list()}
    other = own.with_columns(
        pl.col("cluster_id").replace_strict(shifted), pl.lit("0ther000").alias("movie_id")
    )
    library_key(library)  # made with the library, before its first clusters
    other.write_parquet(library / "scene_exemplars.parquet")
    return shifted


@dataclass
class _Joined:
    run: object
    cfg: object
    library: Path
    b: str  # the own cluster two frames were moved into
    moved: str  # moved on its own from cluster a into cluster b
    crossed: str  # moved at the character level into b's sub-cluster
    alone: str  # moved into a new folder
    made: str  # that folder's id, made before the movie joined the library
    companions: list[str]  # b's frames as clustered
    left: list[str]  # a's frames that stayed
    said: list[str]  # the join run's warnings


def _join_after_moves(
    scenes_run, tmp_path, *, manifest_lost: bool = False, fails_on: str | None = None
) -> _Joined:
    """The demo clustered on its own, three frames of its largest cluster moved on the board
    (into the second largest, into its character sub-cluster, into a new folder), then
    ``scenes.library_dir`` set to a library of another movie whose ids collide with its own."""
    run, _ = scenes_run
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    sizes = scene.group_by("cluster_id").len().sort(["len", "cluster_id"], descending=[True, False])
    a, b = sizes["cluster_id"][0], sizes["cluster_id"][1]
    members = scene_map(scene)
    in_a = sorted(f for f, c in members.items() if c == a)
    assert len(in_a) >= 4, sizes
    moved, crossed, alone = in_a[:3]
    move_to_cluster(run.run_dir, moved, b)
    move_to_cluster(run.run_dir, crossed, f"{b}/unscanned", level="character")
    made = move_to_cluster(run.run_dir, alone, "new")["to_cluster"]
    library = tmp_path / "library"
    shifted = _library_of_another_movie(run, library)
    assert made in shifted.values()  # the folder's own id is another place's in the library
    if manifest_lost:  # the last run failed (a library of another embedder, say): no manifest
        run.manifest_path("scenes").unlink()
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    if fails_on is not None:  # the disk fills as the join's run writes this table: it stops
        _stopped_writing(run, cfg, fails_on)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run_stage(run, "scenes", cfg, progress=False)
    companions = sorted(f for f, c in members.items() if c == b)
    said = [str(w.message) for w in said]
    return _Joined(run, cfg, library, b, moved, crossed, alone, made, companions, in_a[3:], said)


def _stopped_writing(run, cfg, table: str) -> None:
    """Run stage 04 with the disk full from the moment it writes ``table``: it stops there. A
    join writes ``feedback`` on its own (``Run.write_table``) before the stage's commit writes
    its tables (``Run._write_staged``, all or none)."""
    write, staged = Run.write_table, Run._write_staged

    def refuse(self, name):
        if name == table:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.table_path(name)))

    def full(self, name, df, *args, **kwargs):
        refuse(self, name)
        return write(self, name, df, *args, **kwargs)

    def full_staged(self, stack, name, df, *args, **kwargs):
        refuse(self, name)
        return staged(self, stack, name, df, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(Run, "write_table", full)
        mp_.setattr(Run, "_write_staged", full_staged)
        with pytest.raises(Exception, match="space"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_stage(run, "scenes", cfg, progress=False)


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _most(frames: list[str], now: dict[str, str]) -> str:
    return Counter(now[f] for f in frames).most_common(1)[0][0]


def test_moves_made_before_a_movie_joins_a_library_keep_their_frames_together(scenes_run, tmp_path):
    """A movie clustered on its own, a frame moved into its own cluster s00x, then
    ``scenes.library_dir`` set: the frames were labelled with the library's ids and the old move
    re-applied with its own id, so the frame landed in the library's s00x, another place (here
    another movie's). The move now names the library cluster its companions joined."""
    j = _join_after_moves(scenes_run, tmp_path)
    clusters = j.run.read_table("clusters")
    now = scene_map(clusters)
    theirs = _most(j.companions, now)
    assert now[j.moved] == now[j.crossed] == theirs != _most(j.left, now)
    character = clusters.filter(pl.col("level") == "character").select("frame_id", "cluster_id")
    assert dict(character.iter_rows())[j.crossed] == f"{theirs}/unscanned"
    # The feedback is rewritten in the library's ids (a backup kept); the manifest says how.
    to = dict(j.run.read_table("feedback").select("anchor_id", "to_cluster").iter_rows())
    assert to[j.moved] == theirs and to[j.crossed] == f"{theirs}/unscanned"
    assert (j.run.run_dir / "tables" / "backup" / "feedback.parquet").is_file()
    assert j.run.read_manifest("scenes")["facts"]["library_join"][j.b] == theirs
    (line,) = [w for w in j.said if "made before this movie joined the scene library" in w]
    assert line.startswith("3 correction(s)") and f"{j.b} -> {theirs}" in line and str(j.library) in line


def test_a_folder_made_before_a_movie_joins_a_library_takes_an_id_no_cluster_has(scenes_run, tmp_path):
    """A folder made by hand on the movie's own clusters, its id one the library's other movie
    holds: the frame went into that movie's cluster. It gets an id past the library's, recorded
    as made by hand there; also when the last run left no manifest (it failed)."""
    j = _join_after_moves(scenes_run, tmp_path, manifest_lost=True)
    now = scene_map(j.run.read_table("clusters"))
    folder = now[j.alone]
    library_ids = set(pl.read_parquet(j.library / "scene_exemplars.parquet")["cluster_id"])
    assert folder not in library_ids and folder != j.made
    assert [f for f, c in now.items() if c == folder] == [j.alone]
    assert folder in pl.read_parquet(j.library / HAND_MADE_FILE)["cluster_id"].to_list()
    assert now[j.moved] == _most(j.companions, now)


def test_a_rerun_after_a_movie_joined_a_library_changes_nothing(scenes_run, tmp_path):
    """The join translates the corrections once: the stage is done right after it (it said "its
    inputs changed (feedback)", its own rewrite), and the next run finds the corrections in the
    library's ids and leaves the clusters, the feedback and the library as they are."""
    from diffusion_bunny.stages import stage_state

    j = _join_after_moves(scenes_run, tmp_path)
    tables = ("clusters", "feedback")
    before = {name: j.run.read_table(name) for name in tables}
    shared = {name: _bytes(j.library / name) for name in ("scene_exemplars.parquet", HAND_MADE_FILE)}
    assert stage_state(j.run, "scenes", j.cfg) == ("done", "up to date")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run_stage(j.run, "scenes", j.cfg, progress=False, force=True)
    assert not [w for w in said if "joined the scene library" in str(w.message)]
    assert "library_join" not in j.run.read_manifest("scenes")["facts"]
    for name in tables:
        assert j.run.read_table(name).equals(before[name]), name
    assert {name: _bytes(j.library / name) for name in shared} == shared
    now = scene_map(before["clusters"])
    assert now[j.moved] == _most(j.companions, now)


@pytest.mark.parametrize("fails_on", ["feedback", "clusters"])
def test_a_join_stopped_by_a_full_disk_is_taken_up_as_it_was(scenes_run, tmp_path, fails_on):
    """The run that joins a library stops as it writes (the disk full): before ``feedback`` is
    rewritten, or after it and before the clusters. The next run translated again: the ids it
    had made were made anew (a second folder id), or the library's ids read as the movie's own.
    It takes up the recorded join: the same ids, each folder made once, the record then gone."""
    j = _join_after_moves(scenes_run, tmp_path, fails_on=fails_on)
    now = scene_map(j.run.read_table("clusters"))
    assert now[j.moved] == now[j.crossed] == _most(j.companions, now)
    (folder,) = pl.read_parquet(j.library / HAND_MADE_FILE)["cluster_id"].to_list()
    assert now[j.alone] == folder and [f for f, c in now.items() if c == folder] == [j.alone]
    to = dict(j.run.read_table("feedback").select("anchor_id", "to_cluster").iter_rows())
    assert to[j.moved] == now[j.moved] and to[j.alone] == folder
    run_stage(j.run, "scenes", j.cfg, progress=False, force=True)
    record = json.loads((j.run.run_dir / JOIN_FILE).read_text())  # the library the ids are in now
    assert "before" not in record and record["library_key"] == library_key(j.library)
    assert scene_map(j.run.read_table("clusters")) == now


def _library_with_moves(scenes_run, tmp_path) -> tuple[object, Path, dict[str, str], list[str]]:
    """The demo run in a library from its first run, then a folder made by hand and a move on
    the board, learnt by a second run: (run, library, frame -> cluster, the two frames moved)."""
    run, _ = scenes_run
    library = tmp_path / "libA"
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    run_stage(run, "scenes", cfg, progress=False, force=True)
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    sizes = scene.group_by("cluster_id").len().sort(["len", "cluster_id"], descending=[True, False])
    a, b = sizes["cluster_id"][0], sizes["cluster_id"][1]
    in_a = sorted(scene.filter(pl.col("cluster_id") == a)["frame_id"].to_list())
    move_to_cluster(run.run_dir, in_a[0], "new")
    move_to_cluster(run.run_dir, in_a[1], b)
    run_stage(run, "scenes", cfg, progress=False)
    return run, library, scene_map(run.read_table("clusters")), in_a[:2]


def test_a_library_reached_under_another_path_is_the_same_library(scenes_run, tmp_path):
    """A library folder moved (a share mounted elsewhere) is the same library: its id, not its
    path, says so. The run took it for a new one, and gave the folder made by hand a new id."""
    run, library, before, moved = _library_with_moves(scenes_run, tmp_path)
    feedback = run.read_table("feedback")
    library.rename(tmp_path / "libC")
    _runs_as_before(run, tmp_path / "libC", feedback, {f: before[f] for f in moved})


def test_a_run_in_a_library_whose_manifest_was_lost_is_no_join(scenes_run, tmp_path):
    """The last run failed (no manifest): the run folder still says which library its
    corrections' ids are in, so the next run does not take itself for one that joins."""
    run, library, before, moved = _library_with_moves(scenes_run, tmp_path)
    feedback = run.read_table("feedback")
    run.manifest_path("scenes").unlink()
    run.table_path("scene_exemplars").unlink()  # nor can its exemplars tell
    _runs_as_before(run, library, feedback, {f: before[f] for f in moved})


def _runs_as_before(run, library: Path, feedback: pl.DataFrame, placed: dict[str, str]) -> None:
    """Stage 04 against ``library`` says no join, and leaves the corrections and the frames
    ``placed`` by them as they were."""
    cfg = load_config(root=library.parent, overrides={"scenes.library_dir": str(library)})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run_stage(run, "scenes", cfg, progress=False)
    assert not [w for w in said if "joined the scene library" in str(w.message)]
    assert run.read_table("feedback").equals(feedback)
    assert {f: scene_map(run.read_table("clusters"))[f] for f in placed} == placed


def test_a_move_made_after_a_join_stopped_follows_the_clusters_the_board_showed(scenes_run, tmp_path):
    """The join's run stopped after it rewrote the corrections and before the clusters: the board
    still shows the movie's own clusters, and a frame moved there names one of them. The next run
    takes the join up and translates that move too (it was read as a library id, another place)."""
    run, _ = scenes_run
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    sizes = scene.group_by("cluster_id").len().sort(["len", "cluster_id"], descending=[True, False])
    a, b, c = sizes["cluster_id"][0], sizes["cluster_id"][1], sizes["cluster_id"][2]
    members = scene_map(scene)
    in_a = sorted(f for f, x in members.items() if x == a)
    in_c = sorted(f for f, x in members.items() if x == c)
    move_to_cluster(run.run_dir, in_a[0], b)
    library = tmp_path / "library"
    _library_of_another_movie(run, library)
    cfg = load_config(root=tmp_path, overrides={"scenes.library_dir": str(library)})
    _stopped_writing(run, cfg, "clusters")
    move_to_cluster(run.run_dir, in_a[1], c)  # as the board shows it: the movie's own c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_stage(run, "scenes", cfg, progress=False)
    now = scene_map(run.read_table("clusters"))
    assert now[in_a[1]] == _most(in_c, now) != now[in_a[0]]


def test_moves_made_in_one_library_follow_the_movie_into_another(scenes_run, tmp_path):
    """``scenes.library_dir`` moved from one library to another: the moves name the first
    library's clusters, whose ids are other places in the second."""
    run, _ = scenes_run
    first = load_config(root=tmp_path, overrides={"scenes.library_dir": str(tmp_path / "first")})
    run_stage(run, "scenes", first, progress=False, force=True)
    scene = run.read_table("clusters").filter((pl.col("level") == "scene") & (pl.col("cluster_id") != NOISE))
    sizes = scene.group_by("cluster_id").len().sort(["len", "cluster_id"], descending=[True, False])
    a, b = sizes["cluster_id"][0], sizes["cluster_id"][1]
    members = scene_map(scene)
    moved = sorted(f for f, c in members.items() if c == a)[0]
    move_to_cluster(run.run_dir, moved, b)
    shifted = _library_of_another_movie(run, tmp_path / "second")
    second = load_config(root=tmp_path, overrides={"scenes.library_dir": str(tmp_path / "second")})
    run_stage(run, "scenes", second, progress=False)
    now = scene_map(run.read_table("clusters"))
    assert now[moved] == _most([f for f, c in members.items() if c == b], now) == shifted[b]
    assert run.read_manifest("scenes")["facts"]["library_join"] == {a: shifted[a], b: shifted[b]}
