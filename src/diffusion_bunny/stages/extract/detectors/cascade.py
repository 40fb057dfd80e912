"""The cascade detector (stage 01's default): cheap signals propose, TransNetV2 judges the doubtful."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from diffusion_bunny.registry import SHOT_DETECTORS
from diffusion_bunny.stages.extract.detectors.base import Blankness, Boundaries, InOrder
from diffusion_bunny.stages.extract.detectors.transnet import (
    CONTEXT as PACKAGE_CONTEXT,
)
from diffusion_bunny.stages.extract.detectors.transnet import (
    ModelHandle,
    TransNetModel,
    TransNetV2Options,
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
    # Share of the change that motion does not explain (see motion_compensated_change): near 1
    # for a cut or a blend, low for camera motion; and the compensated change at the candidate
    # over the compensated change of the frames around it (+1, so still sides do not divide by 0).
    motion_residual: float | None = None
    motion_contrast: float | None = None
    # The shots' contrast around it over ``extract.detector.reference_contrast`` (at most 1): the
    # absolute thresholds are scaled by it (see CascadeBoundaries, "Contrast").
    contrast_scale: float = 1.0
    # Hard: the share of the frame's blocks (a 6x4 grid) that changed by at least a quarter of
    # the frame's mean change (see frame_spread): near 1 when the whole picture changes.
    spread: float | None = None
    decision: str = "pending"  # accepted_fast | rejected_fast | confirmed | rejected
    reason: str | None = None  # which rule decided it
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

    Verdicts. A hard candidate with no other candidate near it, whose next frames do not come
    back towards the frame before it (a flash or an occlusion does), is accepted at once when its
    jump is clear: either at least ``accept_threshold`` and :data:`ACCEPT_RATIO` times its
    surroundings (a cut between unlike pictures), or :data:`STILL_JUMP` and :data:`STILL_RATIO`
    times its surroundings (two still sides), or a colour change of at least
    ``accept_colour_threshold`` with a jump of :data:`COLOUR_JUMP` and :data:`COLOUR_RATIO`
    times its surroundings. The last two are the ones real films need: calibrated on the
    Hamilton clip looped at 720p (cuts every ~2.8 s between shots of one stage, varied by crop,
    mirror and colour), real cuts jump only 17-65 (median 38) and 1.2-10x their surroundings,
    so the first rule accepted none of them and every cut cost the network 100-200 frames; but
    their colours change by 0.12-0.43 (median 0.31) where every non-cut candidate (camera
    motion, flashes of light, movement in frame) stayed under 0.13, and where both sides are
    still a real cut stands 5-10x above them while no non-cut candidate reached 4.3x. The
    three rules accepted 208 of 246 real cuts and no non-cut on the calibration movie (seed
    0; ``python_script/eval_real_cuts.py`` measures other seeds). On two CPU cores the
    network costs about 0.6 s per 100 frames, so asking it about every plain cut of a film
    doubles stage 01's time; on a GPU, ``accept_threshold: null`` sends every candidate to it.

    Quiet sides. Drawn films cut between shots on one painted backdrop (the clouds and hills
    moved, the colours the same): a jump of 10-14 that stands 15-84x above two still sides, which
    TransNetV2 scores 0.01-0.2, as it would a character's pose jumping in place. Such a jump of
    at least :data:`QUIET_JUMP`, :data:`QUIET_RATIO` times its surroundings, is accepted when it
    covers the picture (:func:`frame_spread` at least :data:`QUIET_SPREAD`: most blocks of a
    6x4 grid changed); a pose changes a few blocks and is left to the network. Calibrated on the
    two Kenney films of the character truth set (8 of their 24 cuts were lost; 6 are found now,
    the other 2 change too little to be proposed), checked on its other four films and the real
    loops, where no non-cut hard candidate stood more than 4.3x above its surroundings.

    Motion compensation (``motion_compensation``, on by default). On the same real loops the
    rules above still sent 150 camera-motion candidates (pans, zooms, a frame dropped in a
    pan) and 60 gradual ones to the network for every 267 cuts, and missed cuts into the
    clip's fast pan, whose frame differences are as large as the cut's. The dense optical flow
    between two frames of one shot predicts the second from the first; nothing predicts a frame
    of another shot. So for every candidate the change is measured again after compensating
    the motion (:func:`motion_compensated_change`, on the 48x27 copy, around candidates only):

    * a hard candidate whose change the flow mostly explains (it keeps under
      :data:`MC_MOTION_RESIDUAL` of it) and whose compensated change is no bigger than its
      neighbours' (:data:`MC_MOTION_CONTRAST`) is camera motion: rejected without the network;
      so is one whose change the flow explains in good part (under :data:`MC_PARTLY_RESIDUAL`
      kept) and whose compensated change stays within :data:`MC_PARTLY_CONTRAST` times its
      neighbours' (no real cut of the looped movies is both);
      so is a gradual one whose change over the lag the flow explains (:data:`MC_GRADUAL_RESIDUAL`),
      and a gradual one next to a cut accepted at once (the cut's own change over the lag);
    * a hard candidate whose compensated change stands :data:`MC_CUT_CONTRAST` times above its
      neighbours' (two sides that are steady once their motion is compensated) is accepted; so
      is one that keeps :data:`MC_CLEAN_RESIDUAL` of its change (the flow explains almost none
      of it) and stands :data:`MC_CLEAN_CONTRAST` times above its neighbours;
    * a jump that stands out from the still side of a movement only (a cut into a fast pan; or
      a pan starting) is proposed too; it goes to the network only when no motion explains it
      (:data:`MC_ONSET_CONTRAST`), else it is rejected at once (most are pans starting);
    * where the network is unsure, a change no motion explains weighs like a colour jump.

    Motion the flow cannot follow (motion blur, things moving in different directions, a flash)
    still goes to the network. Measured (``python_script/eval_real_cuts.py``; seed 0 the
    calibration movie, seed 1 held out): network frames per decoded frame 0.685 -> 0.18
    (seed 1: 0.79 -> 0.18), recall of real cuts 0.925 -> 0.978 (seed 1: 0.961 -> 0.990),
    precision 1.0, real cuts accepted without the network 77% -> 86% (seed 1: 73% -> 88%);
    the eval_shots table unchanged. The second rejecting and accepting rules and the shorter
    context of hard-only runs (:data:`HARD_CONTEXT`) took the network from 0.185 to 0.070 frames
    per decoded frame on seed 0 (seed 1 0.182 -> 0.048, seed 2 0.179 -> 0.061, seed 3, never
    looked at while calibrating, 0.182 -> 0.055) and recall 0.978 -> 0.981 (seed 1 0.990 ->
    1.000, seed 2 0.981 -> 0.985, seed 3 0.987 -> 0.993), precision unchanged, eval_shots unchanged.

    Contrast (``reference_contrast``). Every absolute threshold above was set on footage of
    ordinary contrast; a night grade (mean luma ~24, a third of the contrast) divides every
    frame difference by three, so an absolute ``candidate_threshold`` proposed nothing for a
    quarter of the cuts of the night-graded real loops and TransNetV2 rejected most of the rest.
    The ratio tests need nothing (a ratio of two differences does not move with contrast); the
    absolute ones scale with the shots' contrast around the candidate (:meth:`_contrast_scale`:
    the larger median standard deviation of gray of the frames before and after it, over
    ``reference_contrast``, at most 1, at least :data:`MIN_SCALE`): a candidate needs
    ``candidate_threshold`` times that scale, the accept rules compare its jump divided by it,
    the compensated change is taken over its neighbours' plus the scale (not plus 1), and the
    network sees its run brightened to the reference contrast (:func:`brightened`). Measured on
    the night-graded real loops (``eval_real_cuts.py --night``): the frame difference at a cut
    over the shots' contrast has the same distribution graded and night-graded (5th percentile
    0.5-0.7, median 0.9-1.0), while real cuts of ordinary footage stand at contrasts of 20-60
    (night 7-15). At 30 ordinary footage keeps its cuts (the ungraded loops: the same cuts, the
    network's frames unchanged on seeds 0-2 and 0.045 -> 0.052 per decoded frame on seed 3, held
    out; the eval_shots lists unchanged); at 40 seed 0's network frames moved too.

    Exposure (flicker). An old print flickers: every frame has its own exposure, a few percent
    either way, and in a still shot the frame differences then reach those of a real cut between
    two shots of one scene; the colour histogram moves with them and TransNetV2 takes some of the
    flicker for cuts. On a looped real movie whose frames' gains were drawn anew (+-6%, then
    +-20% more; ``eval_real_cuts.py --flicker`` draws +-12% and +-6 gray levels of lift) the
    rules above found 0.899 of the cuts at precision 0.772 and asked the network about 1.06
    frames per decoded frame. So hard candidates are judged on frames brought to one exposure
    (``d1g``, ``hdg``, the flash test, the spread and the motion compensation;
    :func:`exposure_change`: a gain and an offset, as most pixels say), and the network sees its
    run with each frame brought to the median exposure of the five around it
    (:func:`steadied`), by no more than the film flickers there (:meth:`_flicker_bounds`: a
    multiple of the spread of the exposure changes of the frames before, only where the frames'
    mean turned up and down by turns). Steady footage, fades and ordinary pans have no such
    bounds, so they are judged exactly as before: the ordinary and night-graded loops gave the
    same cuts and network frames, and the ``eval_shots.py`` lists stayed. A camera that shakes
    hard (1-4 of 48 px a frame, over fine texture) or a pan that crosses the picture in a few
    frames can wobble the mean by turns too; there the pixels' exposure changes are small and
    so are the bounds, but candidates' scores move a little (measured on synthetic shake; see
    ``docs/shot-detection.md``). That movie: 1.000 and 0.937 at
    0.20 network frames per decoded frame; a held-out one at the evaluation's grade: precision
    0.918 -> 1.000, recall 0.987, network 0.70 -> 0.14 (``docs/shot-detection.md``). Gradual
    candidates keep the frames as they are (a fade is a change of exposure).

    Every other candidate goes to TransNetV2, which must predict the frames ``c +- MARGIN``,
    each with at least :data:`CONTEXT` frames of input on either side (the package's own
    windows give every prediction they keep at least 25). The frames candidates need are
    planned as intervals, not as the package's 100-frame windows on a fixed 50-frame grid: the
    package's windowing runs every frame twice (as prediction and as the neighbour's context),
    which on a cut-dense film made the network see 1.8 frames per decoded frame, and even run
    once, grid-aligned blocks cost a lone candidate 100-150 frames where 87 do (on the looped
    Hamilton movies, 17% fewer network frames for the same candidates). Intervals closer than
    two contexts are joined into one run (the frames between them cost less than a second
    context), a run is started once no later candidate can join it (or once it reaches
    :data:`MAX_RUN` predicted frames, which bounds stage 01's delay line: only then do two runs
    share context frames), so the network's frames are at most the movie's plus the contexts at
    such seams (normally far fewer: facts ``model_frames_per_decoded``). The network is
    convolutional over time, so a shorter or longer input gives the same kind of answer (see
    :data:`CONTEXT` for how much it moved).

    A candidate is confirmed if a run of probabilities over ``transnetv2_threshold`` lies
    within ``MARGIN`` frames (the boundary is then placed as TransNetV2 places it). Where the
    network is unsure (its peak is under the
    threshold by at most ``transnetv2_unsure``), a hard candidate whose colours changed by
    ``accept_colour_threshold`` is confirmed at its own frame: both signals weigh (on the real
    loops the network scored 0.28-0.48 on real cuts out of fast pans).
    """

    name = "cascade"

    def __init__(
        self,
        model: ModelHandle | TransNetModel,
        cfg: CascadeSettings,
        min_len: int = 0,
        fps: float | None = None,
    ):
        self.model = model
        self.threshold = cfg.transnetv2_threshold
        self.cand_thr = cfg.candidate_threshold
        self.cand_ratio = cfg.candidate_ratio
        self.grad_thr = cfg.gradual_threshold
        self.accept_thr = cfg.accept_threshold
        self.accept_colour = cfg.accept_colour_threshold
        self.ref_contrast = cfg.reference_contrast
        self.unsure = cfg.transnetv2_unsure
        # Motion rules only where fast decisions are allowed at all (accept_threshold null sends
        # every candidate to the network).
        self.motion = cfg.motion_compensation and cfg.accept_threshold is not None
        self.ring = np.zeros((RING, *FRAME), np.uint8)
        self.d1 = np.zeros(RING, np.float32)
        self.d1g = np.zeros(RING, np.float32)  # d1 with the exposure matched (see _matched)
        self.mu = np.zeros(RING, np.float32)  # the frame's mean gray (its exposure)
        self.gray = np.zeros((RING, *FRAME[:2]), np.uint8)
        # Per frame: the change of exposure from the frame before (log gain, offset) and how
        # far a frame's exposure may be matched (gain, offset; see _flicker_bounds).
        self.eg = np.full(RING, np.nan, np.float32)
        self.eo = np.zeros(RING, np.float32)
        self.bg = np.ones(RING, np.float32)
        self.bo = np.zeros(RING, np.float32)
        self.tn = np.zeros(RING, np.bool_)  # the frame's mean turned (up after down or back)
        self._turns = 0  # turns of the FLICKER_WINDOW frames before the newest one
        self._sign = 0  # the direction of the last step of the mean over FLICKER_STEP
        self.dk = np.zeros(RING, np.float32)
        self.coh = np.zeros(RING, np.float32)
        self.hd = np.zeros(RING, np.float32)
        self.hdg = np.zeros(RING, np.float32)  # hd with the exposure matched
        self.hk = np.zeros(RING, np.float32)
        self.ct = np.zeros(RING, np.float32)  # contrast: standard deviation of the frame's gray
        self.hist = np.zeros((RING, HIST_BINS), np.float32)
        self.n = 0  # frames pushed
        self.first = 0  # index of the first frame (stream indices are consecutive)
        self.candidates: list[Candidate] = []
        self.queue: list[Candidate] = []
        self.probs: dict[int, float] = {}  # frame -> the network's probability, once run
        # (frame, exposure matched) -> (raw, compensated) change
        self._comp: dict[tuple[int, bool], tuple[float, float]] = {}
        self.model_frames = 0
        self.model_seconds = 0.0
        self.model_runs = 0
        # A candidate at c is proposed at most PROPOSE_DELAY frames after c; the run of frames it
        # needs (up to c + MARGIN) starts once no later candidate can join it (see
        # closed_runs) or once it is MAX_RUN frames long, so a verdict comes at most
        # MAX_RUN + 2 * CONTEXT + PROPOSE_DELAY + MARGIN frames after c, and the boundary it gives
        # may lie MARGIN frames before c. Every frame of look-ahead is a decoded frame held in
        # stage 01's delay line (1.4 MB at 720p).
        self.lookahead = MAX_RUN + 2 * CONTEXT + PROPOSE_DELAY + 3 * MARGIN + 12
        self.blankness = Blankness(self.lookahead + min_len + 2)
        self.order = InOrder(self.lookahead, min_len, self.blankness, fps)

    # -- signals -------------------------------------------------------------------------------

    def _f(self, t: int) -> np.ndarray:
        return self.ring[t % RING]

    def _mad(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(cv2.norm(a, b, cv2.NORM_L1)) / a.size

    def _flickers(self, t: int) -> bool:
        """Whether frame ``t`` may be matched at all (:meth:`_flicker_bounds` gave it bounds)."""
        return bool(self.bg[t % RING] > 1.0 or self.bo[t % RING] > 0.0)

    def _matched(self, t: int, s: int, at: int | None = None) -> np.ndarray:
        """Frame ``t`` brought to frame ``s``'s exposure by no more than the film flickers before
        frame ``at`` (the later of the two by default; see :func:`exposure_change`): as it is on
        steady footage."""
        k = max(t, s) % RING if at is None else at % RING
        change = exposure_change(
            self.gray[t % RING], self.gray[s % RING], float(self.bg[k]), float(self.bo[k])
        )
        return exposure_matched(self._f(t), *change)

    def _flicker_bounds(self, t: int) -> None:
        """How far frame ``t``'s exposure may be matched to its neighbours' (``bg``: a gain,
        ``bo``: an offset): :data:`FLICKER_SPAN` times the spread (median absolute deviation) of
        the changes of exposure between the :data:`FLICKER_WINDOW` pairs of frames before it,
        within :data:`EXPOSURE_GAIN` and :data:`EXPOSURE_OFFSET`; none unless the exposure went
        up and down by turns (:data:`FLICKER_TURNS`). Nothing on steady footage nor in a fade, so
        only a flickering film's cuts are judged on matched frames; the frame's own change is
        not counted, so a cut's is not."""
        self.eg[t % RING] = np.nan  # not measured yet (see below)
        # A flicker brightens and darkens by turns; a fade, a fade through black or a light
        # slowly changing turns once at most (and its frames are judged as they are). The
        # frames' means say it at no cost (a running count of the turns of the pairs before
        # frame t); only then is each pair's change measured (once).
        turns = self._turns
        if t >= 1:
            step = float(self.mu[t % RING] - self.mu[(t - 1) % RING])
            sign = 0 if abs(step) <= FLICKER_STEP else (1 if step > 0 else -1)
            self.tn[t % RING] = sign != 0 and self._sign != 0 and sign != self._sign
            self._sign = sign or self._sign
            self._turns += int(self.tn[t % RING]) - (
                int(self.tn[(t - FLICKER_WINDOW) % RING]) if t > FLICKER_WINDOW else 0
            )
        if turns < FLICKER_TURNS:
            self.bg[t % RING], self.bo[t % RING] = 1.0, 0.0
            return
        for j in range(max(1, t - FLICKER_WINDOW), t):
            if np.isnan(self.eg[j % RING]):
                gain, offset = exposure_change(self.gray[(j - 1) % RING], self.gray[j % RING])
                self.eg[j % RING], self.eo[j % RING] = np.log(gain), offset
        past = self._vals(self.eg, t - FLICKER_WINDOW, t)
        # The spread of the changes about their median: a flicker changes its sign from frame
        # to frame, a fade or a slow change of light goes one way at a steady rate (no spread).
        level_g = float(np.median(np.abs(past - np.median(past))))
        offsets = self._vals(self.eo, t - FLICKER_WINDOW, t)
        level_o = float(np.median(np.abs(offsets - np.median(offsets))))
        # The offset may also take up what the gain's bound leaves of a gain flicker (as gray
        # levels at the frame's mean).
        level_o += level_g * float(self.mu[t % RING])
        self.bg[t % RING] = min(EXPOSURE_GAIN, float(np.exp(FLICKER_SPAN * level_g)))
        self.bo[t % RING] = min(EXPOSURE_OFFSET, FLICKER_SPAN * level_o)

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
        s = float(self.d1g[c % RING])
        h = float(self.hdg[c % RING])
        if s < self.cand_thr * MIN_SCALE and h < HIST_THRESHOLD:
            return
        if not (self._peak(self.d1g, c) or self._peak(self.hdg, c)):
            return
        scale = self._contrast_scale(c)
        thr = self.cand_thr * scale
        if s < thr and h < HIST_THRESHOLD:
            return
        baseline = self._baseline(self.d1g, c)
        jump = s >= thr and s >= self.cand_ratio * baseline
        colours = h >= HIST_THRESHOLD and h >= HIST_RATIO * self._baseline(self.hdg, c)
        # A cut into (or out of) a fast pan stands out from the still side only: the moving
        # side's frame differences are as large as the cut's. With motion compensation such a
        # jump is proposed too, but decided by the cheap rules alone (accepted as a cut or
        # rejected as the start of a movement): most are pans starting, the network would cost
        # more than they bring, and without this proposal they were not looked at at all.
        onset = self.motion and s >= thr and s >= self.cand_ratio * self._baseline(self.d1g, c, min)
        if not (jump or colours or onset):
            return
        prev = self._f(c - 1)
        ahead = range(c, min(c + HARD_AHEAD + 1, self.n))
        back = [self._mad(self._matched(j, c - 1, c), prev) for j in ahead]
        flash_like = bool(back) and min(back) < FLASH_RETURN * s
        residual, contrast = self._motion_hard(c, scale)
        cand = Candidate(
            c,
            "hard",
            s,
            baseline,
            flash_like,
            colour_score=h,
            motion_residual=residual,
            motion_contrast=contrast,
            contrast_scale=scale,
            spread=frame_spread(self._matched(c - 1, c), self._f(c)),
        )
        rule = accept_at_once(cand, self.accept_thr, self.accept_colour, self.motion)
        if rule is not None and not self._near_candidate(c):
            cand.decision, cand.boundary, cand.reason = "accepted_fast", c, rule
            self.order.add(c, s)
        elif self.motion and motion_explains(cand):
            cand.decision, cand.reason = "rejected_fast", "motion"
        elif not (jump or colours) and not motion_leaves(cand, MC_ONSET_CONTRAST):
            cand.decision, cand.reason = "rejected_fast", "motion onset"
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

    def _baseline(self, arr: np.ndarray, c: int, pick: Callable[[float, float], float] = max) -> float:
        """The signal's level around ``c``: the larger (``pick``) of the medians before and
        after it."""
        side_b = self._vals(arr, c - BASE, c - 1)
        side_a = self._vals(arr, c + 2, c + HARD_AHEAD + 1)
        return pick(
            float(np.median(side_b)) if side_b.size else 0.0,
            float(np.median(side_a)) if side_a.size else 0.0,
        )

    def _compensated(self, t: int, matched: bool = False) -> tuple[float, float]:
        """(raw, motion-compensated) change from frame ``t - 1`` to ``t``, memoised; with
        ``matched``, from frame ``t - 1`` at ``t``'s exposure (hard candidates: a flicker is no
        change; gradual ones keep the exposure, a fade is one)."""
        matched = matched and self._flickers(t)
        hit = self._comp.get((t, matched))
        if hit is None:
            before = self._matched(t - 1, t) if matched else self._f(t - 1)
            hit = self._comp[(t, matched)] = motion_compensated_change(before, self._f(t))
            if len(self._comp) > 4 * RING:
                for k in [k for k in self._comp if k[0] < self.n - RING]:
                    del self._comp[k]
        return hit

    def _motion_hard(self, c: int, scale: float = 1.0) -> tuple[float, float]:
        """Share of the change the flow leaves, and the compensated change over the one around
        it (+1 at the reference contrast, so still sides do not divide by 0; +``scale`` in a
        flatter shot, whose changes are all ``scale`` times smaller)."""
        raw, res = self._compensated(c, matched=True)
        around = [self._compensated(g, True)[1] for g in (c - 2, c - 1, c + 1, c + 2) if 1 <= g < self.n]
        level = float(np.median(around)) if around else 0.0
        return res / max(raw, 1e-6), res / (level + scale)

    def _contrast_scale(self, c: int) -> float:
        """The shots' contrast around a hard candidate at ``c`` over ``reference_contrast``, at
        most 1 (1 when the setting is null): the larger of the median contrasts of the
        :data:`BASE` frames before and the :data:`HARD_AHEAD` frames from ``c`` on, so a cut from
        a flat picture to a lit one is judged at the lit one's contrast; never under
        :data:`MIN_SCALE`."""
        if self.ref_contrast is None:
            return 1.0
        before = self._vals(self.ct, c - BASE, c)
        after = self._vals(self.ct, c, c + HARD_AHEAD + 1)
        level = max(
            float(np.median(before)) if before.size else 0.0,
            float(np.median(after)) if after.size else 0.0,
        )
        return float(np.clip(level / self.ref_contrast, MIN_SCALE, 1.0))

    def _motion_gradual(self, u: int) -> tuple[float, float]:
        """Share of the change over the lag the flow does not explain (the smaller of: frame by
        frame, which follows fast motion; and from ``u - LAG`` to ``u`` at once, which sees
        through slow motion whose frame-to-frame changes are at the noise level), and the
        compensated change per frame inside the lag over the one outside it."""
        inside = [self._compensated(j) for j in range(max(1, u - LAG + 1), u + 1)]
        raw = sum(r for r, _ in inside)
        res = sum(c for _, c in inside)
        lag_raw, lag_res = motion_compensated_change(self._f(u - LAG), self._f(u))
        outside = [
            self._compensated(j)[1]
            for j in (*range(u - 2 * LAG, u - LAG - 2), *range(u + 3, u + LAG))
            if 1 <= j < self.n
        ]
        level = float(np.median(outside)) if outside else 0.0
        residual = min(res / max(raw, 1e-6), lag_res / max(lag_raw, 1e-6))
        return residual, (res / max(1, len(inside))) / (level + 1.0)

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
        residual, contrast = self._motion_gradual(u)
        cand = Candidate(
            middle,
            "gradual",
            s,
            float(np.mean(far)) if far else 0.0,
            colour_score=h,
            motion_residual=residual,
            motion_contrast=contrast,
        )
        if self.motion and self._next_to_cut(middle):
            # A cut accepted within MARGIN frames: a boundary here would be merged into it (min
            # shot length), and the change over the lag is the cut's own (cuts into fast pans
            # propose both).
            cand.decision, cand.reason = "rejected_fast", "next to a cut"
        elif self.motion and motion_explains(cand):
            cand.decision, cand.reason = "rejected_fast", "motion"
        else:
            self._enqueue(cand)
        self.candidates.append(cand)

    def _next_to_cut(self, frame: int) -> bool:
        return any(
            c.decision == "accepted_fast" and abs(c.frame - frame) <= MARGIN
            for c in reversed(self.candidates[-16:])
        )

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

    def _wanted(self) -> list[tuple[int, int]]:
        """The frames queued candidates need predicted that the network has not run, as
        inclusive intervals (frames not decoded yet included: a run waits for them)."""
        frames = sorted({f for c in self.queue for f in self._span(c, final=False)} - self.probs.keys())
        out: list[tuple[int, int]] = []
        for f in frames:
            if out and f == out[-1][1] + 1:
                out[-1] = (out[-1][0], f)
            else:
                out.append((f, f))
        return out

    def _score_ready(self, final: bool) -> None:
        if not self.queue:
            return
        for first, last in closed_runs(self._wanted(), self.n, final):
            if first < self.n:
                self._run(first, min(last, self.n - 1))
        ready = [c for c in self.queue if all(f in self.probs for f in self._span(c, final))]
        if not ready:
            return
        self.queue = [c for c in self.queue if c not in ready]
        for c in ready:
            self._decide(c)
        # Forget predictions no candidate can reach again.
        for f in [f for f in self.probs if f < self.n - RING]:
            del self.probs[f]

    def _run(self, first: int, last: int) -> None:
        """The network over frames ``first..last`` with :func:`run_context` frames of input on
        each side (frames before the movie and after its end repeated, as the package pads)."""
        ctx = run_context(self.queue, first, last)
        frames = self._window(first - ctx, last + 1 + ctx)
        idx = np.clip(np.arange(first - ctx, last + 1 + ctx), 0, self.n - 1) % RING
        frames = steadied(frames, self.mu[idx], self.ct[idx], self.bg[idx], self.bo[idx])
        if self.ref_contrast is not None:
            frames = brightened(frames, self._vals(self.ct, first - ctx, last + 1 + ctx), self.ref_contrast)
        model = self.model.get() if isinstance(self.model, ModelHandle) else self.model
        started = time.perf_counter()
        probs = model.predict(frames[None])[0]
        self.model_seconds += time.perf_counter() - started
        self.model_frames += len(frames)
        self.model_runs += 1
        for i, f in enumerate(range(first, last + 1)):
            self.probs[f] = float(probs[ctx + i])

    def _prob(self, f: int) -> float:
        return self.probs.get(f, 0.0)

    def _span(self, c: Candidate, final: bool = True) -> range:
        """The frames around ``c`` whose probabilities decide it (up to the last decoded frame
        at the end of the movie; before that, all of them)."""
        margin = HARD_MARGIN if c.kind == "hard" else MARGIN
        stop = c.frame + margin + 1
        return range(max(0, c.frame - margin), min(self.n, stop) if final else stop)

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
            why = unsure_but_clear(c, self.threshold, self.unsure, self.accept_colour, self.motion)
            if why is not None:
                # Both signals weigh: the network leans towards a cut, the cheap signals say cut.
                c.decision, c.boundary, c.reason = "confirmed", c.frame, why
                self.order.add(c.frame, c.model_score)
                return
            c.decision, c.reason = "rejected", "network"
            return
        c.decision, c.boundary, c.reason = "confirmed", best[1] + 1, "network"
        self.order.add(best[1] + 1, best[0])

    # -- stream --------------------------------------------------------------------------------

    def _add(self, index: int, small_bgr: np.ndarray, time_s: float | None) -> None:
        t = self.n
        if t == 0:
            self.first = index
        f = rgb48(small_bgr)
        self.ring[t % RING] = f
        self.gray[t % RING] = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
        mean, std = cv2.meanStdDev(self.gray[t % RING])
        self.ct[t % RING] = float(std[0, 0])
        self.mu[t % RING] = float(mean[0, 0])
        self.blankness.add(t, f, time_s)
        self.hist[t % RING] = colour_histogram(f)
        self.n += 1
        self._flicker_bounds(t)
        if t >= 1:
            self.d1[t % RING] = self._mad(f, self._f(t - 1))
            self.hd[t % RING] = 0.5 * float(np.abs(self.hist[t % RING] - self.hist[(t - 1) % RING]).sum())
            if not self._flickers(t):  # steady footage: nothing matched, the same signals
                self.d1g[t % RING], self.hdg[t % RING] = self.d1[t % RING], self.hd[t % RING]
            else:
                before = self._matched(t - 1, t)
                self.d1g[t % RING] = self._mad(f, before)
                self.hdg[t % RING] = 0.5 * float(np.abs(self.hist[t % RING] - colour_histogram(before)).sum())
        if t >= LAG:
            dk = self._mad(f, self._f(t - LAG))
            self.dk[t % RING] = dk
            total = float(self._vals(self.d1, t - LAG + 1, t + 1).sum())
            self.coh[t % RING] = dk / total if total > 0 else 0.0
            self.hk[t % RING] = 0.5 * float(np.abs(self.hist[t % RING] - self.hist[(t - LAG) % RING]).sum())

    def push(self, index: int, small_bgr: np.ndarray, time_s: float | None = None) -> list[int]:
        self._add(index, small_bgr, time_s)
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
            "accept_colour_threshold": self.accept_colour,
            "transnetv2_unsure": self.unsure,
            "motion_compensation": self.motion,
            "candidates_proposed": len(self.candidates),
            "candidates_hard": sum(1 for c in self.candidates if c.kind == "hard"),
            "candidates_gradual": sum(1 for c in self.candidates if c.kind == "gradual"),
            "candidates_accepted_fast": by["accepted_fast"],
            "candidates_rejected_fast": by["rejected_fast"],
            "candidates_confirmed": by["confirmed"],
            "candidates_rejected": by["rejected"],
            "boundaries": len(self.order.emitted),
            "fade_dips_merged": self.order.dips,
            **describe(model, self.model_frames, self.model_seconds),
            "model_runs": self.model_runs,
            "model_frames_per_decoded": round(self.model_frames / self.n, 4) if self.n else 0.0,
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
                "motion_residual": c.motion_residual,
                "motion_contrast": c.motion_contrast,
                "contrast_scale": c.contrast_scale,
                "spread": c.spread,
                "model_score": c.model_score,
                "decision": c.decision,
                "reason": c.reason,
                "boundary": None if c.boundary is None else self.first + c.boundary,
            }
            for c in self.candidates
        ]


