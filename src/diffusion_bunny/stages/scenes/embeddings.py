"""Scene embeddings for stage 04: one vector per frame, compared by cosine similarity.

Two embedders share one interface (:class:`Embedder`), picked by ``scenes.embedder``:

``descriptor`` (the default; no weights, no torch)
    A hand-made global descriptor of colour layout and texture. Stage 04 thresholds cosine
    similarity (a frame joins a cluster at ``scenes.assign_threshold`` 0.85, falls into the noise
    bucket under ``scenes.noise_threshold`` 0.5), so the descriptor is built for the *values* of
    the cosine to mean something, not only its ranking:

    * Every block is **centred with fixed constants**, never with statistics of the data set. A
      non-negative feature (a histogram, an energy map) has cosine near 1 between any two frames;
      centring on a fixed reference makes unrelated frames land near 0 instead. The constants are
      part of the definition (``DESCRIPTOR_VERSION``), so a second movie added to a library months
      later lands in the same space as the first.
    * Each block is scaled to unit norm (with a floor, so a flat block stays small instead of
      blowing its noise up) and weighted; the concatenation is L2-normalised. The cosine of two
      frames is then close to a weighted mean of the blocks' cosines, which is what the weights
      below were tuned on (``python_script/eval_embeddings.py``; figures in its docstring).

    Blocks, all from a 64x64 copy of the frame (any aspect ratio is squeezed to the square: the
    layout is compared cell by cell, as MPEG-7's colour layout does):

    1. *Colour layout* (MPEG-7 style): the frame averaged to an 8x8 grid in CIE Lab, 2-D DCT per
       channel, the lowest zig-zag AC coefficients (9 of lightness, 5 of each chroma channel).
       AC terms are zero-mean by construction; low frequencies survive a small pan, zoom or crop,
       sensor noise and JPEG, and separate places by where their colours are.
    2. *Tone*: mean and spread of L, a, b over the frame, centred on mid-grey (L 50, a = b = 0)
       and on typical spreads: what the place looks like overall, unmoved by pans and zooms.
    3. *Texture layout*: gradient-orientation energy (8 unsigned orientations, soft-binned) of the
       lightness in a 4x4 grid of cells; square-rooted shares of the frame's total gradient energy
       minus the share of an evenly spread energy (the fixed centre). At 64 px the gradients are
       the large structures (horizon, walls, a figure), so blur, noise and exposure barely move
       them, while a different place does.
    4. *Orientation mix*: per 4x4 cell, which way its structures run (the cell's orientation
       shares, centred on an even mix), whatever the cell's amount of detail.
    5. *Coarse texture layout*: block 3 on a 2x2 grid, which tolerates a pan that moves structures
       across cell borders.

    Lightness is scaled by the frame's own spread before the texture blocks (a brightness or
    contrast change rescales all gradients alike and leaves shares unchanged); only the tone
    block sees exposure, so a brightness change costs a little similarity, not a cluster.

    The texture energy is smoothed (Gaussian, a quarter of a cell) before pooling into cells, so
    cell borders are soft and a pan degrades the texture blocks gradually.

    Measured (``python_script/eval_embeddings.py``, every 3rd frame): on the demo movie same-place
    pairs score median 0.99 / 5th percentile 0.90 (98 % >= 0.85), different places median 0.43 /
    95th percentile 0.70 (none >= 0.85); on the Hamilton clip (four shots of one room, one grade,
    large foreground motion: the hard case) same-shot median 0.94 / p5 0.77 (85 % >= 0.85),
    different shots median 0.68 / p95 0.84 (2 % >= 0.85). Brightness x0.8-x1.25 or +20 keeps
    >= 0.88, a 10 % crop >= 0.93, a 1080p copy of a 360p frame 1.00. Known limit: a pan or zoom
    across a third of the frame within one shot can fall to about 0.6-0.8 (the layout blocks see
    a different picture by then).

    Frames are decoded with libjpeg's DCT scaling (``cv2.IMREAD_REDUCED_COLOR_2/4/8``) to the
    smallest size that still leaves at least 96 px on the short side, then area-averaged: a 4K
    frame costs about what a 720p one does. Decoding runs on a thread pool (OpenCV releases the
    GIL), a few ms per frame.

``clip``
    ``transformers``' ``CLIPModel`` loaded from ``scenes.clip_model`` (a hub id looked up in the
    local Hugging Face cache only, or a folder), image and text features L2-normalised. torch and
    transformers are imported only here, so the default path never pays for them. A missing or
    broken model ends in one :class:`~diffusion_bunny.errors.ModelError` that names the setting
    and what to do.

A missing or unreadable image file raises :class:`~diffusion_bunny.errors.BadInputError` naming
the file: the frames are the stage's inputs, and a silently dropped row would misalign the
embeddings with the frames table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from diffusion_bunny.errors import UserError
from diffusion_bunny.logs import bar_options, relay_bar_class
from diffusion_bunny.media.images import Region, read_image
from diffusion_bunny.models.clip import ClipEmbedder
from diffusion_bunny.stages.scenes.settings import ScenesSettings

#: The name of the descriptor's vector space, stored with every vector (the ``embeddings``
#: table's ``embedder``, a scene library's ``space``): vectors of two spaces are never compared.
#: A name, not a hash of this module: a scene library outlives many edits of the code, and only a
#: change of the vectors' values (a constant, a block, a weight) makes old and new vectors
#: incomparable, while a refactor that keeps the values must keep every library usable. The
#: values are pinned by a test (``test_descriptor_values_are_pinned_to_its_name``), so a change
#: that moves them fails until the name changes with them.
DESCRIPTOR_VERSION = "descriptor-v1"

#: Side of the square working copy every block is computed from.
WORK_SIZE = 64

#: Zig-zag order of the lowest DCT coefficients of an 8x8 block (row, column), as in MPEG-7.
_ZIGZAG = ((0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0))
_N_LIGHT_COEFFS = 10
_N_CHROMA_COEFFS = 6
#: Fixed centres of the frame's mean L, a, b (mid-grey: CIE L* runs 0-100, a = b = 0 is neutral)
#: and of their spreads (typical of graded footage).
_MEAN_CENTRE = np.array([50.0, 0.0, 0.0])
_STD_CENTRE = np.array([20.0, 8.0, 8.0])

_N_ORIENT = 8
_TEX_GRID = 4
#: Gaussian sigma (px of the 64 px copy, a quarter of a cell) applied to the orientation energy
#: before it is pooled into cells: soft cell borders, so a pan moves energy between neighbouring
#: cells gradually instead of all at once. 4 lifted same-place pairs >= 0.85 from 95.5 to 97.8 %
#: on the demo movie and 80 to 85 % on the Hamilton clip; 8 let different shots of the Hamilton
#: clip reach 0.85 (8 % of pairs).
_POOL_SIGMA = 4.0

#: Weights of the blocks (colour layout, tone, texture layout 4x4, orientation mix per cell,
#: texture layout 2x2). Each block has unit norm before weighting, so a block's share of the
#: cosine is its squared weight over the sum of squares. Chosen on the demo movie and the Hamilton
#: clip (python_script/eval_embeddings.py): colour layout alone breaks within a shot whose
#: foreground moves; tone alone cannot tell apart two places of one movie with the same grade.
BLOCK_WEIGHTS = np.array([0.5, 1.0, 0.5, 1.0, 1.0], dtype=np.float32)
#: Norm floor per block (in the block's own units): a block weaker than this is not rescaled to
#: unit length, so a flat frame's near-zero layout does not turn into amplified noise.
_BLOCK_FLOOR = np.array([20.0, 5.0, 0.05, 0.05, 0.05], dtype=np.float32)


@runtime_checkable
class Embedder(Protocol):
    """What stage 04 needs from an embedder: image vectors, and text vectors where supported."""

    #: Goes into the ``embeddings`` table's ``embedder`` column; includes a version, so vectors of
    #: different embedders (or versions) are never mixed.
    name: str
    dim: int

    def embed_images(
        self, paths: Sequence[Path], progress: bool = False, regions: Sequence[Region | None] | None = None
    ) -> np.ndarray:
        """float32 ``[n, dim]``, rows L2-normalised, in the order of ``paths``; each image seen
        through its ``regions`` entry (a frame's picture box, never its bars) when given."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[n, dim]``, rows L2-normalised (text search; CLIP only)."""
        ...

    @property
    def supports_text(self) -> bool:
        """Whether :meth:`embed_texts` works."""
        ...


def embedder_name(cfg: ScenesSettings) -> str:
    """The ``embedder`` column value ``make_embedder(cfg)`` will write, known without loading a
    model (so a rerun whose embeddings are all cached never loads CLIP)."""
    return DESCRIPTOR_VERSION if cfg.embedder == "descriptor" else f"clip:{cfg.clip_model}"


def make_embedder(cfg: ScenesSettings) -> Embedder:
    """The embedder ``cfg.embedder`` names. CLIP loads its model here, so a missing model fails
    before any frame is read."""
    if cfg.embedder == "descriptor":
        return DescriptorEmbedder()
    if cfg.embedder == "clip":
        return ClipEmbedder(cfg.clip_model, device=cfg.device, batch_size=cfg.batch_size)
    raise AssertionError(f"unknown embedder {cfg.embedder!r}")  # the config's Literal forbids it


def _map_images(
    paths: Sequence[Path], fn: Callable[[Path], np.ndarray], progress: bool, desc: str
) -> list[np.ndarray]:
    """``fn`` over ``paths`` on a thread pool, in order, with a tqdm bar."""
    workers = min(len(paths), os.cpu_count() or 1) or 1
    out: list[np.ndarray] = []
    # relayed: under `bunny run` the terminal shows it too
    bar = relay_bar_class()(
        total=len(paths), unit="frame", desc=desc, disable=not progress, **bar_options(0.5)
    )
    try:
        if workers == 1:
            for p in paths:
                out.append(fn(Path(p)))
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed") as pool:
                for vec in pool.map(lambda p: fn(Path(p)), paths):
                    out.append(vec)
                    bar.update(1)
    finally:
        bar.close()
    return out


# --------------------------------------------------------------------------------------------
# The descriptor
# --------------------------------------------------------------------------------------------


#: Centre angles of the orientation bins, doubled (unsigned orientation lives on the doubled circle).
_BIN_COS2 = np.cos(2 * (np.arange(_N_ORIENT) + 0.5) * (np.pi / _N_ORIENT)).astype(np.float32)
_BIN_SIN2 = np.sin(2 * (np.arange(_N_ORIENT) + 0.5) * (np.pi / _N_ORIENT)).astype(np.float32)


def _centred_shares(energy: np.ndarray, total: float) -> np.ndarray:
    """sqrt of each entry's share of ``total`` minus the share of an evenly spread energy: zero for
    a featureless spread, signed otherwise (sqrt = Hellinger mapping, so strong bins do not swamp)."""
    if total <= 1e-6:
        return np.zeros(energy.size, dtype=np.float32)
    shares = energy.reshape(-1) / total
    return (np.sqrt(shares) - np.sqrt(1.0 / shares.size)).astype(np.float32)


def descriptor_blocks(bgr: np.ndarray) -> list[np.ndarray]:
    """The descriptor's blocks of one BGR ``uint8`` image, centred but not yet weighted.

    Public so the calibration script can re-weight blocks without re-decoding frames.
    """
    small = cv2.resize(bgr, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_BGR2Lab)

    # Colour layout: 8x8 grid, DCT per channel, lowest zig-zag AC coefficients. The DC terms
    # (the mean colour) live in the tone block, so exposure and layout are weighted separately.
    grid = cv2.resize(lab, (8, 8), interpolation=cv2.INTER_AREA)
    layout: list[float] = []
    for ch, n in ((0, _N_LIGHT_COEFFS), (1, _N_CHROMA_COEFFS), (2, _N_CHROMA_COEFFS)):
        coeffs = cv2.dct(np.ascontiguousarray(grid[:, :, ch]))
        layout.extend(float(coeffs[r, c]) for r, c in _ZIGZAG[1:n])
    colour_layout = np.asarray(layout, dtype=np.float32)

    # Tone: mean and spread of L, a, b over the frame, centred on fixed values.
    mean, std = cv2.meanStdDev(lab)
    tone = np.concatenate([mean.ravel() - _MEAN_CENTRE, std.ravel() - _STD_CENTRE]).astype(np.float32)

    # Texture: gradient-orientation energy of the lightness, scaled by the frame's own spread so
    # exposure and contrast changes rescale every gradient alike and leave the shares unchanged.
    light = lab[:, :, 0]
    light = (light - float(mean[0, 0])) / max(float(std[0, 0]), 1.0)
    gx = cv2.Sobel(light, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(light, cv2.CV_32F, 0, 1, ksize=3)
    mag2 = gx * gx + gy * gy
    inv = 1.0 / np.maximum(mag2, 1e-12)
    # Soft orientation binning on the doubled angle: a pixel's energy goes to the bins within 45
    # degrees of its orientation, by cos^2 of the doubled difference, so no bin edge is sharp.
    cos2, sin2 = (gx * gx - gy * gy) * inv, 2.0 * gx * gy * inv
    weights = np.maximum(cos2[..., None] * _BIN_COS2 + sin2[..., None] * _BIN_SIN2, 0.0) ** 2
    energy = np.sqrt(mag2)[..., None] * weights  # [H, W, orientations]
    energy = cv2.GaussianBlur(energy, (0, 0), _POOL_SIGMA, borderType=cv2.BORDER_REFLECT)
    cell = WORK_SIZE // _TEX_GRID
    cells = energy.reshape(_TEX_GRID, cell, _TEX_GRID, cell, _N_ORIENT).sum(axis=(1, 3))
    total = float(cells.sum())
    # Where the structure is and which way it runs, on a 4x4 and (more pan-tolerant) 2x2 grid.
    texture_layout = _centred_shares(cells, total)
    half = _TEX_GRID // 2
    quads = cells.reshape(2, half, 2, half, _N_ORIENT).sum(axis=(1, 3))
    texture_quads = _centred_shares(quads, total)
    # Orientation mix inside each cell, independent of how much energy the cell holds.
    cell_totals = cells.sum(axis=2, keepdims=True)
    mix = np.where(cell_totals > 1e-6, cells / np.maximum(cell_totals, 1e-6), 1.0 / _N_ORIENT)
    orientation = (np.sqrt(mix) - np.sqrt(1.0 / _N_ORIENT)).reshape(-1).astype(np.float32)
    return [colour_layout, tone, texture_layout, orientation, texture_quads]


def combine_blocks(blocks: Sequence[np.ndarray], weights: np.ndarray = BLOCK_WEIGHTS) -> np.ndarray:
    """Scale each block to unit norm (not past its floor), weight, concatenate, L2-normalise."""
    parts = [
        w * b / max(float(np.linalg.norm(b)), floor)
        for b, w, floor in zip(blocks, weights, _BLOCK_FLOOR, strict=True)
    ]
    vec = np.concatenate(parts).astype(np.float32)
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


def describe(bgr: np.ndarray) -> np.ndarray:
    """The descriptor of one BGR ``uint8`` image (any size): float32, unit length."""
    return combine_blocks(descriptor_blocks(bgr))


class DescriptorEmbedder:
    """Colour layout + texture descriptor (see the module docstring). No weights, no torch."""

    name = DESCRIPTOR_VERSION
    dim = int(describe(np.zeros((8, 8, 3), np.uint8)).size)

    @property
    def supports_text(self) -> bool:
        """False: a colour/texture descriptor has no text side."""
        return False

    def embed_images(
        self, paths: Sequence[Path], progress: bool = False, regions: Sequence[Region | None] | None = None
    ) -> np.ndarray:
        """Descriptors of ``paths`` (decoded at reduced size on a thread pool; of each one's
        ``regions`` entry only, when given), float32 ``[n, dim]``."""
        boxes = dict(zip(map(str, paths), regions, strict=True)) if regions is not None else {}
        rows = _map_images(
            paths, lambda p: describe(read_image(p, region=boxes.get(str(p)))), progress, "embed"
        )
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(rows).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Always raises :class:`UserError`: text search needs CLIP."""
        raise UserError(
            "text search needs a text-image model, but scenes.embedder is 'descriptor' (colour and "
            "texture only); set scenes.embedder: clip (and scenes.clip_model to a downloaded CLIP)"
        )
