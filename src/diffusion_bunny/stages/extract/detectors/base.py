"""Shot-boundary detectors fed one frame at a time from stage 01's single decode pass.

Each detector takes the small BGR copy of every decoded frame (:meth:`push`) and reports the
boundaries it has become sure of, as the index of the first frame of a new shot, at most
:attr:`lookahead` frames after that frame; stage 01 delays its frames by that much, so a late
answer still splits the shots at the right frame. Three kinds:

* :class:`SceneDetectBoundaries`: a PySceneDetect detector (``content``, ``adaptive``, ...).
* :class:`TransNetV2Boundaries`: TransNetV2 on every frame, with the network's own windowing
  (:class:`~diffusion_bunny.stages.extract.detectors.transnet.WindowedPredictor`). Accurate, but
  on two CPU cores it runs
  at 130-180 frames/s, several times slower than decoding.
* :class:`CascadeBoundaries` (the default): cheap signals on the 48x27 frames propose
  candidates with high recall, TransNetV2 looks only at windows around the ones that are not
  clear-cut, so its cost grows with the number of doubtful candidates, not with the length of
  the movie. See the class for the rules.

How a transition becomes a boundary (both TransNetV2 detectors): the frames whose single-frame
probability exceeds ``transnetv2_threshold`` form runs; each run gives one boundary, the frame
after its most probable frame. For a hard cut the network peaks on the last frame of the old
shot, so the boundary is the first frame of the new one; for a dissolve or fade it peaks in the
middle of the transition, so the transition's frames are split between the two shots at its
middle. A boundary is never dropped to satisfy a minimum shot length (on 10 minutes
of varied real footage that rule lost 20 real cuts, each after a shot of a few frames, and the
merged shots mixed two pictures); stage 01 keeps such a short shot, marks it ``too_short`` and
samples no frame from it. One exception, which is no shot at all: the dip of a fade through black
(or white). TransNetV2 sees the fade out and the fade in as two transitions; when the frames
between two boundaries closer than ``min_shot_seconds`` include a blank frame (nearly uniform:
:data:`BLANK_STD`), the second boundary is the same transition's and is not released.
"""

from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np

from diffusion_bunny.registry import DetectorSettings

#: A run of probabilities over the threshold longer than this is closed by force, so the delay
#: stays bounded; at 24-30 fps this is longer than any ordinary dissolve's peak.
MAX_RUN = 48
#: A frame whose 48x27 copy has a standard deviation under this (0-255) is blank: black, white
#: or one flat colour, as the bottom of a fade or a flash is. Real pictures, even dark ones (the
#: Hamilton clip's stage: 20-35), stand far above it.
BLANK_STD = 6.0


def shortest_shot(min_shot_seconds: float, fps: float) -> tuple[int, float]:
    """``extract.min_shot_seconds`` in frames at the nominal (average) rate, and in seconds of
    presentation time: the frames less half a frame.

    A shot is judged by its real length (the time from its first frame to the next shot's): on
    variable-frame-rate footage a count of frames at the average rate is no length (a 0.93 s shot
    at 15 fps in a film averaging 49 fps was 14 frames against 25, marked too short). Half a
    frame below the frame count, a constant-rate shot of n frames is judged as by its count
    whatever the rounding of its timestamps, so such footage gives the shots it gave."""
    frames = max(1, round(min_shot_seconds * fps))
    return frames, frames_as_seconds(frames, fps)


def frames_as_seconds(frames: int, fps: float) -> float:
    """A minimum of ``frames`` at the nominal rate as presentation time (:func:`shortest_shot`)."""
    return (frames - 0.5) / fps


class Blankness:
    """Which recent frames were blank (see :data:`BLANK_STD`), and when they are shown where
    the caller says, by position, for :class:`InOrder`."""

    def __init__(self, keep: int):
        self.keep = keep
        self.blank: dict[int, bool] = {}
        self.times: dict[int, float] = {}

    def add(self, position: int, small: np.ndarray, time_s: float | None = None) -> None:
        # It runs on every decoded frame, on the thread that also feeds the decoder: OpenCV's
        # one-pass deviation over all channels costs a few microseconds where numpy's std()
        # cost about a tenth of a millisecond, and the oldest positions leave from the front of
        # the (insertion-ordered) dictionary instead of the whole of it being scanned each time
        # (together 2 s of a 10-minute 720p film's pass).
        self.blank[position] = float(cv2.meanStdDev(small.reshape(-1, 1))[1][0, 0]) < BLANK_STD
        if time_s is not None:
            self.times[position] = time_s
        while (oldest := next(iter(self.blank))) < position - self.keep:
            del self.blank[oldest]
            self.times.pop(oldest, None)

    def any_blank(self, start: int, stop: int) -> bool:
        """Whether a frame in ``[start, stop)`` was blank (unknown frames are not)."""
        return any(self.blank.get(t, False) for t in range(start, stop))


