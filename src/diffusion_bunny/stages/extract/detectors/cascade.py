"""The cascade detector (stage 01's default): cheap signals propose, TransNetV2 judges the doubtful."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from diffusion_bunny.config import ExtractionConfig
from diffusion_bunny.stages.extract.detectors.base import Boundaries, InOrder
from diffusion_bunny.stages.extract.detectors.transnet import (
    CONTEXT,
    STEP,
    WINDOW,
    ModelHandle,
    TransNetModel,
    describe,
    rgb48,
)


@dataclass
class Candidate:
    """A boundary the cheap signals propose, and what became of it."""

    frame: int  # hard: first frame after the jump; gradual: the estimated middle
    kind: str  # "hard" or "gradual"
    fast_score: float  # hard: frame difference; gradual: change over the lag
    baseline: float  # the same signal around it (motion)
    flash_like: bool = False
    colour_score: float = 0.0  # hard: colour-histogram change; gradual: the same over the lag
    decision: str = "pending"  # accepted_fast | confirmed | rejected
    model_score: float | None = None
    boundary: int | None = None


class CascadeBoundaries(Boundaries):
    """Cheap proposals, TransNetV2 verdicts on windows around the doubtful ones.

    Signals, per frame, on the 48x27 RGB copy (kept in a ring buffer of :data:`RING` frames,
    about 1 MB, so windows can be cut out after the fact):

    * ``d1``: mean absolute difference to the previous frame (0-255), and ``hd``: the change of
      its 64-bin colour histogram (0-1; camera motion barely moves a histogram, a cut does);
    * ``dk`` and ``hk``: the same over :data:`LAG` frames, with the coherence ``dk / sum(d1)``
      over those frames: near 1 when the change goes one way (a dissolve, a fade, a wipe), low for
      motion, whose frame-to-frame changes do not add up.

    Proposals (high recall; the network sorts them out):

    * hard: ``d1`` or ``hd`` peaks (+-2 frames) and either ``d1 >= candidate_threshold`` and
      ``candidate_ratio`` times its level around (the larger median of the 8 frames before and
      after, so a fast pan does not propose every frame), or ``hd >= 0.25`` and 3 times its
      level around (a cut between two moving shots);
    * gradual: ``dk`` (coherent, >= ``gradual_threshold``) or ``hk`` (>= 0.3) peaks within
      +-``LAG`` frames, no single frame carries half of the change (else it is a cut or motion),
      and it stands 1.3 (``dk``) or 1.5 (``hk``) times above its level two lags before and
      after: a transition starts and ends, camera motion goes on.

    Verdicts: a hard candidate that jumps by at least ``accept_threshold`` and
    :data:`ACCEPT_RATIO` times its surroundings, with no other candidate near it, and whose next
    frames do not come back towards the frame before it (a flash or an occlusion does), is
    accepted at once. On two CPU cores the network costs about 0.7 s per 100-frame window, so
    asking it about the unmistakable cuts of a movie with a hundred shots would double stage 01's
    time; on a GPU, ``accept_threshold: null`` sends every candidate to it. Every other candidate
    goes to TransNetV2, which runs on the very windows TransNetV2 alone would run over
    ``c +- MARGIN`` (one, or two when ``c`` is near a window's edge; 100 frames each, 50 predicted
    with at least 25 frames of context on each side) and confirms it if a run of probabilities
    over the threshold lies within ``MARGIN`` frames; the boundary is then placed as TransNetV2
    alone places it. So wherever the cascade asks, it gets TransNetV2's own answer (a shorter
    window centred on the candidate moved probabilities by up to 0.1 and flipped a cut). Cost:
    100-200 network frames per doubtful candidate (nearby ones share windows), none for the
    frames in between.
    """

    name = "cascade"

    def __init__(
        self,
        model: ModelHandle | TransNetModel,
        cfg: ExtractionConfig,
        min_len: int,
    ):
        self.model = model
        self.threshold = cfg.transnetv2_threshold
        self.cand_thr = cfg.candidate_threshold
        self.cand_ratio = cfg.candidate_ratio
        self.grad_thr = cfg.gradual_threshold
        self.accept_thr = cfg.accept_threshold
        self.ring = np.zeros((RING, *FRAME), np.uint8)
        self.d1 = np.zeros(RING, np.float32)
        self.dk = np.zeros(RING, np.float32)
        self.coh = np.zeros(RING, np.float32)
        self.hd = np.zeros(RING, np.float32)
        self.hk = np.zeros(RING, np.float32)
        self.hist = np.zeros((RING, HIST_BINS), np.float32)
        self.n = 0  # frames pushed
        self.first = 0  # index of the first frame (stream indices are consecutive)
        self.candidates: list[Candidate] = []
        self.queue: list[Candidate] = []
        self.blocks: dict[int, np.ndarray] = {}
        self.model_frames = 0
        self.model_seconds = 0.0
        # A candidate at c is proposed HARD_AHEAD (hard) or 2.5 LAG (gradual) frames after c and
        # judged once the last window covering c + MARGIN is complete (at most MARGIN + 74
        # frames after c); the boundary it gives may lie MARGIN frames before c. Every frame of
        # look-ahead is a decoded frame held in stage 01's delay line (1.4 MB at 720p).
        self.lookahead = max(MARGIN + WINDOW - CONTEXT - 1, 2 * LAG + LAG // 2, HARD_AHEAD) + MARGIN + 2
        self.order = InOrder(min_len, self.lookahead)

    # -- signals -------------------------------------------------------------------------------

    def _f(self, t: int) -> np.ndarray:
        return self.ring[t % RING]

    def _mad(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(cv2.norm(a, b, cv2.NORM_L1)) / a.size

    def _window(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start..stop-1`` (stream positions), the first/last repeated beyond the ends."""
        idx = np.clip(np.arange(start, stop), 0, self.n - 1)
        return self.ring[idx % RING]

    def _vals(self, arr: np.ndarray, start: int, stop: int) -> np.ndarray:
        start, stop = max(start, 1), min(stop, self.n)
        if stop <= start:
            return np.zeros(0, np.float32)
        return arr[np.arange(start, stop) % RING]

    # -- proposals -----------------------------------------------------------------------------

    def _propose_hard(self, c: int) -> None:
        if c < 1:
            return
        s = float(self.d1[c % RING])
        h = float(self.hd[c % RING])
        if s < self.cand_thr and h < HIST_THRESHOLD:
            return
        if not (self._peak(self.d1, c) or self._peak(self.hd, c)):
            return
        baseline = self._baseline(self.d1, c)
        jump = s >= self.cand_thr and s >= self.cand_ratio * baseline
        colours = h >= HIST_THRESHOLD and h >= HIST_RATIO * self._baseline(self.hd, c)
        if not (jump or colours):
            return
        prev = self._f(c - 1)
        back = [self._mad(self._f(j), prev) for j in range(c, min(c + HARD_AHEAD + 1, self.n))]
        flash_like = bool(back) and min(back) < FLASH_RETURN * s
        cand = Candidate(c, "hard", s, baseline, flash_like, colour_score=h)
        if (
            self.accept_thr is not None
            and s >= self.accept_thr
            and s >= ACCEPT_RATIO * baseline
            and not flash_like
            and not self._near_candidate(c)
        ):
            cand.decision, cand.boundary = "accepted_fast", c
            self.order.add(c, s)
        else:
            self._enqueue(cand)
        self.candidates.append(cand)

    def _enqueue(self, cand: Candidate) -> None:
        if isinstance(self.model, ModelHandle):
            self.model.start()  # ~35 frames before the first window needs it
        self.queue.append(cand)

    def _peak(self, arr: np.ndarray, c: int) -> bool:
        """``arr[c]`` is the first maximum within +-2 frames."""
        v = float(arr[c % RING])
        before = self._vals(arr, c - 2, c)
        after = self._vals(arr, c + 1, c + 3)
        return not ((before.size and v <= before.max()) or (after.size and v < after.max()))

    def _baseline(self, arr: np.ndarray, c: int) -> float:
        """The signal's level around ``c``: the larger of the medians before and after it."""
        side_b = self._vals(arr, c - BASE, c - 1)
        side_a = self._vals(arr, c + 2, c + HARD_AHEAD + 1)
        return max(
            float(np.median(side_b)) if side_b.size else 0.0,
            float(np.median(side_a)) if side_a.size else 0.0,
        )

    def _near_candidate(self, c: int) -> bool:
        return any(abs(q.frame - c) <= MARGIN for q in self.queue)

    def _propose_gradual(self, u: int) -> None:
        """``u``: the frame whose change from ``u - LAG`` is tested, in pixels (``dk``, when the
        change is coherent) or in colours (``hk``: camera motion barely moves the histogram)."""
        if u < LAG:
            return
        s, h = float(self.dk[u % RING]), float(self.hk[u % RING])
        pixels = s >= self.grad_thr and float(self.coh[u % RING]) >= COHERENCE
        pixels = pixels and self._gradual_shape(self.dk, self.d1, u, GRADUAL_RATIO)
        colours = h >= GRADUAL_HIST and self._gradual_shape(self.hk, self.hd, u, GRADUAL_HIST_RATIO)
        if not (pixels or colours):
            return
        middle = u - LAG // 2
        if any(abs(c.frame - middle) <= MARGIN and c.kind == "gradual" for c in self.candidates):
            return
        far = [float(self.dk[v % RING]) for v in (u - 2 * LAG, u + 2 * LAG) if LAG <= v < self.n]
        cand = Candidate(middle, "gradual", s, float(np.mean(far)) if far else 0.0, colour_score=h)
        self._enqueue(cand)
        self.candidates.append(cand)

    def _gradual_shape(self, lagged: np.ndarray, step: np.ndarray, u: int, ratio: float) -> bool:
        """``lagged[u]`` is the first maximum within +-LAG, no single frame carries half of it
        (else it is a hard cut), and it stands ``ratio`` times above the level two lags before
        and after (a transition starts and ends; camera motion goes on)."""
        v = float(lagged[u % RING])
        if v < self._vals(lagged, u - LAG, u + LAG + 1).max() or v <= self._vals(lagged, u - LAG, u).max(
            initial=0.0
        ):
            return False
        if float(self._vals(step, u - LAG + 1, u + 1).max()) >= 0.5 * v:
            return False
        far = [float(lagged[w % RING]) for w in (u - 2 * LAG, u + 2 * LAG) if LAG <= w < self.n]
        return v >= ratio * (float(np.mean(far)) if far else 0.0)

    # -- verdicts ------------------------------------------------------------------------------

    def _blocks(self, c: Candidate) -> range:
        """The network's own windows that predict the frames within ``MARGIN`` of ``c``:
        window ``k`` predicts frames ``50k .. 50k+49`` from frames ``50k-25 .. 50k+74``."""
        return range(max(0, c.frame - MARGIN) // STEP, (c.frame + MARGIN) // STEP + 1)

    def _block_ready(self, k: int, final: bool) -> bool:
        return final or self.n >= STEP * k + WINDOW - CONTEXT

    def _score_ready(self, final: bool) -> None:
        ready = [c for c in self.queue if all(self._block_ready(k, final) for k in self._blocks(c))]
        if not ready:
            return
        self.queue = [c for c in self.queue if c not in ready]
        needed = sorted(
            {k for c in ready for k in self._blocks(c) if k not in self.blocks and STEP * k < self.n}
        )
        if needed:
            # Exactly the windows TransNetV2 alone would run (frames before the first and after
            # the last repeated, as the package pads), so its verdict on a candidate is the one
            # TransNetV2 alone gives there; nearby candidates share windows.
            windows = [self._window(STEP * k - CONTEXT, STEP * k - CONTEXT + WINDOW) for k in needed]
            model = self.model.get() if isinstance(self.model, ModelHandle) else self.model
            started = time.perf_counter()
            probs = model.predict(np.stack(windows))
            self.model_seconds += time.perf_counter() - started
            self.model_frames += len(windows) * WINDOW
            for k, p in zip(needed, probs, strict=True):
                self.blocks[k] = p[CONTEXT : CONTEXT + STEP].astype(np.float32)
        for c in ready:
            self._decide(c)
        # Forget windows no candidate can reach again.
        for k in [k for k in self.blocks if STEP * (k + 2) < self.n - RING]:
            del self.blocks[k]

    def _prob(self, f: int) -> float:
        block = self.blocks.get(f // STEP)
        return 0.0 if block is None else float(block[f % STEP])

    def _span(self, c: Candidate) -> range:
        return range(max(0, c.frame - MARGIN), min(self.n, c.frame + MARGIN + 1))

    def _decide(self, c: Candidate) -> None:
        span = list(self._span(c))
        ps = [self._prob(f) for f in span]
        c.model_score = max(ps) if ps else 0.0
        best: tuple[float, int] | None = None
        # The run over the threshold nearest to the candidate: its peak gives the boundary.
        runs, cur = [], []
        for f, p in zip(span, ps, strict=True):
            if p > self.threshold:
                cur.append((p, f))
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        if runs:
            run = min(runs, key=lambda r: min(abs(f - c.frame) for _, f in r))
            best = max(run)
        if best is None:
            c.decision = "rejected"
            return
        c.decision, c.boundary = "confirmed", best[1] + 1
        self.order.add(best[1] + 1, best[0])

    # -- stream --------------------------------------------------------------------------------

    def _add(self, index: int, small_bgr: np.ndarray) -> None:
        t = self.n
        if t == 0:
            self.first = index
        f = rgb48(small_bgr)
        self.ring[t % RING] = f
        q = f >> 6
        code = (q[..., 0].astype(np.int32) << 4) | (q[..., 1].astype(np.int32) << 2) | q[..., 2]
        self.hist[t % RING] = np.bincount(code.ravel(), minlength=HIST_BINS) / code.size
        self.n += 1
        if t >= 1:
            self.d1[t % RING] = self._mad(f, self._f(t - 1))
            self.hd[t % RING] = 0.5 * float(np.abs(self.hist[t % RING] - self.hist[(t - 1) % RING]).sum())
        if t >= LAG:
            dk = self._mad(f, self._f(t - LAG))
            self.dk[t % RING] = dk
            total = float(self._vals(self.d1, t - LAG + 1, t + 1).sum())
            self.coh[t % RING] = dk / total if total > 0 else 0.0
            self.hk[t % RING] = 0.5 * float(np.abs(self.hist[t % RING] - self.hist[(t - LAG) % RING]).sum())

    def push(self, index: int, small_bgr: np.ndarray) -> list[int]:
        self._add(index, small_bgr)
        t = self.n - 1
        if t - HARD_AHEAD >= 1:
            self._propose_hard(t - HARD_AHEAD)
        if t - 2 * LAG >= LAG:
            self._propose_gradual(t - 2 * LAG)
        self._score_ready(final=False)
        return [self.first + b for b in self.order.release(t - self.lookahead)]

    def finish(self, last_index: int) -> list[int]:
        t = self.n - 1
        for c in range(max(1, t - HARD_AHEAD + 1), t + 1):
            self._propose_hard(c)
        for u in range(max(LAG, t - 2 * LAG + 1), t + 1):
            self._propose_gradual(u)
        self._score_ready(final=True)
        return [self.first + b for b in self.order.release(None) if b < self.n]

    def facts(self) -> dict[str, Any]:
        model = None
        if isinstance(self.model, ModelHandle):
            model = self.model.get() if self.model.ready() else None
        else:
            model = self.model
        by = {k: sum(1 for c in self.candidates if c.decision == k) for k in DECISIONS}
        return {
            "detector": self.name,
            "transnetv2_threshold": self.threshold,
            "candidate_threshold": self.cand_thr,
            "candidate_ratio": self.cand_ratio,
            "gradual_threshold": self.grad_thr,
            "accept_threshold": self.accept_thr,
            "candidates_proposed": len(self.candidates),
            "candidates_hard": sum(1 for c in self.candidates if c.kind == "hard"),
            "candidates_gradual": sum(1 for c in self.candidates if c.kind == "gradual"),
            "candidates_accepted_fast": by["accepted_fast"],
            "candidates_confirmed": by["confirmed"],
            "candidates_rejected": by["rejected"],
            "boundaries": len(self.order.emitted),
            **describe(model, self.model_frames, self.model_seconds),
        }

    def candidate_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "frame_index": self.first + c.frame,
                "kind": c.kind,
                "fast_score": c.fast_score,
                "baseline": c.baseline,
                "colour_score": c.colour_score,
                "flash_like": c.flash_like,
                "model_score": c.model_score,
                "decision": c.decision,
                "boundary": None if c.boundary is None else self.first + c.boundary,
            }
            for c in self.candidates
        ]


FRAME = (27, 48, 3)
RING = 256
LAG = 8
BASE = 8
HARD_AHEAD = 8
MARGIN = 8
COHERENCE = 0.6
GRADUAL_RATIO = 1.3
HIST_BINS = 64
HIST_THRESHOLD = 0.25
HIST_RATIO = 3.0
GRADUAL_HIST = 0.3
GRADUAL_HIST_RATIO = 1.5
ACCEPT_RATIO = 4.0
FLASH_RETURN = 0.5
DECISIONS = ("accepted_fast", "confirmed", "rejected")
