"""HDR tone mapping against the standards' published values, not against its own constants.

PQ is SMPTE ST 2084 (ITU-R BT.2100 table 4), HLG is ARIB STD-B67 (BT.2100 table 5); the
reference levels are ITU-R BT.2408's: HDR reference white at 203 cd/m2 is a PQ signal of 58% and
an HLG signal of 75% (on a 1000 cd/m2 display, system gamma 1.2); 100 cd/m2 is PQ 51%, 1000 cd/m2
PQ 75%. The constants below are typed from the standards as they print them (rationals for PQ),
so a wrong constant in ``media/hdr.py`` fails here."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_bunny.media import hdr

# ST 2084 as BT.2100 prints it.
M1, M2 = 2610 / 16384, 2523 / 4096 * 128
C1, C2, C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
# ARIB STD-B67 as BT.2100 prints it.
A, B, C = 0.17883277, 0.28466892, 0.55991073


def st2084_eotf(e: np.ndarray) -> np.ndarray:
    p = np.power(e, 1 / M2)
    return 10000.0 * np.power(np.maximum(p - C1, 0) / (C2 - C3 * p), 1 / M1)


def test_the_pq_curve_is_st2084():
    codes = np.linspace(0.0, 1.0, 101)
    assert np.allclose(hdr.pq_to_nits(codes), st2084_eotf(codes), rtol=1e-6, atol=1e-9)
    # The decimal constants BT.2100 prints beside the rationals.
    assert pytest.approx(0.1593017578125) == M1 and pytest.approx(78.84375) == M2
    assert pytest.approx((0.8359375, 18.8515625, 18.6875)) == (C1, C2, C3)
    # BT.2408's signal levels (as the percentages it publishes).
    assert hdr.nits_to_pq(203.0) == pytest.approx(0.58, abs=0.005)
    assert hdr.nits_to_pq(100.0) == pytest.approx(0.508, abs=0.001)
    assert hdr.nits_to_pq(1000.0) == pytest.approx(0.752, abs=0.001)
    assert hdr.nits_to_pq(10000.0) == pytest.approx(1.0)
    assert hdr.pq_to_nits(np.array(0.5)) == pytest.approx(92.2, abs=0.1)
    # The inverse is one.
    nits = np.array([0.01, 1.0, 48.0, 203.0, 1000.0, 4000.0])
    assert np.allclose(hdr.pq_to_nits(hdr.nits_to_pq(nits)), nits, rtol=1e-6)


def test_the_hlg_curve_is_arib_std_b67():
    assert pytest.approx((hdr._HLG_A, hdr._HLG_B, hdr._HLG_C), abs=1e-8) == (A, B, C)
    # b = 1 - 4a and c = 0.5 - a ln(4a): the curve's two halves meet at E = 1/12, E' = 0.5.
    assert pytest.approx(1 - 4 * A, abs=1e-8) == B and pytest.approx(0.5 - A * np.log(4 * A), abs=1e-8) == C
    assert hdr.scene_to_hlg(np.array(1 / 12)) == pytest.approx(0.5)
    assert hdr.scene_to_hlg(np.array(1.0)) == pytest.approx(1.0, abs=1e-6)
    assert hdr.scene_to_hlg(np.array(0.02)) == pytest.approx(np.sqrt(3 * 0.02))
    assert hdr.scene_to_hlg(np.array(0.25)) == pytest.approx(A * np.log(12 * 0.25 - B) + C)
    scene = np.linspace(0.0, 1.0, 101)
    assert np.allclose(hdr.hlg_to_scene(hdr.scene_to_hlg(scene)), scene, atol=1e-7)
    # BT.2408: an HLG signal of 75% is reference white, 203 cd/m2 on a 1000 cd/m2 display.
    assert 1000.0 * hdr.hlg_to_scene(np.array(0.75)) ** 1.2 == pytest.approx(203.0, abs=1.0)


@pytest.mark.parametrize(("transfer", "signal"), [("pq", 0.58), ("hlg", 0.75)])
def test_tone_mapping_keeps_shadows_and_mid_tones_and_rolls_off_the_highlights(transfer, signal):
    """An SDR grade placed in HDR as BT.2408 places it (SDR white at reference white) comes back:
    shadows and mid-tones to the level, highlights rolled off by BT.2390's EETF, which lands the
    display's 1000 cd/m2 peak on SDR white and so reference white a little under it; brighter
    in, brighter out."""
    levels = np.arange(0, 256, dtype=np.uint8)
    picture = np.repeat(levels[None, :, None], 3, axis=2)
    back = hdr.tone_map_rgb(hdr.sdr_to_hdr_rgb(picture, transfer), transfer)[0, :, 0].astype(int)
    assert np.abs(back[6:181] - levels[6:181]).max() <= 1
    assert np.abs(back[:6] - levels[:6]).max() <= 3  # the tables' steps at the curves' toe
    assert np.all(np.diff(back) >= 0) and back[255] > back[200] > back[180]
    white = int(hdr.tone_map_rgb(np.full((2, 2, 3), signal, np.float32), transfer)[0, 0, 0])
    assert 0.85 * 255 <= white < 255
    # The same reference white through both transfers is the same SDR level.
    assert white == int(back[255])


@pytest.mark.parametrize("transfer", ["pq", "hlg"])
def test_a_graded_picture_comes_back_through_either_transfer(transfer):
    rng = np.random.default_rng(0)
    sdr = rng.integers(0, 181, (32, 48, 3), dtype=np.uint8)  # under the roll-off
    back = hdr.tone_map_rgb(hdr.sdr_to_hdr_rgb(sdr, transfer), transfer)[..., ::-1]
    assert np.abs(back.astype(int) - sdr.astype(int)).mean() < 1.0