def exposure_change(
    gray: np.ndarray, to_gray: np.ndarray, gain_bound: float | None = None, offset_bound: float | None = None
) -> tuple[float, float]:
    """The gain and offset that bring ``gray`` (a 48x27 frame's gray) to the exposure of
    ``to_gray``, as most of its pixels say (medians: a thing that moves or lights up in part of
    the picture is not a change of exposure), at most ``gain_bound`` either way and
    ``offset_bound`` gray levels.

    Old film flickers: a projector's or a printer's light that is not steady, or uneven
    development, gives every frame its own exposure, a few percent either way. On the looped real
    movies (``eval_real_cuts.py --flicker``) frame differences alone then take a still shot for a
    run of cuts: the colour histogram jumps, the network sees a change of light, and the jump
    of a real cut no longer stands out from its neighbours. Hard candidates are therefore judged
    on frames brought to one exposure, so a flicker is no change while a cut still is one (what
    differs between two shots is what they show). Both a gain and an offset: a change of light
    scales the picture, a change of density in the print or of the lamp's stray light lifts it.
    The bounds are the film's own flicker (:meth:`CascadeBoundaries._flicker_bounds`), so a cut
    to a darker or lighter shot keeps the part of its change beyond it, and steady footage is
    judged as it is; gradual candidates are judged on the frames as they are (a fade is a change
    of exposure).
    """
    gain_bound = EXPOSURE_GAIN if gain_bound is None else gain_bound
    offset_bound = EXPOSURE_OFFSET if offset_bound is None else offset_bound
    if gain_bound <= 1.0 and offset_bound <= 0.0:
        return 1.0, 0.0
    a = gray.astype(np.float32)
    b = to_gray.astype(np.float32)
    lit = a >= EXPOSURE_MIN_GRAY
    gain = 1.0
    if lit.mean() >= 0.5:
        gain = float(np.clip(np.median(b[lit] / a[lit]), 1.0 / gain_bound, gain_bound))
    offset = float(np.clip(np.median(b - gain * a), -offset_bound, offset_bound))
    return gain, offset


