"""The character truth set's scoring (hand-made tables with known answers) and the committed set's
shape: the split written down, every kind held out somewhere, boxes inside the frame."""

from __future__ import annotations

import pytest

from diffusion_bunny.demo.character_truth import (
    KINDS,
    identity_accuracy,
    iou,
    load_character_truth,
    match_appearance,
    pairwise_f1,
    pairwise_from_counts,
    score_clusters,
    score_named,
)

BODY = [100, 100, 200, 300]
HEAD = [120, 100, 180, 160]


def test_iou_of_known_boxes():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0


@pytest.mark.parametrize(
    ("det", "head", "expected", "why"),
    [
        ([100, 100, 200, 300], HEAD, True, "the body itself"),
        ([95, 90, 205, 280], HEAD, True, "body IoU well above 0.4"),
        ([118, 98, 182, 162], None, True, "a head box inside the body: 100% inside"),
        ([110, 95, 190, 165], HEAD, True, "head IoU 0.64 (and partly outside the body)"),
        ([60, 60, 140, 140], HEAD, False, "a quarter inside, IoUs low"),
        ([0, 0, 90, 90], HEAD, False, "beside the character"),
        ([150, 250, 250, 350], None, False, "half inside: below 80%"),
        ([100, 100, 100, 300], HEAD, False, "no area"),
    ],
)
def test_match_appearance(det, head, expected, why):
    assert match_appearance(det, BODY, head) is expected, why


def test_match_by_head_iou_alone():
    """A box on the head that spills far outside the body matches through the head only."""
    body, head = [100, 100, 200, 300], [100, 100, 200, 160]
    det = [90, 60, 210, 170]  # 44% inside the body, IoU with the body 0.22, with the head 0.45
    assert iou(det, body) < 0.4 and iou(det, head) >= 0.4
    assert match_appearance(det, body, head)
    assert not match_appearance(det, body, None)


def _source():
    """Two shots of 10 frames: shot 0 holds ann (drawn_person) and bob (cartoon_animal), shot 1
    holds bob alone; cat (creature_3d) appears in shot 1 too."""
    apps = []
    for f in range(10):
        apps.append({"frame": f, "character": "ann", "body": [0, 0, 100, 200], "head": [20, 0, 80, 50]})
        apps.append({"frame": f, "character": "bob", "body": [300, 0, 400, 100], "head": None})
    for f in range(10, 20):
        apps.append({"frame": f, "character": "bob", "body": [500, 0, 600, 100], "head": None})
        apps.append({"frame": f, "character": "cat", "body": [0, 300, 200, 500], "head": [50, 300, 150, 380]})
    return {
        "characters": [
            {"name": "ann", "kind": "drawn_person"},
            {"name": "bob", "kind": "cartoon_animal"},
            {"name": "cat", "kind": "creature_3d"},
        ],
        "shots": [
            {"shot_id": 0, "start_frame": 0, "end_frame": 10, "characters": ["ann", "bob"]},
            {"shot_id": 1, "start_frame": 10, "end_frame": 20, "characters": ["bob", "cat"]},
        ],
        "appearances": apps,
    }


def test_score_named_counts_pairs_and_precision():
    preds = [
        {"frame": 3, "character": "ann", "box": [20, 0, 80, 50]},  # right: finds (0, ann)
        {"frame": 4, "character": "ann", "box": [20, 0, 80, 50]},  # right again, same pair
        {"frame": 5, "character": "bob", "box": [20, 0, 80, 50]},  # wrong place: bob is elsewhere
        {"frame": 12, "character": "bob", "box": [500, 0, 600, 100]},  # right: finds (1, bob)
        {"frame": 12, "character": "ann", "box": [0, 300, 200, 500]},  # ann not in frame 12
        {"frame": 13, "character": None, "box": [0, 300, 200, 500]},  # unnamed: ignored
    ]
    s = score_named(preds, _source())
    assert s["overall"] == {
        "recall": 2 / 4,
        "precision": 3 / 5,
        "pairs": 4,
        "pairs_found": 2,
        "named": 5,
        "named_correct": 3,
    }
    assert s["drawn_person"]["recall"] == 1.0 and s["drawn_person"]["precision"] == 2 / 3
    assert s["cartoon_animal"]["pairs"] == 2 and s["cartoon_animal"]["pairs_found"] == 1
    assert s["cartoon_animal"]["precision"] == 1 / 2
    assert s["creature_3d"]["recall"] == 0.0 and s["creature_3d"]["precision"] is None
    assert list(s) == ["overall", "drawn_person", "cartoon_animal", "creature_3d"]


