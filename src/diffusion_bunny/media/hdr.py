"""HDR video (PQ or HLG, BT.2020) tone-mapped to SDR pictures (BT.709, 8 bits).

A frame of a 10-bit PQ movie converted as if it were SDR comes out washed-out grey: PQ spends
half of its code values on highlights no SDR picture has, so a face at 100 nits sits at code 0.5
instead of 0.8, and BT.2020's wide primaries read as BT.709 lose their saturation. Players
tone-map instead; so does this module, for every frame stage 01 stores:

1. limited-range Y'CbCr (BT.2020 non-constant luminance) to R'G'B';
2. the transfer function undone: PQ (SMPTE ST 2084) to absolute nits, or HLG (ARIB STD-B67)
   through its inverse OETF and its OOTF (system gamma 1.2 on a 1000-nit display);
3. BT.2390's EETF (the curve ITU-R recommends and mpv's ``bt.2390`` applies), on the maximum of
   R, G and B so hues stay: everything under the knee is left as it is, highlights between the
   knee and the source peak are rolled off smoothly into the SDR range, whose white is HDR
   reference white (203 nits, ITU-R BT.2408);
4. BT.2020 primaries to BT.709 (the linear 3x3 matrix; out-of-gamut values clipped);
5. BT.1886's inverse (gamma 1/2.4), as SDR video is encoded.

Written here because the FFmpeg inside PyAV has ``tonemap`` but neither ``zscale`` nor
``libplacebo`` to bring PQ into linear light first, and ``colorspace`` does not know PQ or HLG.
Every curve is a look-up table over code values, so a 1080p frame costs a few tens of
milliseconds in NumPy; only the frames stage 01 keeps (and their thumbnails) pay it.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

# SMPTE ST 2084 (PQ) constants.
_M1 = 2610 / 16384
_M2 = 2523 / 4096 * 128
_C1 = 3424 / 4096
_C2 = 2413 / 4096 * 32
_C3 = 2392 / 4096 * 32
PQ_PEAK_NITS = 10000.0
# ARIB STD-B67 (HLG) constants.
_HLG_A, _HLG_B, _HLG_C = 0.17883277, 0.28466892, 0.55991073
HLG_PEAK_NITS = 1000.0
#: HDR reference (diffuse) white, the level that becomes SDR white (ITU-R BT.2408).
REFERENCE_WHITE_NITS = 203.0
#: Peak assumed for PQ content without metadata: the mastering level of most HDR10 releases.
DEFAULT_PQ_PEAK_NITS = 1000.0

#: BT.2020 -> BT.709 primaries, linear light (ITU-R BT.2087).
BT2020_TO_BT709 = np.array(
    [
        [1.660491, -0.587641, -0.072850],
        [-0.124550, 1.132900, -0.008349],
        [-0.018151, -0.100579, 1.118730],
    ],
    dtype=np.float32,
)
#: Luma coefficients of BT.2020 (non-constant luminance).
_KR, _KB = 0.2627, 0.0593
_KG = 1.0 - _KR - _KB

_LUT_SIZE = 4096


def pq_to_nits(e: np.ndarray) -> np.ndarray:
    """PQ code value (0-1) to absolute luminance in nits (ST 2084's EOTF)."""
    p = np.power(np.clip(e, 0.0, 1.0), 1.0 / _M2)
    return PQ_PEAK_NITS * np.power(np.maximum(p - _C1, 0.0) / (_C2 - _C3 * p), 1.0 / _M1)


def nits_to_pq(nits: np.ndarray) -> np.ndarray:
    """Absolute luminance in nits to a PQ code value (0-1), the inverse of :func:`pq_to_nits`."""
    y = np.power(np.clip(np.asarray(nits, np.float64) / PQ_PEAK_NITS, 0.0, 1.0), _M1)
    return np.power((_C1 + _C2 * y) / (1.0 + _C3 * y), _M2)


def hlg_to_scene(e: np.ndarray) -> np.ndarray:
    """HLG code value (0-1) to relative scene light (0-1), the inverse of its OETF."""
    e = np.clip(e, 0.0, 1.0)
    low = e * e / 3.0
    high = (np.exp((e - _HLG_C) / _HLG_A) + _HLG_B) / 12.0
    return np.where(e <= 0.5, low, high)


def scene_to_hlg(x: np.ndarray) -> np.ndarray:
    """Relative scene light (0-1) to an HLG code value, HLG's OETF."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        high = _HLG_A * np.log(np.maximum(12.0 * x - _HLG_B, 1e-12)) + _HLG_C
    return np.where(x <= 1.0 / 12.0, np.sqrt(3.0 * x), high)


def bt2390_eetf(e: np.ndarray, source_peak_nits: float, target_peak_nits: float) -> np.ndarray:
    """BT.2390's EETF on PQ code values: identity under the knee, a Hermite spline above it that
    lands the source peak on the target peak. Black level 0 on both sides."""
    src = float(nits_to_pq(source_peak_nits))
    e1 = np.clip(e / src, 0.0, 1.0)
    max_lum = float(nits_to_pq(target_peak_nits)) / src
    if max_lum >= 1.0:
        return np.minimum(e, src)
    ks = 1.5 * max_lum - 0.5
    t = (e1 - ks) / (1.0 - ks)
    t2, t3 = t * t, t * t * t
    spline = (2 * t3 - 3 * t2 + 1) * ks + (t3 - 2 * t2 + t) * (1.0 - ks) + (-2 * t3 + 3 * t2) * max_lum
    return np.where(e1 < ks, e1, spline) * src


@lru_cache(maxsize=8)
def _tables(transfer: str, peak_nits: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-code-value tables: code -> linear light in SDR units (1 = reference white), and
    code -> the tone-mapped linear light of a pixel whose brightest channel has that code."""
    codes = np.linspace(0.0, 1.0, _LUT_SIZE)
    # HLG: scene light through the OOTF of a 1000-nit display, applied per channel (the
    # luminance-based OOTF differs by a few per cent in saturated colours).
    hlg = HLG_PEAK_NITS * np.power(hlg_to_scene(codes), 1.2)
    nits = pq_to_nits(codes) if transfer == "pq" else hlg
    linear = nits / REFERENCE_WHITE_NITS
    mapped_pq = bt2390_eetf(nits_to_pq(nits), peak_nits, REFERENCE_WHITE_NITS)
    mapped = pq_to_nits(mapped_pq) / REFERENCE_WHITE_NITS
    return linear.astype(np.float32), mapped.astype(np.float32)


@lru_cache(maxsize=1)
def _gamma_table() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 16384)
    return np.round(255.0 * np.power(x, 1.0 / 2.4)).astype(np.uint8)


