"""The character truth set and the pure scoring a character finder is measured with.

The set lives in ``test/stages/characters/data/character_truth/`` (``truth.json``, one short film
per source under ``films/``, the reference pictures under ``refs/<source>/<character>/``), built by
``python_script/make_character_truth.py`` and described in docs/character-truth.md. Each source is
marked ``fit`` (may be looked at and tuned on) or ``held_out`` (only reported on); the split was
written before any method was run on it, so a held-out number is an honest one.

Scoring, written here once so every evaluation counts the same way:

* :func:`match_appearance`: does a detection box land on a labelled appearance? Lenient on
  purpose (body IoU, head IoU, or the detection lying inside the body), because a finder may box
  a face, a head or a whole figure, and all three are right;
* :func:`score_named`: (shot, character) recall and the precision of named appearances, per kind
  of character and overall, with the counts behind them;
* :func:`identity_accuracy`: of the named predictions that land on a character, the share named
  right (with references: does the finder tell characters apart, apart from finding them);
* :func:`pairwise_f1`: how well a clustering without references groups appearances by identity,
  and :func:`score_clusters`, which labels the truth's appearances by a run's clusters for it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusion_bunny.paths import workspace_root

TRUTH_DIR = Path("test") / "stages" / "characters" / "data" / "character_truth"
KINDS = ("drawn_person", "cartoon_animal", "creature_3d")
#: IoU with the body or the head box at which a detection matches an appearance.
IOU = 0.4
#: Share of a detection's area inside the body box at which it matches (a face box in a figure).
INSIDE = 0.8

Box = Sequence[float]


def truth_dir(root: Path | None = None) -> Path:
    """The truth set's folder in this checkout."""
    return (root or workspace_root()) / TRUTH_DIR


def load_character_truth(folder: Path | None = None) -> dict[str, Any]:
    """``truth.json`` with each source's film and references as absolute paths added
    (``film_path``; ``ref_paths`` per character), so a caller needs no folder arithmetic."""
    folder = Path(folder) if folder is not None else truth_dir()
    truth = json.loads((folder / "truth.json").read_text())
    for source in truth["sources"]:
        source["film_path"] = folder / source["film"]
        for char in source["characters"]:
            char["ref_paths"] = [folder / p for p in char["refs"]]
    return truth


