"""The active picture of each shot: the box inside letterbox, pillarbox or windowbox bars.

A film as released often carries black bars in every frame (a 2.40:1 picture in a 1920x1080
frame has 140 px of black above and below). Everything after stage 01 must measure and export
the picture only: bars darken the brightness a frame is judged by, and a LoRA trained on images
with bars learns to draw bars. ffmpeg's ``cropdetect`` finds the box frame by frame against a
fixed black threshold; this module finds it per shot, from many frames, so that

* a dark scene, a fade or a black first frame does not shrink the box: a row belongs to the
  picture when it is lit in *any* sampled frame of the shot (:class:`ShotProfile` keeps the
  maximum lit share of every stored row and column, :func:`diffusion_bunny.media.video.luma_profiles`);
* a film that changes aspect (IMAX sequences, a pillarboxed archive insert) gets each shot's own
  box;
* content that merely touches the edge dark (a black night sky, burned-in subtitles sitting in
  the bottom bar) does not move the box: an edge is *confident* only where the picture starts
  with broadly lit rows, and a shot's own bars are believed only in symmetric pairs (bars are
  centred; a dark sky or a subtitle line is one-sided) or where they match the film's;
* a picture whose edges are dim (a lens or projector vignette, old film's dark frame edges) still
  has its box: a bar is black in every sampled frame, so where the picture is broadly lit
  somewhere and lit without a break from a black bar to the bar on its other side
  (:func:`_cliffs`), the bar's inner border is the picture's edge, however dim the picture is
  there; such an edge holds for its own shot, and for the film's box where it matches the box of
  a sample of the film taken a third of the way in.

:func:`decide_boxes` then gives every shot its box, axis by axis: its own confident, symmetric
edges; else the nearest shot's within a minute (a film changes aspect by scene, and a dark or
dim shot sits among lit ones of its scene); else the film's commonest box (the consensus of the
shots that were confident); else the full frame. A shot that is black throughout has no box of
its own and takes one the same way, and is counted so stage 01 can warn.

Pure over arrays: stage 01 feeds the profiles while it decodes and calls :func:`decide_boxes`
once at the end of its pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from diffusion_bunny.media.video import ShotProfile

#: A row (column) is where the picture starts when at least this share of its pixels is lit in
#: some sampled frame of the shot.
EDGE_LIT = 0.25
#: An edge is confident when the few rows from it inward are this broadly lit: the picture
#: starts there, not a subtitle line (text lights 10-35% of a row) or a dim corner.
CONFIDENT_LIT = 0.4
#: Rows from the edge inward that must be broadly lit for a confident edge.
CONFIDENT_ROWS = 3
#: A shot is black throughout when no row has even this share of lit pixels in any frame (a
#: title on black lights a few per cent of its rows: it is not black, its box is the film's).
ANY_LIT = 0.005
#: Two bars are symmetric (or a box matches another) within this share of the frame's side,
#: and never less than :data:`MIN_TOLERANCE_PX` stored pixels.
TOLERANCE = 0.01
MIN_TOLERANCE_PX = 4
#: A box narrower or lower than this share of the frame is a logo or a title on black, not a
#: picture: such edges are not believed.
MIN_SIDE = 0.25
#: A bar is black in every sampled frame of its shot: at most this share of a bar's row (codec
#: specks) is ever lit.
BAR_LIT = 0.01
#: Between its bars, a picture with dim edges (a vignette) lights at least this share of every row
#: in some sampled frame: the Hamilton clip's dark stage cut to 4:3 and vignetted (FFmpeg's
#: ``vignette=PI/4``, corners at a quarter) lit 8-13% of its outermost columns.
CLIFF_LIT = 0.05
#: How far inward from a lit edge that is not confident a line of text in a bar is looked past
#: (:func:`_past_text`), as a share of the axis: a 2.40:1 picture's bar is 13% of a 16:9
#: frame's height, 22% of a 4:3 one's.
TEXT_REACH = 0.25
#: Stored pixels trimmed inward at an edge that has a bar: the row where a bar meets the picture
#: is a blend of both (codec ringing, chroma bleed), and a thin dark line at the border of every
#: exported image is what this module exists to prevent.
EDGE_TRIM = 2


@dataclass(frozen=True)
class Edges:
    """One axis of a shot's own box, in stored pixels: ``start`` inclusive, ``end`` exclusive,
    whether each edge is confident, whether anything was lit at all, and whether an edge was
    found only at a bar's border (:func:`_cliffs`: believed for this shot, never lent to others)."""

    start: int
    end: int
    start_ok: bool
    end_ok: bool
    lit: bool
    cliff: bool = False

    @property
    def confident(self) -> bool:
        return self.lit and self.start_ok and self.end_ok


