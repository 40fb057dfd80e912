"""A film as released (issue 29), built from the Hamilton clip and the knn photos by
:mod:`diffusion_bunny.demo.release` with its truth known by construction: letterboxed 2.40:1 in
1080p, an anamorphic PAL DVD, 10-bit PQ HDR and interlaced 576i variants, title cards and credits,
subtitles over one shot, a dark scene with a named face, an 8-frame insert.

Stage 01 is checked on every variant (square pixels, picture boxes, tone mapping, deinterlacing,
the cuts around a short shot); the exported dataset of the full pipeline is judged in
``test_the_exported_dataset_*``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from paths import TESTDATA

from diffusion_bunny.config import load_config
from diffusion_bunny.demo import release
from diffusion_bunny.stages.extract.stage import extract_frames

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """The four variants, built once for the module (about a minute on 2 cores)."""
    if not release.HAMILTON.is_file() or not (TESTDATA / "face_recognition_examples").is_dir():
        pytest.skip(f"real footage not available here: {TESTDATA} (it ships beside the project, not in it)")
    out = tmp_path_factory.mktemp("release")
    hamilton = release.load_hamilton()
    return {v: release.build_release(out, v, hamilton) for v in release.VARIANTS}


@pytest.fixture(scope="module")
def extracted(films, tmp_path_factory):
    """Stage 01 on every variant (progress off)."""
    cfg = load_config().extraction
    out = {}
    for name, movie in films.items():
        run = tmp_path_factory.mktemp(f"x-{name}")
        out[name] = (extract_frames(movie, cfg, run, progress=False), run)
    return out


def truth_of(movie: Path) -> dict:
    return json.loads(movie.with_suffix(".truth.json").read_text())


def comb(gray: np.ndarray) -> float:
    """Interlace combing: how much each line stands out from the two around it in the same
    direction (the zig-zag of two fields from different instants), mean over the picture."""
    g = gray.astype(np.float32)
    mid, up, down = g[1:-1], g[:-2], g[2:]
    return float(np.maximum(0.0, (mid - up) * (mid - down)).mean())


@pytest.mark.parametrize("variant", sorted(release.VARIANTS))
def test_every_cut_is_found_and_the_short_insert_keeps_both_its_cuts(extracted, films, variant):
    result, _ = extracted[variant]
    truth = truth_of(films[variant])
    shots = result.tables["shots"]
    found = shots["start_frame"].to_list()[1:]
    if variant == "interlaced":
        # A woven frame holds the next instant's field: the frame before a cut is already half
        # the new shot, and either frame is the cut.
        assert len(found) == len(truth["cuts"])
        assert all(c - 1 <= f <= c for f, c in zip(found, truth["cuts"], strict=True)), found
    else:
        assert found == truth["cuts"]
    # The 8-frame insert is a shot of its own, kept and marked, sampled for no frame.
    index = next(i for i, s in enumerate(truth["shots"]) if s["kind"] == "insert")
    row = shots.row(index, named=True)
    assert row["too_short"] and row["end_frame"] - row["start_frame"] == 8
    assert row["shot_id"] not in set(result.tables["frames"]["shot_id"].to_list())
    assert result.counts["too_short_shots"] == 1


@pytest.mark.parametrize("variant", sorted(release.VARIANTS))
def test_picture_boxes_hold_the_picture_and_no_bar(extracted, films, variant):
    result, run = extracted[variant]
    spec = release.VARIANTS[variant]
    left, top, right, bottom = spec.picture
    facts = result.facts
    assert (facts["width"], facts["height"]) == spec.display
    for shot in result.tables["shots"].iter_rows(named=True):
        box = (shot["box_left"], shot["box_top"], shot["box_right"], shot["box_bottom"])
        # Inside the picture (never a bar row), and losing at most 6 px of it on any side.
        assert left <= box[0] <= left + 6 and top <= box[1] <= top + 6, (shot, spec.picture)
        assert right - 6 <= box[2] <= right and bottom - 6 <= box[3] <= bottom, (shot, spec.picture)
    # The saved frames are the whole frame as shown; inside the box of a shot of the picture (not
    # a card on black) there is no black bar row.
    kinds = [s["kind"] for s in truth_of(films[variant])["shots"]]
    for row in result.tables["frames"].iter_rows(named=True):
        image = cv2.imread(str(run / row["path"]))
        assert (image.shape[1], image.shape[0]) == spec.display
        if kinds[row["shot_id"]] != "picture":
            continue
        picture = image[row["box_top"] : row["box_bottom"], row["box_left"] : row["box_right"]]
        rows_max = picture.max(axis=(1, 2))
        assert rows_max[0] > 30 and rows_max[-1] > 30, row["frame_id"]


def test_anamorphic_frames_are_stored_squeezed_and_shown_square(extracted):
    result, run = extracted["anamorphic"]
    facts = result.facts
    assert (facts["coded_width"], facts["coded_height"], facts["sample_aspect"]) == (704, 576, "16:11")
    assert (facts["width"], facts["height"]) == (1024, 576)
    film = release.Film(release.VARIANTS["anamorphic"], release.load_hamilton())
    row = result.tables["frames"].filter(result.tables["frames"]["shot_id"] == 3).row(0, named=True)
    saved = cv2.imread(str(run / row["path"]))[..., ::-1].astype(np.float32)
    truth = film.frame_at(row["frame_index"]).astype(np.float32)
    # The picture as shown (the squeeze undone): close to the film's own frame, and far from it
    # when the squeeze is not undone (stretched back naively it would still be 704 wide).
    assert np.abs(saved - truth).mean() < 8.0


def test_hdr_frames_are_tone_mapped_not_washed_out(extracted):
    result, run = extracted["hdr"]
    facts = result.facts
    assert facts["hdr"] == "pq" and facts["tone_mapped"] and facts["bit_depth"] == 10
    film = release.Film(release.VARIANTS["hdr"], release.load_hamilton())
    left, top, right, bottom = release.VARIANTS["hdr"].picture
    for row in result.tables["frames"].iter_rows(named=True):
        saved = cv2.imread(str(run / row["path"]))[top:bottom, left:right, ::-1].astype(np.float32)
        truth = film.frame_at(row["frame_index"])[top:bottom, left:right].astype(np.float32)
        # The SDR grade the HDR was made from comes back: same light and the same contrast...
        assert np.abs(saved - truth).mean() < 6.0, row["frame_id"]
        assert saved.std() > 0.9 * truth.std()
    # ...where reading the PQ code values as SDR gives the washed-out grey of a plain conversion.
    from diffusion_bunny.media import hdr

    sample = film.frame_at(result.tables["frames"]["frame_index"][0])[top:bottom, left:right]
    plain = hdr.sdr_to_hdr_rgb(sample) * 255
    assert plain.std() < 0.8 * sample.astype(np.float32).std()


def test_interlaced_video_is_detected_and_deinterlaced(films, extracted, tmp_path):
    result, run = extracted["interlaced"]
    facts = result.facts
    assert facts["deinterlaced"] and facts["field_order"] in ("tt", "tb")
    assert facts["interlace_check"]["tff"] > facts["interlace_check"]["progressive"]
    # The same frames without deinterlacing show the combing of two fields from two instants.
    woven = extract_frames(
        films["interlaced"], load_config().extraction.model_copy(update={"deinterlace": "off"}),
        tmp_path, progress=False,
    )  # fmt: skip
    assert not woven.facts["deinterlaced"]

    def combing(table, folder):
        # The performer's shots, where he moves (shots 3 and 6: lit and dark).
        rows = [r for r in table.iter_rows(named=True) if r["shot_id"] in (3, 6)]
        assert rows
        return np.mean([comb(cv2.imread(str(folder / r["path"]), cv2.IMREAD_GRAYSCALE)) for r in rows])

    assert combing(result.tables["frames"], run) < 0.5 * combing(woven.tables["frames"], tmp_path)


def test_progressive_sources_are_not_deinterlaced(extracted):
    for variant in ("sdr", "anamorphic", "hdr"):
        assert not extracted[variant][0].facts["deinterlaced"]