def _take(table: np.ndarray, x: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """``table`` looked up at values 0-1 of ``x`` (nearest entry; out of range clipped).
    ``np.take(mode="clip")`` on int32 indices: five times faster than ``table[idx]``. With
    ``overwrite`` the index is worked out in ``x`` itself (float32), saving two frame-sized
    temporaries where the caller has no further use for ``x``."""
    if overwrite:
        np.multiply(x, np.float32(len(table) - 1), out=x)
        x += np.float32(0.5)
        return np.take(table, x.astype(np.int32), mode="clip")
    idx = (x * np.float32(len(table) - 1) + np.float32(0.5)).astype(np.int32)
    return np.take(table, idx, mode="clip")


def ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, full_range: bool = False) -> np.ndarray:
    """Normalised (0-1) BT.2020 Y'CbCr planes of equal size to R'G'B' (H x W x 3, float32).
    ``y``, ``cb``, ``cr`` are code values scaled to 0-1 of their container."""
    if full_range:
        yy, u, v = y, cb - 0.5, cr - 0.5
    else:
        yy = (y - 64 / 1023) * (1023 / 876)
        u = (cb - 512 / 1023) * (1023 / 896)
        v = (cr - 512 / 1023) * (1023 / 896)
    r = yy + 2 * (1 - _KR) * v
    b = yy + 2 * (1 - _KB) * u
    g = (yy - _KR * r - _KB * b) / _KG
    return np.clip(cv2.merge([r, g, b]).astype(np.float32), 0.0, 1.0)