def _confident(profile: np.ndarray, edge: int, step: int) -> bool:
    if step > 0:
        inner = profile[edge : edge + CONFIDENT_ROWS]
    else:
        inner = profile[max(0, edge - CONFIDENT_ROWS + 1) : edge + 1]
    return inner.size > 0 and float(inner.min()) >= CONFIDENT_LIT


def _cliffs(profile: np.ndarray) -> tuple[int | None, int | None]:
    """The inner borders of the bars at the start and at the end of an axis (the first and the
    last picture row, each None where there is no bar), when the picture runs lit without a break
    from one border to the other; else ``(None, None)``.

    Why: a vignette or old film's dark frame edge dims the picture's outer rows under
    :data:`CONFIDENT_LIT` (and under :data:`EDGE_LIT`: the box shrank inward), so no edge was
    confident and a pillarboxed film kept its bars. What a bar is does not depend on the picture's
    light: black in every sampled frame (:data:`BAR_LIT`), then picture lit in every row
    (:data:`CLIFF_LIT`) up to the bar on the other side. A static title on black leaves black
    between its letters; scrolling credits (their rows lit in one frame or another) or a
    subtitle plate reaching into the bars can still pass, so an edge found so is believed only
    for its own shot, in symmetric pairs or where it matches the film's (:func:`_own`), is
    never lent to a neighbour, and counts for the film's box only where it matches the box of a
    sample of the film taken before (:func:`consensus`, :func:`sample_box`)."""
    seen = np.flatnonzero(profile > BAR_LIT)
    if seen.size == 0:
        return None, None
    first, last = int(seen[0]), int(seen[-1])
    # The border rows themselves may blend bar and picture (codec ringing): judged inside them.
    inner = profile[first + 1 : last]
    if inner.size < CONFIDENT_ROWS or float(inner.min()) < CLIFF_LIT:
        return None, None
    return (first if first > 0 else None), (last if last < profile.size - 1 else None)


def _past_text(profile: np.ndarray, edge: int, inward: int) -> int | None:
    """The picture's edge inside a bar that carries text: from a lit ``edge`` that is not
    confident, past the text and at least one black row (the bar between the text and the
    picture), the first confident edge within :data:`TEXT_REACH` of the axis; None where there
    is no such edge.

    Why: a release subtitled in its bottom bar (common for 2.39:1 films) lights rows of the bar
    (a bold line lit 43% of its busiest rows on the Hamilton clip), so the bottom's lit edge was
    the subtitle's, not confident, and the whole axis was thrown away with it, the confident top
    included: a clip subtitled throughout kept both bars in every exported picture. The box
    this gives is still believed only in symmetric pairs or where it matches the film's
    (:func:`_own`), so a dark band inside a picture with no bar opposite it is not cut off."""
    n = profile.size
    dark = False
    i = edge
    for _ in range(round(TEXT_REACH * n)):
        if not 0 <= i < n:
            return None
        if profile[i] <= BAR_LIT:
            dark = True
        elif dark and profile[i] >= EDGE_LIT and _confident(profile, i, inward):
            return i
        i += inward
    return None


def own_edges(profile: np.ndarray | None) -> Edges:
    """Where the picture starts and ends along one axis of a shot (rows or columns): where it is
    broadly lit (:data:`EDGE_LIT`), past a line of text in a bar (:func:`_past_text`), or at the
    inner border of a bar it runs lit from (:func:`_cliffs`) when that broadly lit edge is not
    confident."""
    if profile is None or profile.size == 0:
        return Edges(0, 0, False, False, False)
    n = profile.size
    lit = np.flatnonzero(profile >= EDGE_LIT)
    if lit.size == 0:
        return Edges(0, n, False, False, bool(profile.max() >= ANY_LIT))
    start, last = int(lit[0]), int(lit[-1])
    start_ok, end_ok = _confident(profile, start, 1), _confident(profile, last, -1)
    if not start_ok and (inner := _past_text(profile, start, 1)) is not None:
        start, start_ok = inner, True
    if not end_ok and (inner := _past_text(profile, last, -1)) is not None:
        last, end_ok = inner, True
    cliff = False
    if not (start_ok and end_ok):
        first, final = _cliffs(profile)
        if not start_ok and first is not None:
            start, start_ok, cliff = first, True, True
        if not end_ok and final is not None:
            last, end_ok, cliff = final, True, True
    end = last + 1
    big_enough = end - start >= MIN_SIDE * n
    return Edges(start, end, big_enough and start_ok, big_enough and end_ok, True, cliff)


