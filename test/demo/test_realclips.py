"""The looped real-footage movie (demo/realclips.py): exact cut truth, every repeat new to the
duplicate search, deterministic by seed."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from paths import HAMILTON

from diffusion_bunny.demo import realclips
from diffusion_bunny.media.video import VideoReader
from diffusion_bunny.stages.quality.scores import hamming

pytestmark = pytest.mark.skipif(not HAMILTON.is_file(), reason=f"{HAMILTON} is absent (../shared/testdata)")


def test_loop_movie_has_exact_cuts_and_varied_repeats(tmp_path):
    params = realclips.Params(minutes=0.3, width=160, height=90, seed=3)
    movie = realclips.make_movie(params, tmp_path, HAMILTON)
    truth = json.loads(realclips.truth_path(movie).read_text())
    plans = truth["repeats"]
    assert len(plans) >= 2
    # Every shot start but the first is a cut: three inside each repeat, one at each junction.
    assert len(truth["cuts"]) == 4 * len(plans) - 1
    frames = [f.to_ndarray(format="gray") for f in _decode(movie)]
    assert len(frames) == truth["frames"]
    diffs = np.array([np.abs(frames[i].astype(int) - frames[i - 1]).mean() for i in range(1, len(frames))])
    at_cuts = diffs[np.array(truth["cuts"]) - 1]
    # A cut is a jump: it stands above the median frame-to-frame change of the movie.
    assert np.median(at_cuts) > 3 * np.median(diffs)
    # Each repeat was drawn until its probes were at least min_phash_distance from earlier ones.
    assert all(r["min_distance"] >= params.min_phash_distance for r in plans[1:])
    # Same seed, same plan (the cached file is reused; a fresh plan matches it).
    source = realclips.load_source(HAMILTON)
    again = realclips.plan_movie(params, source)
    assert [p.frames for p in again] == [sum(s["frames"] for s in r["shots"]) for r in plans]
    assert realclips.make_movie(params, tmp_path, HAMILTON) == movie


def _decode(movie):
    import av

    with av.open(str(movie)) as c:
        yield from c.decode(c.streams.video[0])


def test_probe_hashes_differ_between_repeats():
    """Two repeats of the clip are two pictures to stage 02's duplicate search: at every probed
    instant of every shot their pHashes lie farther apart than its ``dup_distance``. The margin
    is one an unaltered repeat fails: the same repeat rendered again lies at distance 0."""
    from diffusion_bunny.stages.quality.settings import QualitySettings

    dup_distance = QualitySettings().dup_distance
    source = realclips.load_source(HAMILTON)
    params = realclips.Params(minutes=0.3, width=160, height=90, seed=3)
    shots = source.shots()
    first = realclips.draw_repeat(0, params, shots, source.size)
    a = realclips.probe_hashes(source, first)
    b = realclips.probe_hashes(source, realclips.draw_repeat(1, params, shots, source.size))
    assert a.shape == (4, realclips.PROBES)
    assert int(hamming(a, realclips.probe_hashes(source, first)).max()) == 0
    assert int(hamming(a, b).min()) > dup_distance


def test_reader_sees_the_movie_at_its_size(tmp_path):
    params = realclips.Params(minutes=0.2, width=160, height=90, seed=4)
    movie = realclips.make_movie(params, tmp_path, HAMILTON)
    info = VideoReader(movie, 64).info
    assert (info.width, info.height) == (160, 90)


def test_a_shorter_loop_is_cut_from_a_longer_one_made_before(tmp_path, monkeypatch):
    """movie_of: a movie begins with every shorter one of its seed, so the benchmarks cut the
    10- and 30-minute loops from the 60-minute one instead of rendering each (half an hour)."""
    long_params = realclips.Params(minutes=0.3, width=160, height=90, seed=3)
    long_movie = realclips.movie_of(long_params, tmp_path)
    assert long_movie.name == f"{realclips.movie_name(long_params, HAMILTON)}.mp4"
    rendered = []
    monkeypatch.setattr(realclips, "make_movie", lambda *a, **k: rendered.append(a) or None)
    short = realclips.movie_of(realclips.Params(minutes=0.1, width=160, height=90, seed=3), tmp_path)
    assert not rendered and short.name.endswith("-first0.1min.mp4")
    truth = json.loads(realclips.truth_path(short).read_text())
    whole = json.loads(realclips.truth_path(long_movie).read_text())
    frames = len(list(_decode(short)))
    assert truth["frames"] == frames and 0.1 * 60 * 29.97 <= frames < whole["frames"]
    assert truth["cuts"] == [c for c in whole["cuts"] if c < frames] and truth["cut_from"] == long_movie.name
    # Same pixels as the long movie's first frames (stream copy, no re-encoding).
    a = [f.to_ndarray(format="gray") for f in _decode(short)]
    b = [f.to_ndarray(format="gray") for _, f in zip(range(frames), _decode(long_movie), strict=False)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # Another seed or size is not cut from it: it would be rendered.
    realclips.movie_of(realclips.Params(minutes=0.1, width=160, height=90, seed=4), tmp_path)
    realclips.movie_of(realclips.Params(minutes=0.1, width=320, height=180, seed=3), tmp_path)
    assert len(rendered) == 2


def test_a_whole_number_of_minutes_names_one_movie():
    # A movie made with minutes=60 is the one the benchmarks ask for with 60.0: rendering an hour
    # of 1080p again for a different spelling of the same number costs an hour on 2 cores.
    whole = realclips.released(realclips.Params(minutes=60, width=1920, height=1080, seed=0))
    assert realclips.movie_name(whole, HAMILTON) == realclips.movie_name(
        replace(whole, minutes=60.0), HAMILTON
    )
    assert realclips.movie_name(whole, HAMILTON) != realclips.movie_name(
        replace(whole, minutes=30.0), HAMILTON
    )


def test_an_old_print_flickers_frame_by_frame_and_names_its_own_movie(tmp_path):
    """The cut evaluation's old-film grade: each frame its own gain and lift within the bounds,
    drawn anew from frame to frame, with grain; a flickering loop is another movie."""
    flat = np.full((90, 160, 3), 100, np.uint8)
    means = [float(realclips.flicker_grade(flat, np.random.default_rng([1, i])).mean()) for i in range(40)]
    lo = 100 * (1 - realclips.FLICKER_GAIN) - realclips.FLICKER_LIFT
    hi = 100 * (1 + realclips.FLICKER_GAIN) + realclips.FLICKER_LIFT
    assert lo - 1 <= min(means) and max(means) <= hi + 1
    assert np.median(np.abs(np.diff(means))) > 3  # a still picture is not still
    one = realclips.flicker_grade(flat, np.random.default_rng(0)).astype(np.float32)
    assert 4 < float(one.std()) < 8  # grain of FLICKER_GRAIN gray levels
    source = tmp_path / "source.mp4"
    source.write_bytes(b"x" * 100)
    params = realclips.Params(minutes=1)
    assert realclips.movie_name(replace(params, flicker=True), source) != realclips.movie_name(params, source)


def test_an_old_lens_darkens_the_picture_inside_its_bars(tmp_path):
    """The picture-box evaluation's vignette: the picture's corners at cos(angle)^4 of its middle,
    the pillarbox bars around it still black, and a vignetted loop is another movie."""
    gain = realclips.vignette_gain(40, 30, np.pi / 4)
    assert gain.shape == (30, 40, 1) and gain.max() <= 1.0 and gain[15, 20, 0] > 0.99
    assert abs(float(gain[0, 0, 0]) - np.cos(np.pi / 4) ** 4) < 0.03  # the corner pixel's centre
    source = realclips.Source(np.full((4, 90, 160, 3), 200, np.uint8), Fraction(25), (0,))
    plan = realclips.plan_movie(realclips.Params(minutes=0.01, frames=("pillarbox",), light=0.0), source)[0]
    plain = realclips.Renderer(source, plan, (160, 90)).frame(plan.shots[0], 0)
    old = realclips.Renderer(source, plan, (160, 90), vignette=np.pi / 4).frame(plan.shots[0], 0)
    left, right = (160 - 120) // 2, (160 + 120) // 2
    assert old[:, :left].max() == 0 and old[:, right:].max() == 0
    middle = (slice(40, 50), slice(75, 85))
    assert abs(float(old[middle].mean()) - float(plain[middle].mean())) < 3
    corner = (slice(0, 4), slice(left, left + 4))
    assert float(old[corner].mean()) < 0.35 * float(plain[corner].mean())
    movie = tmp_path / "source.mp4"
    movie.write_bytes(b"x" * 100)
    params = realclips.Params(minutes=1)
    assert realclips.movie_name(replace(params, vignette=0.785), movie) != realclips.movie_name(params, movie)
