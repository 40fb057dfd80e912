"""Which frames of a shot are worth keeping, pure: bounded per-shot candidates while the shot is
open, then the static/dynamic rule applied over the tables (so notebook 01's slider re-classifies
shots without decoding the movie again)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import polars as pl

# Buckets kept for a shot's middle frame: the middle is only known once the shot ends, so the
# shot is covered by at most this many buckets (each holding its sharpest frame) that merge
# pairwise as the shot grows. 32 full frames bound the memory (about 45 MB at 720p) whatever
# the shot length, and place the middle within 1/64 of the shot's length.
MIDDLE_BUCKETS = 32


@dataclass
class FrameCandidate:
    index: int
    time_s: float
    sharp: float
    frame: Any  # av.VideoFrame, held only while it may still be chosen


@dataclass
class OpenShot:
    shot_id: int
    start: int
    start_s: float
    window: int
    last: int = -1
    last_s: float = 0.0
    motion_sum: float = 0.0
    motion_n: int = 0
    start_best: FrameCandidate | None = None
    end_window: deque[FrameCandidate] = field(default_factory=deque)
    buckets: list[FrameCandidate] = field(default_factory=list)
    bucket_size: int = 1

    def add(self, cand: FrameCandidate, diff: float | None) -> None:
        self.last, self.last_s = cand.index, cand.time_s
        if diff is not None and cand.index != self.start:
            self.motion_sum += diff
            self.motion_n += 1
        if cand.index < self.start + self.window and (
            self.start_best is None or cand.sharp > self.start_best.sharp
        ):
            self.start_best = cand
        # Sliding maximum of sharpness over the last `window` frames (monotonic deque).
        end = self.end_window
        while end and end[-1].sharp <= cand.sharp:
            end.pop()
        end.append(cand)
        while end[0].index <= cand.index - self.window:
            end.popleft()
        # Middle buckets: one best frame per `bucket_size` frames of the shot.
        slot = (cand.index - self.start) // self.bucket_size
        if slot < len(self.buckets):
            if cand.sharp > self.buckets[-1].sharp:
                self.buckets[-1] = cand
        else:
            self.buckets.append(cand)
            if len(self.buckets) > MIDDLE_BUCKETS:
                merged = [
                    max(self.buckets[i : i + 2], key=lambda c: c.sharp)
                    for i in range(0, len(self.buckets), 2)
                ]
                self.buckets = merged
                self.bucket_size *= 2

    @property
    def motion(self) -> float:
        return self.motion_sum / self.motion_n if self.motion_n else 0.0

    def candidates(self) -> dict[str, FrameCandidate]:
        """The start, middle and end candidates of the closed shot."""
        mid = (self.start + self.last) / 2.0
        half = max(self.window / 2.0, self.bucket_size / 2.0)
        near = [c for c in self.buckets if abs(c.index - mid) <= half]
        if near:
            # Sharpest first; among equals (a truly still shot) the one closest to the middle.
            middle = max(near, key=lambda c: (c.sharp, -abs(c.index - mid)))
        else:
            middle = min(self.buckets, key=lambda c: abs(c.index - mid))
        out = {"middle": middle}
        if self.start_best is not None:
            out["start"] = self.start_best
        out["end"] = self.end_window[0]
        return out

    def extras(self, gap: int, taken: list[int]) -> list[FrameCandidate]:
        """For a shot longer than ``gap`` frames, cut into equal stretches of at most ``gap``
        frames: the sharpest frame held (the middle buckets) of each stretch that holds none of
        the frames ``taken`` already. A long static take keeps one frame otherwise, and what
        happens in it (a character walking in, a second one joining) would be lost."""
        length = self.last + 1 - self.start
        if gap <= 0 or length <= gap or not self.buckets:
            return []
        count = math.ceil(length / gap)
        out = []
        for j in range(count):
            low, high = self.start + j * length / count, self.start + (j + 1) * length / count
            if any(low <= t < high for t in taken):
                continue
            inside = [c for c in self.buckets if low <= c.index < high]
            if inside:
                out.append(max(inside, key=lambda c: c.sharp))
        return out


def classify_shots(shots: pl.DataFrame, motion_threshold: float) -> pl.DataFrame:
    """Set ``kind``: shots whose motion is under the threshold are static, the others dynamic."""
    kind = pl.when(pl.col("motion") < motion_threshold).then(pl.lit("static"))
    return shots.with_columns(kind.otherwise(pl.lit("dynamic")).alias("kind"))


def select_keyframes(candidates: pl.DataFrame, shots: pl.DataFrame, motion_threshold: float) -> pl.DataFrame:
    """The candidates to keep: a static shot keeps its middle frame, a dynamic one start, middle
    and end (one frame kept once if windows overlap); a long shot also its extra frames
    (:meth:`OpenShot.extras`: ``extra``, or ``extra_static`` / ``extra_dynamic`` where the shot's
    kind decides them). Interval and codec-keyframe candidates are all kept. Pure over the
    tables, so a slider can call it on every move."""
    kinds = classify_shots(shots, motion_threshold).select("shot_id", "kind")
    joined = candidates.join(kinds, on="shot_id", how="left")
    keep = (
        pl.col("role").is_in(["interval", "keyframe", "middle", "extra"])
        | ((pl.col("kind") == "dynamic") & pl.col("role").is_in(["start", "end", "extra_dynamic"]))
        | ((pl.col("kind") == "static") & (pl.col("role") == "extra_static"))
    )
    return (
        joined.filter(keep)
        .unique(subset=["frame_index"], keep="first", maintain_order=True)
        .sort("frame_index")
    )