def _tolerance(n: int) -> int:
    return max(MIN_TOLERANCE_PX, round(TOLERANCE * n))


def symmetric(edges: Edges, n: int) -> bool:
    """The two bars of an axis are about as thick as each other (centred picture)."""
    return abs(edges.start - (n - edges.end)) <= _tolerance(n)


def _matches(pair: tuple[int, int], other: tuple[int, int] | None, n: int) -> bool:
    tol = _tolerance(n)
    return other is not None and abs(pair[0] - other[0]) <= tol and abs(pair[1] - other[1]) <= tol


def consensus(
    axes: list[tuple[Edges, int]], n: int, witness: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """The film's commonest (start, end) along one axis among the shots whose edges there are
    confident and symmetric, weighted by their frame counts; None when no shot qualifies.
    Positions within the tolerance of each other vote together. An edge found at a bar's border
    alone (:func:`_cliffs`) votes only where it matches ``witness``, the box of a sample of the
    film taken before (:func:`sample_box`: a third of the way in, past the opening's logos and
    before the credits)."""
    tol = _tolerance(n)
    votes: Counter[tuple[int, int]] = Counter()
    examples: dict[tuple[int, int], tuple[int, int]] = {}
    for edges, weight in axes:
        if not edges.confident or not symmetric(edges, n):
            continue
        if edges.cliff and not _matches((edges.start, edges.end), witness, n):
            continue
        key = (round(edges.start / tol), round(edges.end / tol))
        votes[key] += weight
        examples.setdefault(key, (edges.start, edges.end))
    if not votes:
        return None
    key, _ = votes.most_common(1)[0]
    return examples[key]


@dataclass
class BoxDecision:
    """The boxes of a movie's shots in stored pixels, and how each was decided."""

    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    film: tuple[int, int, int, int] | None = None

    @property
    def black_shots(self) -> int:
        return sum(1 for s in self.sources if s.startswith("black"))


def _own(edges: Edges, film: tuple[int, int] | None, n: int) -> tuple[int, int] | None:
    """An axis of a shot's own box when it can be believed: confident edges, symmetric bars or
    the film's own bars."""
    pair = (edges.start, edges.end)
    if edges.confident and (symmetric(edges, n) or _matches(pair, film, n)):
        return pair
    return None


def _neighbour(
    owns: list[tuple[int, int] | None], times: list[float], i: int, window_s: float
) -> tuple[int, int] | None:
    """The believed axis of the nearest shot before or after shot ``i`` within ``window_s``
    seconds (the nearer one when both sides have one and they differ)."""
    before = next((j for j in range(i - 1, -1, -1) if owns[j] is not None), None)
    after = next((j for j in range(i + 1, len(owns)) if owns[j] is not None), None)
    found = [
        (abs(times[j] - times[i]), owns[j])
        for j in (before, after)
        if j is not None and abs(times[j] - times[i]) <= window_s
    ]
    return min(found, key=lambda x: x[0])[1] if found else None


def _trim(pair: tuple[int, int], n: int) -> tuple[int, int]:
    start, end = pair
    if start > 0:
        start = min(start + EDGE_TRIM, n)
    if end < n:
        end = max(end - EDGE_TRIM, start)
    return start, end


#: A shot without a believable box of its own takes its neighbours' (a film changes aspect by
#: scene: an IMAX sequence, an archive insert), looked for this many seconds around it, before
#: the film's commonest box.
NEIGHBOUR_S = 60.0


def decide_boxes(
    profiles: list[ShotProfile],
    weights: list[int],
    size: tuple[int, int],
    times: list[float] | None = None,
    witness: tuple[int, int, int, int] | None = None,
) -> BoxDecision:
    """Every shot's picture box ``(left, top, right, bottom)`` in stored pixels (see the module
    docstring), with its source: ``own`` (both axes its own), ``near`` (an axis from the nearest
    shot with a box of its own within :data:`NEIGHBOUR_S` of ``times``, the shots' start times),
    ``film`` / ``full`` (an axis taken from the film's consensus / the frame), ``black`` (nothing
    lit: the neighbours', the film's or the full frame). ``witness``: the box of the film's sample
    (:func:`sample_box`), which edges found at a bar alone must match to count for the film."""
    width, height = size
    times = times if times is not None else [float(i) for i in range(len(profiles))]
    rows = [own_edges(p.rows) for p in profiles]
    cols = [own_edges(p.cols) for p in profiles]
    seen_h, seen_v = ((witness[0], witness[2]), (witness[1], witness[3])) if witness else (None, None)
    film_v = consensus(list(zip(rows, weights, strict=True)), height, seen_v)
    film_h = consensus(list(zip(cols, weights, strict=True)), width, seen_h)
    decision = BoxDecision()
    if film_v is not None or film_h is not None:
        (x0, x1), (y0, y1) = _trim(film_h or (0, width), width), _trim(film_v or (0, height), height)
        decision.film = (x0, y0, x1, y1)
    own_v = [_own(r, film_v, height) if r.lit else None for r in rows]
    own_h = [_own(c, film_h, width) if c.lit else None for c in cols]
    # What a shot may lend its neighbours: not an edge found at a bar's border alone (scrolling
    # credits or a subtitle plate reaching into the bars can pass for a dim picture there).
    lend_v = [None if r.cliff else own for r, own in zip(rows, own_v, strict=True)]
    lend_h = [None if c.cliff else own for c, own in zip(cols, own_h, strict=True)]
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        picked = []
        for owns, lend, film, n in ((own_v, lend_v, film_v, height), (own_h, lend_h, film_h, width)):
            near = _neighbour(lend, times, i, NEIGHBOUR_S)
            if owns[i] is not None:
                picked.append((owns[i], "own"))
            elif near is not None:
                picked.append((near, "near"))
            elif film is not None:
                picked.append((film, "film"))
            else:
                picked.append(((0, n), "full"))
        (top, bottom), vs = _trim(picked[0][0], height), picked[0][1]
        (left, right), hs = _trim(picked[1][0], width), picked[1][1]
        decision.boxes.append((left, top, right, bottom))
        # A shot of 1-3 frames may hold no profiled frame (every 4th is): not seen, not black.
        if not r.lit and not c.lit and profiles[i].samples:
            decision.sources.append(
                f"black ({'full' if vs == hs == 'full' else 'near' if 'near' in (vs, hs) else 'film'})"
            )
        elif vs == hs == "own":
            decision.sources.append("own")
        else:
            decision.sources.append(next(k for k in ("near", "film", "full") if k in (vs, hs)))
    return decision


def to_display(
    box: tuple[int, int, int, int], stored: tuple[int, int], upright: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A box in stored pixels scaled to the upright (square-pixel) picture, its inner edges
    rounded inward to even pixels (chroma-aligned, never a bar pixel more); an edge at the
    frame's border stays there."""
    sx, sy = upright[0] / stored[0], upright[1] / stored[1]
    left, top, right, bottom = box

    def inward(lo: float, hi: float, n: int) -> tuple[int, int]:
        # An edge at the frame's own border stays there: on an odd size (321x181) rounding it
        # cost the picture a pixel, which read as a bar ("picture 320x180 inside bars").
        a = 0 if lo <= 1e-9 else min(n, int(np.ceil(lo / 2 - 1e-9)) * 2)
        b = n if hi >= n - 1e-9 else max(a, int(np.floor(hi / 2 + 1e-9)) * 2)
        return a, min(b, n)

    x0, x1 = inward(left * sx, right * sx, upright[0])
    y0, y1 = inward(top * sy, bottom * sy, upright[1])
    return x0, y0, x1, y1


def sample_box(
    sample: tuple[np.ndarray, np.ndarray] | None, size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The picture box of a sample of the film, ``(left, top, right, bottom)`` in stored pixels,
    or None where it has none to believe: frames from a third of the way in (``sample``: their
    rows' and columns' most lit shares,
    :class:`~diffusion_bunny.media.video.VideoReader`'s ``sample``), on each axis whose edges are
    confident and symmetric there (:func:`own_edges`, a bar's border included), the full side on
    any other. Known before the pass and taken where the film is the film (past its logos,
    before its credits; a film under ~15 s is sampled from its start), it is the witness an edge
    found at a bar alone must match to count for the film's box (:func:`consensus`)."""
    if sample is None:
        return None
    rows, cols = sample
    width, height = size
    if rows.size != height or cols.size != width:
        return None
    pairs = []
    for profile, n in ((cols, width), (rows, height)):
        edges = own_edges(profile)
        believed = edges.confident and symmetric(edges, n)
        pairs.append((edges.start, edges.end) if believed else (0, n))
    (left, right), (top, bottom) = pairs
    if (left, top, right, bottom) == (0, 0, width, height):
        return None
    return left, top, right, bottom