def tone_map_rgb(rgb: np.ndarray, transfer: str, peak_nits: float | None = None) -> np.ndarray:
    """HDR R'G'B' (0-1, BT.2020, PQ or HLG; H x W x 3) to 8-bit SDR BGR (BT.709, gamma 2.4).

    Planar and table-driven (OpenCV for the per-pixel arithmetic): a 1080p frame costs tens of
    milliseconds instead of the half second the same NumPy expressions over an H x W x 3 array
    took (reductions over a length-3 last axis are slow)."""
    if transfer not in ("pq", "hlg"):
        raise ValueError(f"unknown HDR transfer {transfer!r} (pq or hlg)")
    peak = float(peak_nits or (DEFAULT_PQ_PEAK_NITS if transfer == "pq" else HLG_PEAK_NITS))
    linear_t, mapped_t = _tables(transfer, peak)
    ratio_t = np.where(linear_t > 1e-6, mapped_t / np.maximum(linear_t, 1e-6), 0.0).astype(np.float32)
    channels = cv2.split(rgb.astype(np.float32))
    ratio = _take(ratio_t, np.maximum(np.maximum(channels[0], channels[1]), channels[2]))
    linear = cv2.merge([_take(linear_t, c) * ratio for c in channels])
    sdr = cv2.transform(linear, BT2020_TO_BT709)
    gamma = _gamma_table()
    r, g, b = (_take(gamma, c) for c in cv2.split(sdr))
    return cv2.merge([b, g, r])


def tone_map_yuv16(yuv: np.ndarray, transfer: str, full_range: bool = False) -> np.ndarray:
    """A ``yuv444p16le`` picture as PyAV's ``to_ndarray`` gives it (H x W x 3, uint16) to 8-bit
    SDR BGR."""
    y, cb, cr = (c.astype(np.float32) * np.float32(1 / 65535) for c in cv2.split(yuv))
    return tone_map_rgb(ycbcr_to_rgb(y, cb, cr, full_range), transfer)


def sdr_to_hdr_rgb(rgb8: np.ndarray, transfer: str = "pq") -> np.ndarray:
    """The inverse mapping for test footage: an 8-bit SDR RGB picture (BT.709, gamma 2.4) as
    HDR R'G'B' (0-1, BT.2020, PQ or HLG) with SDR white at reference white (203 nits), as an
    HDR grade of SDR material places it (ITU-R BT.2408). Curves through tables (8-bit in, 16-bit
    steps out), so a 720p frame costs milliseconds rather than a NumPy power per pixel. OpenCV's
    LUT and in-place arithmetic: the NumPy fancy index and temporaries took a third more."""
    linear = cv2.LUT(np.ascontiguousarray(rgb8), _decode_table())
    wide = cv2.transform(linear, np.linalg.inv(BT2020_TO_BT709.astype(np.float64)).astype(np.float32))
    np.clip(wide, 0.0, 1.0, out=wide)
    cv2.sqrt(wide, wide)
    return _take(_encode_table(transfer), wide, overwrite=True)


@lru_cache(maxsize=1)
def _decode_table() -> np.ndarray:
    return np.power(np.arange(256) / 255.0, 2.4).astype(np.float32)


@lru_cache(maxsize=2)
def _encode_table(transfer: str) -> np.ndarray:
    """Relative linear light (indexed by its square root, for precision near black) -> code."""
    linear = np.linspace(0.0, 1.0, 65536) ** 2
    nits = linear * REFERENCE_WHITE_NITS
    if transfer == "pq":
        return nits_to_pq(nits).astype(np.float32)
    return scene_to_hlg(np.power(nits / HLG_PEAK_NITS, 1 / 1.2)).astype(np.float32)


def rgb_to_ycbcr10(rgb: np.ndarray) -> np.ndarray:
    """R'G'B' (0-1, BT.2020) to limited-range 10-bit Y'CbCr planes (3 x H x W, uint16)."""
    kr, kg, kb = _KR, _KG, _KB
    cb = np.array([-kr, -kg, 1 - kb]) / (2 * (1 - kb))
    cr = np.array([1 - kr, -kg, -kb]) / (2 * (1 - kr))
    m = np.array([[876 * kr, 876 * kg, 876 * kb], 896 * cb, 896 * cr], dtype=np.float32)
    # The offsets (and the 0.5 that rounds) as the transform's fourth column: one pass, no temporaries.
    affine = np.hstack([m, np.array([[64.5], [512.5], [512.5]], np.float32)])
    ycc = cv2.transform(np.asarray(rgb, np.float32), affine)
    np.clip(ycc, 0, 1023, out=ycc)
    return ycc.astype(np.uint16).transpose(2, 0, 1)