def iou(a: Box, b: Box) -> float:
    """IoU of two (left, top, right, bottom) boxes; 0 when either is empty."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _area(a: Box) -> float:
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def match_appearance(det_box: Box, truth_body: Box, truth_head: Box | None) -> bool:
    """Whether a detection matches a labelled appearance: IoU with the body >= 0.4, or IoU with
    the head >= 0.4, or at least 80% of the detection's area inside the body box. A detection of
    no area matches nothing."""
    area = _area(det_box)
    if area <= 0:
        return False
    if iou(det_box, truth_body) >= IOU:
        return True
    if truth_head is not None and iou(det_box, truth_head) >= IOU:
        return True
    x0, y0 = max(det_box[0], truth_body[0]), max(det_box[1], truth_body[1])
    x1, y1 = min(det_box[2], truth_body[2]), min(det_box[3], truth_body[3])
    inside = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inside >= INSIDE * area


def _rows(predictions: Any) -> list[dict]:
    """Predictions as a list of dicts, from a list of dicts or a pandas/polars table."""
    if hasattr(predictions, "to_dicts"):  # polars
        return list(predictions.to_dicts())
    if hasattr(predictions, "to_dict"):  # pandas
        return list(predictions.to_dict("records"))
    return [dict(p) for p in predictions]


def _missing(value: Any) -> bool:
    """None, or NaN as a pandas table gives for a missing name."""
    return value is None or value != value


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_named(predictions: Any, truth_source: Mapping[str, Any]) -> dict[str, Any]:
    """Score named predictions on one source of the truth set.

    ``predictions``: rows of ``{frame, character, box}`` (``character`` a name or ``None`` for
    an unnamed detection; unnamed rows count toward nothing). Returns ``{"overall": ..., kind:
    ...}`` for each kind of character present, each with:

    * ``recall``: share of the truth's (shot, character) pairs found; a pair is found when in at
      least one frame of that shot a prediction carries that name and matches that character's
      appearance in that frame (:func:`match_appearance`). One good frame per shot is enough
      because a shot's name is what the dataset keeps;
    * ``precision``: named predictions that match an appearance of the named character in their
      frame, over all named predictions (a name given where that character is absent is wrong);
    * ``pairs``, ``pairs_found``, ``named``, ``named_correct``: the counts behind both.

    A named prediction's kind is its name's kind in the truth; a name the truth does not know
    counts as wrong in ``overall`` only.
    """
    kind_of = {c["name"]: c["kind"] for c in truth_source["characters"]}
    by_frame: dict[int, dict[str, dict]] = {}
    for a in truth_source["appearances"]:
        by_frame.setdefault(int(a["frame"]), {})[a["character"]] = a
    shot_of: dict[int, int] = {}
    pairs: set[tuple[int, str]] = set()
    for shot in truth_source["shots"]:
        for f in range(shot["start_frame"], shot["end_frame"]):
            shot_of[f] = shot["shot_id"]
        for name in shot["characters"]:
            pairs.add((shot["shot_id"], name))
    found: set[tuple[int, str]] = set()
    named: dict[str, int] = {}
    correct: dict[str, int] = {}
    for p in _rows(predictions):
        name = p.get("character")
        if _missing(name):
            continue
        frame = int(p["frame"])
        kind = kind_of.get(name, "unknown")
        named[kind] = named.get(kind, 0) + 1
        truth = by_frame.get(frame, {}).get(name)
        if truth is not None and match_appearance(p["box"], truth["body"], truth["head"]):
            correct[kind] = correct.get(kind, 0) + 1
            if frame in shot_of:
                found.add((shot_of[frame], name))
    out: dict[str, Any] = {}
    kinds = sorted({kind_of[n] for _, n in pairs} | (set(named) - {"unknown"}), key=_kind_order)
    for kind in ["overall", *kinds]:
        ks = [pr for pr in pairs if kind == "overall" or kind_of[pr[1]] == kind]
        kf = [pr for pr in found if kind == "overall" or kind_of[pr[1]] == kind]
        n_named = sum(named.values()) if kind == "overall" else named.get(kind, 0)
        n_ok = sum(correct.values()) if kind == "overall" else correct.get(kind, 0)
        out[kind] = {
            "recall": _ratio(len(kf), len(ks)),
            "precision": _ratio(n_ok, n_named),
            "pairs": len(ks),
            "pairs_found": len(kf),
            "named": n_named,
            "named_correct": n_ok,
        }
    return out


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def pairwise_f1(
    cluster_labels: Iterable[Any], truth_labels: Iterable[Any], noise: Any = -1
) -> dict[str, float]:
    """Pairwise precision, recall and F1 of a clustering of appearances against their identities.

    Every pair of appearances is a decision: put together or kept apart. Precision is the share
    of pairs put in one cluster that share an identity, recall the share of same-identity pairs
    put in one cluster. An appearance labelled ``noise`` (DBSCAN's -1) is a cluster of its own,
    so leaving everything unclustered scores recall 0, not a free pass. With no pair of either
    kind the matching score is 1 (nothing to get wrong)."""
    clusters = list(cluster_labels)
    truth = list(truth_labels)
    if len(clusters) != len(truth):
        raise ValueError(f"{len(clusters)} cluster labels for {len(truth)} appearances")
    ids = [("noise", i) if c == noise else ("c", c) for i, c in enumerate(clusters)]
    # Pairs counted from group sizes (n choose 2), not pair by pair: a film has thousands of
    # appearances and millions of pairs.
    together = sum(n * (n - 1) // 2 for n in Counter(ids).values())
    same = sum(n * (n - 1) // 2 for n in Counter(truth).values())
    both = sum(n * (n - 1) // 2 for n in Counter(zip(ids, truth, strict=True)).values())
    return pairwise_from_counts(both, together, same)


def pairwise_from_counts(both: int, together: int, same: int) -> dict[str, float]:
    """:func:`pairwise_f1`'s figures from its pair counts: ``both`` pairs put together that share
    an identity, ``together`` pairs put together, ``same`` pairs that share an identity (counts
    of several sources add up, so a pooled score is this on their sums)."""
    precision = both / together if together else 1.0
    recall = both / same if same else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "pairs_together": together,
        "pairs_same": same,
        "pairs_both": both,
    }


def _by_frame(truth_source: Mapping[str, Any]) -> dict[int, list[dict]]:
    by_frame: dict[int, list[dict]] = {}
    for a in truth_source["appearances"]:
        by_frame.setdefault(int(a["frame"]), []).append(a)
    return by_frame


def identity_accuracy(predictions: Any, truth_source: Mapping[str, Any]) -> dict[str, Any]:
    """Of the named predictions that land on some character (:func:`match_appearance`), the
    share named as one they land on; per kind (the kind of the character landed on) and overall.

    Precision (:func:`score_named`) mixes two failures: naming a piece of background, and naming
    the wrong character. This is the second alone: whether characters are told apart once found.
    Each kind holds ``accuracy`` (None when nothing landed), ``landed`` and ``correct``."""
    kind_of = {c["name"]: c["kind"] for c in truth_source["characters"]}
    by_frame = _by_frame(truth_source)
    landed: Counter = Counter()
    correct: Counter = Counter()
    for p in _rows(predictions):
        name = p.get("character")
        if _missing(name):
            continue
        hits = [
            a for a in by_frame.get(int(p["frame"]), []) if match_appearance(p["box"], a["body"], a["head"])
        ]
        if not hits:
            continue
        right = [a for a in hits if a["character"] == name]
        kind = kind_of[(right or hits)[0]["character"]]
        landed[kind] += 1
        correct[kind] += bool(right)
    out: dict[str, Any] = {}
    for kind in ["overall", *sorted(landed, key=_kind_order)]:
        n = sum(landed.values()) if kind == "overall" else landed[kind]
        ok = sum(correct.values()) if kind == "overall" else correct[kind]
        out[kind] = {"accuracy": _ratio(ok, n), "landed": n, "correct": ok}
    return out


def score_clusters(
    predictions: Any, truth_source: Mapping[str, Any], frames: Iterable[int]
) -> dict[str, Any]:
    """Pairwise F1 (:func:`pairwise_f1`) of a run without references: every appearance of the
    truth in the searched ``frames`` takes the ``cluster`` of the prediction that lands on it
    (the one of greatest IoU with its body when several do), or is noise when none does, so a
    character never found counts as left apart, not as a free pass. Per kind (the appearances of
    that kind's characters) and overall; each holds :func:`pairwise_f1`'s figures and
    ``appearances`` (how many were scored) and ``clustered`` (how many took a cluster)."""
    kind_of = {c["name"]: c["kind"] for c in truth_source["characters"]}
    by_frame = _by_frame(truth_source)
    preds: dict[int, list[dict]] = {}
    for p in _rows(predictions):
        if not _missing(p.get("cluster")):
            preds.setdefault(int(p["frame"]), []).append(p)
    labels: dict[str, tuple[list, list]] = {}
    for frame in sorted(set(frames)):
        for a in by_frame.get(frame, []):
            landing = [p for p in preds.get(frame, []) if match_appearance(p["box"], a["body"], a["head"])]
            label = max(landing, key=lambda p: iou(p["box"], a["body"]))["cluster"] if landing else -1
            for kind in ("overall", kind_of[a["character"]]):
                got, want = labels.setdefault(kind, ([], []))
                got.append(label)
                want.append(a["character"])
    out: dict[str, Any] = {}
    for kind in sorted(labels, key=lambda k: (k != "overall", _kind_order(k))):
        got, want = labels[kind]
        out[kind] = {
            **pairwise_f1(got, want),
            "appearances": len(got),
            "clustered": sum(1 for g in got if g != -1),
        }
    return out