def test_score_named_accepts_a_table_and_unknown_names():
    pd = pytest.importorskip("pandas")
    table = pd.DataFrame(
        [
            {"frame": 15, "character": "cat", "box": [40, 290, 160, 390]},  # the head: right
            {"frame": 15, "character": "dan", "box": [40, 290, 160, 390]},  # a name not in the truth
            {"frame": 16, "character": None, "box": [0, 0, 1, 1]},
        ]
    )
    s = score_named(table, _source())
    assert s["creature_3d"]["pairs_found"] == 1 and s["creature_3d"]["precision"] == 1.0
    assert s["overall"]["named"] == 2 and s["overall"]["named_correct"] == 1
    assert "unknown" not in s


def test_no_predictions_scores_zero_recall_and_no_precision():
    s = score_named([], _source())
    assert s["overall"]["recall"] == 0.0 and s["overall"]["precision"] is None


def test_pairwise_f1_on_a_small_table():
    truth = ["a", "a", "a", "b", "b"]
    # perfect
    assert pairwise_f1([1, 1, 1, 2, 2], truth)["f1"] == 1.0
    # one b put with the a's: together pairs 6+0=6, of them 3 right; same pairs 3+1=4, 3 found
    r = pairwise_f1([1, 1, 1, 1, 2], truth)
    assert r["precision"] == pytest.approx(3 / 6) and r["recall"] == pytest.approx(3 / 4)
    assert (r["pairs_both"], r["pairs_together"], r["pairs_same"]) == (3, 6, 4)
    # pooled over sources: the counts add up, and the figures come from the sums
    other = pairwise_f1(["x", "y"], ["c", "c"])
    pooled = pairwise_from_counts(3 + 0, 6 + 0, 4 + 1)
    assert other["pairs_same"] == 1 and pooled["recall"] == pytest.approx(3 / 5)
    assert pooled["precision"] == pytest.approx(3 / 6)
    assert r["f1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    # everything noise: nothing put together, nothing found
    r = pairwise_f1([-1] * 5, truth)
    assert r["recall"] == 0.0 and r["f1"] == 0.0
    # noise is singletons, never one cluster of its own: two -1 a's are not "together"
    r = pairwise_f1([-1, -1, 7, 8, 8], truth)
    assert r["pairs_together"] == 1 and r["precision"] == 1.0 and r["recall"] == pytest.approx(1 / 4)
    # all in one cluster
    r = pairwise_f1([0] * 5, truth)
    assert r["precision"] == pytest.approx(4 / 10) and r["recall"] == 1.0
    with pytest.raises(ValueError):
        pairwise_f1([1, 2], truth)


def test_the_committed_truth_set():
    """The set as committed: at least 4 sources and 300 appearances, 2+ characters per source,
    each with 1-3 references on disk, the split written down and every kind held out somewhere,
    every box inside its frame, shots tiling the film, the fit and held-out sources disjoint."""
    truth = load_character_truth()
    sources = truth["sources"]
    assert len(sources) >= 4
    assert sum(len(s["appearances"]) for s in sources) >= 300
    held = {s["kind"] for s in sources if s["split"] == "held_out"}
    assert held == set(KINDS)
    assert {s["split"] for s in sources} == {"fit", "held_out"}
    for s in sources:
        assert s["licence"] and s["origin"] and s["attribution"]
        assert s["film_path"].is_file(), s["film"]
        assert len(s["characters"]) >= 2
        names = {c["name"] for c in s["characters"]}
        for c in s["characters"]:
            assert 1 <= len(c["refs"]) <= 3 and len(c["ref_forms"]) == len(c["refs"])
            assert all(p.is_file() for p in c["ref_paths"]), c["refs"]
            assert c["kind"] in KINDS
        ends = 0
        for shot in s["shots"]:
            assert shot["start_frame"] == ends and shot["end_frame"] > ends
            ends = shot["end_frame"]
            assert set(shot["characters"]) <= names
        assert ends == s["n_frames"]
        assert any(not shot["characters"] for shot in s["shots"]), "a shot with no one"
        assert any(len(shot["characters"]) >= 2 for shot in s["shots"]), "a shot with two or more"
        for a in s["appearances"]:
            bl, t, r, b = a["body"]
            assert 0 <= bl < r <= s["width"] and 0 <= t < b <= s["height"]
            assert a["character"] in names and 0 <= a["frame"] < s["n_frames"]
            if a["head"] is not None:
                hl, ht, hr, hb = a["head"]
                assert 0 <= hl < hr <= s["width"] and 0 <= ht < hb <= s["height"]


def test_identity_accuracy_counts_only_what_lands_on_a_character():
    preds = [
        {"frame": 3, "character": "ann", "box": [20, 0, 80, 50]},  # lands on ann: right
        {"frame": 4, "character": "bob", "box": [0, 0, 100, 200]},  # lands on ann, named bob: wrong
        {"frame": 5, "character": "bob", "box": [900, 900, 950, 950]},  # lands on no one: not counted
        {"frame": 12, "character": "bob", "box": [500, 0, 600, 100]},  # lands on bob: right
        {"frame": 12, "character": "cat", "box": [500, 0, 600, 100]},  # lands on bob, named cat
        {"frame": 13, "character": None, "box": [0, 300, 200, 500]},  # unnamed: not counted
    ]
    s = identity_accuracy(preds, _source())
    assert s["overall"] == {"accuracy": 2 / 4, "landed": 4, "correct": 2}
    assert s["drawn_person"] == {"accuracy": 1 / 2, "landed": 2, "correct": 1}
    assert s["cartoon_animal"] == {"accuracy": 1 / 2, "landed": 2, "correct": 1}
    assert "creature_3d" not in s
    assert identity_accuracy([], _source())["overall"]["accuracy"] is None


def test_score_clusters_labels_the_truth_by_what_lands_on_it():
    preds = [
        # frames 0 and 1: ann in cluster x both times, bob in y then in x (a mistake)
        {"frame": 0, "cluster": "x", "box": [0, 0, 100, 200]},
        {"frame": 0, "cluster": "y", "box": [300, 0, 400, 100]},
        {"frame": 1, "cluster": "x", "box": [0, 0, 100, 200]},
        {"frame": 1, "cluster": "x", "box": [300, 0, 400, 100]},
        # frame 12: cat found (cluster z); bob missed; a box on nothing is ignored
        {"frame": 12, "cluster": "z", "box": [0, 300, 200, 500]},
        {"frame": 12, "cluster": "z", "box": [900, 900, 950, 950]},
        # frame 15 is not searched, frame 13 has an unclustered row
        {"frame": 15, "cluster": "x", "box": [0, 300, 200, 500]},
        {"frame": 13, "cluster": None, "box": [0, 300, 200, 500]},
    ]
    s = score_clusters(preds, _source(), frames=[0, 1, 12, 13])
    # overall: labels ann x, bob y, ann x, bob x, bob -1, cat z, bob -1, cat -1
    assert s["overall"]["appearances"] == 8 and s["overall"]["clustered"] == 5
    expected = pairwise_f1(
        ["x", "y", "x", "x", -1, "z", -1, -1], ["ann", "bob", "ann", "bob", "bob", "cat", "bob", "cat"]
    )
    assert s["overall"]["f1"] == pytest.approx(expected["f1"])
    assert s["drawn_person"]["f1"] == 1.0 and s["drawn_person"]["appearances"] == 2
    assert s["cartoon_animal"]["appearances"] == 4 and s["cartoon_animal"]["recall"] == 0.0
    assert s["creature_3d"]["clustered"] == 1 and s["creature_3d"]["recall"] == 0.0
    # nothing found: every appearance left apart, F1 0
    assert score_clusters([], _source(), frames=[0, 1])["overall"]["f1"] == 0.0


def test_the_eval_scripts_write_never_drops_what_the_stored_table_holds():
    """``eval_characters.py --write`` once replaced the table the docs quote with a run of mixed
    parts and no clusters; it now refuses a run with fewer sources or without the clusters."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from diffusion_bunny.demo.character_truth import truth_dir

    path = Path(__file__).resolve().parents[2] / "python_script" / "eval_characters.py"
    spec = importlib.util.spec_from_file_location("eval_characters", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    stored = json.loads((truth_dir() / "eval_results.json").read_text())
    everything = stored["sources"]
    assert module.write_refusal(None, everything[:1], 0) is None
    assert module.write_refusal(stored, everything, 0) is None
    assert "no result for" in module.write_refusal(stored, everything[1:], 0)
    bare = [{k: v for k, v in r.items() if k != "clusters"} for r in everything]
    assert "--without-references" in module.write_refusal(stored, bare, 0)
    # The stills table has no clusters to lose.
    stills = json.loads((truth_dir() / "eval_results_stills.json").read_text())
    assert module.write_refusal(stills, stills["sources"], 1) is None