def exposure_matched(frame: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """``frame`` (uint8) times ``gain`` plus ``offset``, rounded and held to 0-255."""
    if gain == 1.0 and offset == 0.0:
        return frame
    # addWeighted rounds and saturates (convertScaleAbs would mirror negatives).
    return cv2.addWeighted(frame, gain, frame, 0.0, offset)


def steadied(
    frames: np.ndarray, mean: np.ndarray, std: np.ndarray, gain_bound: np.ndarray, offset_bound: np.ndarray
) -> np.ndarray:
    """``frames`` (a run of the network) each brought (:func:`exposure_matched`) to the median
    exposure of the five frames around it: a flickering shot's frames to one steady exposure,
    while a cut, a fade or a light turned on keeps its own (a median of five follows a step or a
    ramp exactly). TransNetV2 learnt cuts on footage of steady exposure; shown an old print's
    flicker it takes some of it for cuts. Each frame by no more than the film flickers there
    (``gain_bound``, ``offset_bound``; none on steady footage)."""
    out = frames.copy()
    for i in range(len(frames)):
        if gain_bound[i] <= 1.0 and offset_bound[i] <= 0.0:
            continue
        lo, hi = max(0, i - 2), min(len(frames), i + 3)
        to_mean, to_std = float(np.median(mean[lo:hi])), float(np.median(std[lo:hi]))
        gain = 1.0
        if std[i] >= EXPOSURE_MIN_STD and to_std >= EXPOSURE_MIN_STD:
            gain = float(np.clip(to_std / std[i], 1.0 / gain_bound[i], gain_bound[i]))
        offset = float(np.clip(to_mean - gain * mean[i], -offset_bound[i], offset_bound[i]))
        out[i] = exposure_matched(frames[i], gain, offset)
    return out


def colour_histogram(frame: np.ndarray) -> np.ndarray:
    """``frame``'s (48x27 RGB) histogram of :data:`HIST_BINS` colours (the top two bits of each
    channel), as shares of its pixels."""
    q = frame >> 6
    code = (q[..., 0].astype(np.int32) << 4) | (q[..., 1].astype(np.int32) << 2) | q[..., 2]
    return np.bincount(code.ravel(), minlength=HIST_BINS) / code.size


def motion_compensated_change(prev: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """Mean absolute change from ``prev`` to ``cur`` (48x27 RGB) before and after motion
    compensation: ``prev`` warped onto ``cur`` by the dense optical flow between them
    (Farneback, OpenCV), compared away from a border of :data:`FLOW_BORDER` pixels.

    Camera motion (pans, zooms, a shaking camera, a frame dropped in a pan) is what makes a
    frame difference jump without a cut; the flow between two frames of one shot predicts the
    second from the first, while nothing predicts a frame of another shot. Classic cut
    detectors compare motion-compensated frames for that reason; at 48x27 the flow costs about
    0.2 ms, and it is computed only around candidates.
    """
    a = cv2.cvtColor(prev, cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(cur, cv2.COLOR_RGB2GRAY)
    flow = cv2.calcOpticalFlowFarneback(b, a, None, 0.5, 2, 7, 3, 5, 1.1, 0)
    h, w = a.shape
    xx, yy = _grid(h, w)
    warped = cv2.remap(
        prev, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    m = FLOW_BORDER
    inner = (slice(m, h - m), slice(m, w - m))
    raw = float(cv2.norm(prev[inner], cur[inner], cv2.NORM_L1)) / prev[inner].size
    res = float(cv2.norm(warped[inner], cur[inner], cv2.NORM_L1)) / prev[inner].size
    return raw, res


@functools.cache
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of an ``h`` x ``w`` picture (read-only), made once per size."""
    xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def accept_at_once(
    c: Candidate, accept_thr: float | None, accept_colour: float | None, motion: bool = False
) -> str | None:
    """Which rule makes a hard candidate a cut without asking the network (see
    :class:`CascadeBoundaries`), or None; ``accept_thr`` None turns fast acceptance off
    altogether, ``motion`` adds the motion-compensated rule."""
    if accept_thr is None or c.kind != "hard" or c.flash_like:
        return None
    # The jump as it would be at the reference contrast (the ratios need no scaling).
    jump = c.fast_score / c.contrast_scale
    if jump >= accept_thr and c.fast_score >= ACCEPT_RATIO * c.baseline:
        return "clear jump"
    if jump >= STILL_JUMP and c.fast_score >= STILL_RATIO * c.baseline:
        return "still sides"  # two still sides and a clear jump between them
    if (
        c.spread is not None
        and jump >= QUIET_JUMP
        and c.fast_score >= QUIET_RATIO * c.baseline
        and c.spread >= QUIET_SPREAD
        and not motion_explains(c)
    ):
        # Two quite still sides and a smaller jump across the whole picture: a cut between two
        # shots on one painted backdrop (clouds and hills moved, colours the same), which
        # TransNetV2 scores 0.01-0.2 as it does a character's pose jumping in place. The spread
        # tells them apart: a pose changes a few blocks of the picture, a cut nearly all of them;
        # a locked-off camera bumped also changes all of them, but its flow explains the change.
        return "quiet sides"
    if (
        accept_colour is not None
        and c.colour_score >= accept_colour
        and jump >= COLOUR_JUMP
        and c.fast_score >= COLOUR_RATIO * c.baseline
    ):
        return "colour jump"
    if motion and jump >= COLOUR_JUMP and motion_leaves(c, MC_CUT_CONTRAST):
        # Two sides that are steady once their motion is compensated, and a change between them
        # that no motion explains: a cut into or out of a moving shot.
        return "compensated jump"
    if motion and jump >= COLOUR_JUMP and motion_leaves(c, MC_CLEAN_CONTRAST, MC_CLEAN_RESIDUAL):
        # Less steady sides, but a change the flow explains almost none of.
        return "unexplained jump"
    return None


def frame_spread(before: np.ndarray, after: np.ndarray) -> float:
    """The share of a 6x4 grid of blocks of ``after`` (a 48x27 copy; its last 3 rows left out)
    whose mean absolute change from ``before`` is at least a quarter of the whole frame's: 1.0
    when the change covers the picture, small when one thing in it changed (a character's pose
    jumping, a light turned on in a corner)."""
    change = cv2.absdiff(before, after)[:24].astype(np.float32).mean(axis=2)
    blocks = change.reshape(4, 6, 6, 8).mean(axis=(1, 3))
    mean = float(change.mean())
    if mean <= 0.0:
        return 0.0
    return float((blocks >= 0.25 * mean).mean())


def brightened(frames: np.ndarray, contrast: np.ndarray, reference: float) -> np.ndarray:
    """``frames`` (48x27 RGB, a run of the network) brightened by ``reference`` over their
    median ``contrast`` when that is under it (at most 1 / :data:`MIN_SCALE`), else as they are.

    TransNetV2 learnt cuts on footage of ordinary contrast; shown a night grade (a third of the
    contrast) it scored real cuts 0.1-0.5 on the looped movies. One gain for the whole run (an
    exposure change, about black, as a colourist would lift the scene) keeps the frames'
    differences in proportion, so nothing within the run looks like a change of light.
    """
    level = float(np.median(contrast)) if contrast.size else reference
    if level >= reference:
        return frames
    gain = min(reference / max(level, 1e-6), 1.0 / MIN_SCALE)
    return cv2.convertScaleAbs(frames.reshape(-1, frames.shape[-1]), alpha=gain).reshape(frames.shape)


def motion_leaves(c: Candidate, contrast: float, residual: float | None = None) -> bool:
    """Whether a change stays after motion compensation (the flow predicts at most
    ``1 - residual`` of it; :data:`MC_CUT_RESIDUAL` by default) and stands ``contrast`` times
    above the shot's own compensated change: what no camera motion explains. The rules that use
    it differ only in how clear that must be (accept at once, twice; weigh an unsure network;
    send an onset to it)."""
    return (
        c.motion_residual is not None
        and c.motion_contrast is not None
        and c.motion_residual >= (MC_CUT_RESIDUAL if residual is None else residual)
        and c.motion_contrast >= contrast
    )


def motion_explains(c: Candidate) -> bool:
    """Whether camera motion accounts for a candidate: the flow predicts most of the change
    (hard: from the frame before; gradual: over the lag) and, for a hard one, what it leaves is
    no bigger than in the frames around it. Flashes are left to the network."""
    if c.flash_like or c.motion_residual is None:
        return False
    if c.kind == "gradual":
        return c.motion_residual < MC_GRADUAL_RESIDUAL
    if c.motion_contrast is None:
        return False
    mostly = c.motion_residual < MC_MOTION_RESIDUAL and c.motion_contrast < MC_MOTION_CONTRAST
    partly = c.motion_residual < MC_PARTLY_RESIDUAL and c.motion_contrast < MC_PARTLY_CONTRAST
    return mostly or partly


def unsure_but_clear(
    c: Candidate, threshold: float, unsure: float, accept_colour: float | None, motion: bool = False
) -> str | None:
    """Why a hard candidate the network scored just under its threshold is a cut anyway (its
    colours jumped, or no motion explains its change), or None."""
    if (
        c.kind != "hard"
        or c.flash_like
        or c.model_score is None
        or not threshold - unsure <= c.model_score <= threshold
    ):
        return None
    if accept_colour is not None and c.colour_score >= accept_colour:
        return "network unsure, colours jumped"
    if motion and motion_leaves(c, MC_UNSURE_CONTRAST):
        return "network unsure, no motion explains it"
    return None


def run_context(queue: list[Candidate], first: int, last: int) -> int:
    """Frames of input either side of a run predicting ``first..last``: :data:`CONTEXT` when a
    gradual candidate needs a frame of it (a dissolve spans up to a second, and the network
    judges it from the frames around it), else :data:`HARD_CONTEXT` (a hard cut is judged from
    the frames next to it)."""
    gradual = any(
        c.kind == "gradual" and c.frame - MARGIN <= last and c.frame + MARGIN >= first for c in queue
    )
    return CONTEXT if gradual else HARD_CONTEXT


def closed_runs(wanted: list[tuple[int, int]], n: int, final: bool) -> list[tuple[int, int]]:
    """The runs of the network to start now, as inclusive frame intervals ``(first, last)`` to
    predict (the caller adds up to CONTEXT frames of input on each side, see :func:`run_context`;
    runs are planned for the larger context, so every frame either may need is decoded).

    ``wanted``: sorted, disjoint intervals of frames that candidates need and the network has
    not run. Intervals at most ``2 * CONTEXT`` frames apart are joined (predicting the frames
    between them costs no more than a second run's context), up to MAX_RUN frames. A run starts
    once its right context is decoded and either it is full (no candidate's interval of
    ``2 * MARGIN + 1`` frames fits any more) or no candidate still to come can join it (a
    candidate is proposed at most PROPOSE_DELAY frames late and wants frames from MARGIN before
    itself); at the end of the movie (``final``) every run starts. Pure, so the rule that no
    frame is predicted twice can be tested on its own.
    """
    # A wanted interval longer than a run (candidates every few frames) is cut into runs.
    wanted = [piece for lo, hi in wanted for piece in _pieces(lo, hi)]
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(wanted):
        first, last = wanted[i]
        i += 1
        capped = False
        while i < len(wanted) and wanted[i][0] - last <= 2 * CONTEXT + 1:
            if wanted[i][1] - first + 1 > MAX_RUN:
                capped = True
                break
            last = wanted[i][1]
            i += 1
        full = capped or last - first + 1 > MAX_RUN - (2 * MARGIN + 1)
        context_ready = n >= last + 1 + CONTEXT
        settled = n - PROPOSE_DELAY - MARGIN > last + 2 * CONTEXT + 1
        if final or (context_ready and (full or settled)):
            out.append((first, last))
    return out


def _pieces(lo: int, hi: int) -> list[tuple[int, int]]:
    return [(a, min(hi, a + MAX_RUN - 1)) for a in range(lo, hi + 1, MAX_RUN)]


#: Frames of input on each side of a run. The package's windows give every kept prediction
#: between 25 and 75; the network compares each frame with those up to 50 away, so a run's
#: scores move a little with its context. Before motion compensation, the package's minimum of
#: 25 moved three borderline verdicts of the 362 candidates the looped Hamilton movies sent to
#: the network (0.54, 0.50 and 0.28 fell to 0.48, 0.48 and 0.25), so 35 was used. With motion
#: compensation fewer, clearer candidates reach the network and where it is unsure the cheap
#: signals weigh too: 25 (with :data:`HARD_MARGIN`) found one real cut more and none fewer on
#: those movies (recall 0.974 -> 0.978, seed 1 unchanged), left the eval_shots table unchanged
#: and cost 31% fewer network frames than 35.
CONTEXT = PACKAGE_CONTEXT
#: Frames of input on each side of a run that only hard candidates need.
#: On the looped Hamilton movies (seeds 0, 1, 2) 16 instead of 25 gave the same cuts (recall,
#: precision unchanged on each) for 28% fewer network frames, and the eval_shots table's hard
#: cuts, flashes, fast pans and Hamilton rows were unchanged. Gradual candidates keep 25
#: (:func:`run_context`): before the last rules a dissolve of eval_shots was lost with 16 for
#: them too; at the final rules (int8) 16 everywhere moved no cut of eval_shots' clips (5
#: variants), so the 25 is a margin for transitions the network judges from further around.
HARD_CONTEXT = 16
FRAME = (27, 48, 3)
#: Frames of 48x27 RGB kept (1 MB per 256): a run and its context must fit.
RING = 512
#: The most frames one run of the network predicts (see :func:`closed_runs`). It bounds stage
#: 01's memory twice: the delay line holds ``lookahead`` decoded frames (1.4 MB each at 720p) and
#: ONNX Runtime's activations grow with the run (measured: +126 MB for an 87-frame input, +237
#: MB for 134, +430 MB for 270). At 200 stage 01 peaked at 1.3 GB on a 10-minute 720p movie;
#: at 64 the real loops cost 2-8% more network frames (more seams between runs).
MAX_RUN = 64
LAG = 8
BASE = 8
HARD_AHEAD = 8
#: Frames either side of a gradual candidate whose probabilities decide it (its middle is an
#: estimate); a hard candidate is placed to the frame, and the network's peak for a cut is the
#: frame before it, so 3 frames either side are enough there.
MARGIN = 8
HARD_MARGIN = 3
COHERENCE = 0.6
GRADUAL_RATIO = 1.3
HIST_BINS = 64
HIST_THRESHOLD = 0.25
HIST_RATIO = 3.0
GRADUAL_HIST = 0.3
GRADUAL_HIST_RATIO = 1.5
ACCEPT_RATIO = 4.0
COLOUR_JUMP = 15.0
STILL_JUMP = 20.0
STILL_RATIO = 5.0
#: "Quiet sides" (accept_at_once): on the real loops no non-cut hard candidate stood more than
#: 4.3x above its surroundings; the cuts between shots on one painted backdrop that TransNetV2
#: rejected stand 15-84x above them with jumps of 10-14 spread over 16-23 of the 24 blocks.
QUIET_JUMP = 8.0
QUIET_RATIO = 12.0
QUIET_SPREAD = 0.6
COLOUR_RATIO = 2.5
FLASH_RETURN = 0.5
FLOW_BORDER = 3
#: Motion-compensated rules (see accept_at_once, motion_explains), calibrated on the candidates
#: of the 10-minute 720p looped Hamilton movie (seed 0) and the synthetic clips of
#: ``python_script/eval_shots.py``: real hard cuts keep 0.72-1.12 of their change after
#: compensation and stand 2.3-33x above the compensated changes around them; hard candidates in
#: camera motion keep 0.17-0.79 and stand at most 6.2x. Real dissolves, fades and wipes keep
#: at least 0.63 over their lag (frame by frame or at once), motion proposed as gradual 0.04-0.57.
MC_CUT_RESIDUAL = 0.7
MC_CUT_CONTRAST = 8.0
MC_UNSURE_CONTRAST = 5.0
MC_ONSET_CONTRAST = 3.0
MC_MOTION_RESIDUAL = 0.5
MC_MOTION_CONTRAST = 2.0
#: The second motion rule: of the hard candidates the rules above still
#: sent to the network on the looped movies (seeds 0, 1 and 2; 164), the ones the flow explains
#: in good part (residual < 0.62) and that stand under 4x their neighbours were all camera
#: motion (43, every one rejected by the network too), while the real cuts among all hard
#: candidates kept at least 0.64 of their change (1st percentile 0.74) and those under 0.75
#: stood 4.1-16x above their neighbours.
MC_PARTLY_RESIDUAL = 0.62
MC_PARTLY_CONTRAST = 4.0
#: The second compensated accept rule (same movies and date): of those 164, the ones that kept
#: at least 0.82 of their change and stood 5x above their neighbours were 48 real cuts (2 of
#: which the network had rejected) and one non-cut next to another candidate (so never accepted
#: at once); the non-cuts closest to the rule kept 0.79-0.80 (5.8-7.3x).
MC_CLEAN_RESIDUAL = 0.82
MC_CLEAN_CONTRAST = 5.0
MC_GRADUAL_RESIDUAL = 0.45
#: The smallest contrast scale (see CascadeBoundaries, "Contrast"): a shot flatter than this share
#: of ``reference_contrast`` (a fade's last frames, black) is judged as if it had this much, so
#: noise in a near-black picture never makes a candidate.
MIN_SCALE = 0.25
#: The largest change of exposure between two frames that hard candidates see through (see
#: :func:`exposure_matched`): a gain either way and an offset in gray levels; and the contrast
#: (standard deviation of gray) under which a frame's gain is left as it is (black frames and
#: fades' ends, whose gain would only raise their noise).
EXPOSURE_GAIN = 1.15
EXPOSURE_OFFSET = 20.0
EXPOSURE_MIN_STD = 2.0
#: Pixels darker than this say nothing of a gain (their noise would) in :func:`exposure_change`.
EXPOSURE_MIN_GRAY = 16
#: A frame's exposure is matched by up to this many times the spread (median absolute deviation)
#: of the changes of exposure between the FLICKER_WINDOW pairs of frames before it (a flicker
#: drawn anew each frame changes by up to about 3.4 times its median between two frames).
FLICKER_SPAN = 3.0
FLICKER_WINDOW = 12
#: ...and only where the frames' mean turns from brightening to darkening or back (by more than
#: FLICKER_STEP gray levels a frame) at least FLICKER_TURNS times over those pairs: a frame
#: drawn anew each frame turns about every other one, a fade or an ordinary pan once or not at all.
FLICKER_TURNS = 4
FLICKER_STEP = 0.5
DECISIONS = ("accepted_fast", "rejected_fast", "confirmed", "rejected")
#: How late a candidate at frame c can still be proposed (gradual ones: 2.5 LAG frames).
PROPOSE_DELAY = max(HARD_AHEAD, 2 * LAG + LAG // 2)


#: The cascade's contrast scaling: around a candidate whose shots' contrast (standard deviation of
#: gray on the 48x27 copy, 0-128) is under this, the absolute thresholds scale with it.
REFERENCE_SHOT_CONTRAST = 30.0


@SHOT_DETECTORS.register
class CascadeSettings(TransNetV2Options):
    """``extract.detector: cascade`` (the default): cheap signals propose candidates, TransNetV2
    judges the doubtful ones (:class:`CascadeBoundaries`; docs/shot-detection.md)."""

    name: Literal["cascade"] = "cascade"
    #: A frame difference (0-255, mean absolute on the 48x27 copy) that proposes a hard cut ...
    candidate_threshold: float = Field(10.0, ge=0.0, le=255.0)
    #: ... when it is this many times the differences around it.
    candidate_ratio: float = Field(2.0, ge=1.0, le=100.0)
    #: A change over 8 frames that proposes a gradual transition (0-255).
    gradual_threshold: float = Field(10.0, ge=0.0, le=255.0)
    #: A clean jump this large is a cut without asking the network (null: every candidate is asked).
    accept_threshold: float | None = Field(40.0, ge=0.0, le=255.0)
    #: Where the network is unsure, a hard candidate whose colours changed this much (0-1) is a cut.
    accept_colour_threshold: float | None = Field(0.15, ge=0.0, le=1.0)
    #: Shots flatter than this contrast scale the absolute thresholds with it (null: never).
    reference_contrast: float | None = Field(REFERENCE_SHOT_CONTRAST, gt=0.0, le=128.0)
    #: How far under transnetv2_threshold the network's peak counts as unsure.
    transnetv2_unsure: float = Field(0.25, ge=0.0, lt=1.0)
    #: Reject candidates that motion explains (a pan, a zoom) before asking the network.
    motion_compensation: bool = True

    def build(self, fps: float, min_len: int, model: Any) -> CascadeBoundaries:
        return CascadeBoundaries(model, self, min_len, fps)