class InOrder:
    """Holds boundaries found out of order until no earlier one can still come, then releases
    them in frame order (one per frame), except the second boundary of a dip (see the module
    docstring: shorter than ``min_len`` after the previous one with a blank frame between).

    With ``fps`` (the nominal rate) "shorter" is in presentation time, where the frames' times
    are known (:func:`shortest_shot`): a variable-rate shot over ``min_shot_seconds`` in fewer
    frames than ``min_len`` is a shot, not a dip. A frame whose time is forgotten is judged by
    the count."""

    def __init__(
        self, lookahead: int, min_len: int = 0, blankness: Blankness | None = None, fps: float | None = None
    ):
        self.lookahead = lookahead
        self.min_len = min_len
        self.min_s = frames_as_seconds(min_len, fps) if fps and min_len else None
        self.blankness = blankness
        self.held: dict[int, float] = {}
        self.last = 0
        self.emitted: list[int] = []
        self.dips = 0

    def add(self, frame: int, score: float) -> None:
        self.held[frame] = max(score, self.held.get(frame, 0.0))

    def release(self, upto: int | None) -> list[int]:
        out = []
        for frame in sorted(self.held):
            if upto is not None and frame > upto:
                break
            del self.held[frame]
            if frame <= self.last:
                continue
            if (
                self.blankness is not None
                and self._short(frame, self.blankness)
                and self.blankness.any_blank(self.last, frame)
            ):
                self.dips += 1
                continue
            out.append(frame)
            self.last = frame
        self.emitted += out
        return out

    def _short(self, frame: int, blankness: Blankness) -> bool:
        """Whether the shot from the last boundary to ``frame`` is shorter than the minimum."""
        if self.min_s is not None:
            start, end = blankness.times.get(self.last), blankness.times.get(frame)
            if start is not None and end is not None:
                return end - start < self.min_s
        return frame - self.last < self.min_len


class RunTracker:
    """Turns probabilities that arrive in frame order into boundaries (one per run over the
    threshold: the frame after its peak)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.best: tuple[float, int] | None = None
        self.length = 0

    def feed(self, index: int, p: float) -> tuple[int, float] | None:
        if p > self.threshold:
            if self.best is None or p > self.best[0]:
                self.best = (p, index)
            self.length += 1
            if self.length < MAX_RUN:
                return None
        return self.close()

    def close(self) -> tuple[int, float] | None:
        best, self.best, self.length = self.best, None, 0
        if best is None:
            return None
        return best[1] + 1, best[0]


class Boundaries:
    """Common interface of the detectors (see the module doc)."""

    name = "base"
    lookahead = 0

    def push(
        self, index: int, small_bgr: np.ndarray, time_s: float | None = None
    ) -> list[int]:  # pragma: no cover - interface
        """Take the frame ``index`` (shown at ``time_s``, where known) and return the boundaries
        now sure."""
        raise NotImplementedError

    def finish(self, last_index: int) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def facts(self) -> dict[str, Any]:
        """What the manifest records about the detection."""
        return {"detector": self.name}

    def candidate_rows(self) -> list[dict[str, Any]]:
        """Per-candidate scores (cascade only)."""
        return []


class ShotDetectorSettings(DetectorSettings):
    """A shot detector's own settings (``extract.detector``): each detector module subclasses it,
    with its defaults, and registers it once (``@SHOT_DETECTORS.register``)."""

    #: Whether the detector needs the TransNetV2 model (stage 01 then loads it in the background).
    uses_transnetv2: ClassVar[bool] = False
    #: Whether it needs the model from its first frames (so loading starts with the pass) rather
    #: than at its first doubtful candidate.
    needs_model_at_once: ClassVar[bool] = False

    @property
    def threshold_in_force(self) -> float:
        """The threshold the detector decides a cut by (for the manifest and notebook 01)."""
        raise NotImplementedError

    def build(self, fps: float, min_len: int, model: Any) -> Boundaries:
        """The detector for a movie at ``fps``, keeping shots of at least ``min_len`` frames at
        that rate (:func:`shortest_shot`; ``model``: the TransNetV2 handle where
        :attr:`uses_transnetv2`, else None)."""
        raise NotImplementedError
