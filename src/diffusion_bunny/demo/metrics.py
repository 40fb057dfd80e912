"""Accuracy measures for shot boundaries, shared by tests, the demo summary and the
evaluation scripts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffusion_bunny.stages.scenes.tables import NOISE


@dataclass(frozen=True)
class BoundaryScore:
    """Precision, recall and F1 of detected shot boundaries against ground truth."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def boundary_distance(found: int, truth: int | tuple[int, int]) -> int:
    """Frames between a detected boundary and a true one; a true gradual transition is a span
    ``(first, last)`` of frames where a split is right, and a detection inside it is at 0."""
    if isinstance(truth, tuple):
        first, last = truth
        return 0 if first <= found <= last else min(abs(found - first), abs(found - last))
    return abs(found - truth)


def match_boundaries(
    found: Sequence[int], truth: Sequence[int | tuple[int, int]], tolerance: int = 0
) -> BoundaryScore:
    """TRECVID-style greedy one-to-one matching: pairs are taken closest first, each detected and
    each true boundary used at most once, and a pair counts if within ``tolerance`` frames.
    True boundaries are frames (hard cuts) or ``(first, last)`` spans (gradual transitions, see
    :func:`boundary_distance`)."""
    pairs = sorted(
        (dist, i, j)
        for i, f in enumerate(found)
        for j, t in enumerate(truth)
        if (dist := boundary_distance(f, t)) <= tolerance
    )
    used_f: set[int] = set()
    used_t: set[int] = set()
    for _, i, j in pairs:
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    tp = len(used_f)
    return BoundaryScore(tp=tp, fp=len(found) - tp, fn=len(truth) - tp)


def _ari_labels(labels: Sequence[str]) -> list[str]:
    # Every noise frame is its own singleton: the noise bucket is not a group of alike frames.
    return [f"{NOISE}:{i}" if label == NOISE else label for i, label in enumerate(labels)]


def adjusted_rand(truth: Sequence[str], labels: Sequence[str]) -> float:
    from sklearn.metrics import adjusted_rand_score  # lazy: sklearn takes 0.88 s to import

    if len(truth) < 2:
        return float("nan")
    return float(adjusted_rand_score(list(truth), _ari_labels(labels)))
