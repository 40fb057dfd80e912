"""The reference-fitted character detector: network, training pictures, fitting and search.

A character detector fitted at run time to the pictures a user gives of each character.

No model that ships in a wheel knows a drawn girl, a cartoon dog or a 3D creature by name, and
the ones that know such things in general (anime head detectors, CCIP, OWLv2) live on a hub. So
stage 03 fits its own, offline, in a minute or two on the CPU, the way "cut, paste and learn"
(Dwibedi et al., ICCV 2017) makes detection data: each reference cut out of its background,
scaled, mirrored, turned, recoloured a little, blurred, cut by the edge, and pasted onto pieces of
the film's own frames, beside distractors (pieces of other frames, and the references with their
hues turned, which teaches that a character's colours are part of who it is: two drawn girls of
one style differ mostly in hair and eye colour).

The network is a small fully convolutional one trained from scratch (no backbone ships offline)
with CenterNet's heads (Zhou et al., "Objects as Points", 2019): one heat map per character at
an eighth of the input's size, whose peaks are the characters' centres, and the box's width and
height there. It searches a frame at two scales, so a character from a sixth of the frame's
height to all of it falls in the sizes it was trained on.

The film's frames hold the characters themselves, unlabelled: a background piece with a
character in it would teach the network that the character is background. Halfway through, the
network searches the background frames; from then on what it finds there is not counted as
background (``ignore_score``), and what it finds with high confidence is taught as that
character (``positive_score``: the film's own drawings of it, in poses no reference shows).

Own code: no library fits a detector to a handful of cut-outs; the network, the loss and the
decoding are a few dozen lines of torch each (CenterNet's focal loss as its paper gives it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from diffusion_bunny.codegraph import code_hash
from diffusion_bunny.errors import ModelError
from diffusion_bunny.logs import bar_options, relay_bar_class
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.models.fitted import FittedSettings
from diffusion_bunny.models.onnx_graph import cpu_session

if TYPE_CHECKING:
    import torch

#: Output stride of the heat maps (input pixels per cell).
STRIDE = 8
#: Channels of the feature each detection carries (the fused map at its peak), for tracks and
#: clusters.
FEATURE_DIM = 64
#: Format of the saved model (the file's ``format`` field); a file of another format is fitted again.
FILE_FORMAT = "fitted-detector-1"


@dataclass(frozen=True)
class Cutout:
    """One reference picture of a character, cut out: RGBA, transparent where the character is not."""

    name: str
    rgba: np.ndarray


@dataclass(frozen=True)
class Hit:
    """One detection: the character's index, the peak's score, the box (left, top, right, bottom)
    in the searched image's pixels, and the feature at the peak (unit length)."""

    index: int
    score: float
    box: tuple[float, float, float, float]
    feature: np.ndarray


# ---------------------------------------------------------------------------------------------
# The network


def build_net(classes: int) -> Any:
    """The detector's network for ``classes`` characters (torch imported here: the settings above
    are read by the config module, which must not pull torch in)."""
    import torch  # lazy: torch takes 1.1 s to import
    from torch import nn  # lazy: torch takes 1.1 s to import
    from torch.nn import functional as F  # lazy: torch takes 1.1 s to import

    def cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class FitNet(nn.Module):
        """Stride-8 features, a stride-16 context branch with dilations (a receptive field of
        about 200 px), fused; a heat map per character and the box size."""

        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 32), cbr(32, 48, 2), cbr(48, 48))
            self.context = nn.Sequential(cbr(48, 64, 2), cbr(64, 64, dilation=2), cbr(64, 64, dilation=4))
            self.fuse = cbr(48 + 64, FEATURE_DIM)
            self.heat = nn.Conv2d(FEATURE_DIM, classes, 1)
            self.size = nn.Conv2d(FEATURE_DIM, 2, 1)
            nn.init.constant_(self.heat.bias, -4.0)  # CenterNet's prior: almost every cell is background

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            low = self.down(x)
            ctx = F.interpolate(self.context(low), size=low.shape[-2:], mode="bilinear", align_corners=False)
            feat = self.fuse(torch.cat([low, ctx], 1))
            return self.heat(feat), self.size(feat), feat

    return FitNet()


def to_array(images: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 pictures of one size as the network's input (channels first, centred on 0)."""
    batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)).astype(np.float32)
    return batch / np.float32(255.0) - np.float32(0.5)


def to_input(images: list[np.ndarray]) -> torch.Tensor:
    """:func:`to_array` as a torch tensor (training and the torch search)."""
    import torch  # lazy: torch takes 1.1 s to import

    return torch.from_numpy(to_array(images))


# ---------------------------------------------------------------------------------------------
# Training pictures


def content_box(alpha: np.ndarray, level: int = 16) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels more opaque than ``level``; None when there are none."""
    ys, xs = np.nonzero(alpha > level)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _rotate(rgba: np.ndarray, degrees: float) -> np.ndarray:
    h, w = rgba.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * sin + w * cos) + 1, int(h * cos + w * sin) + 1
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(rgba, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0))


def _recolour(rgb: np.ndarray, rng: np.random.Generator, hue: int) -> np.ndarray:
    """Hue turned by ``hue`` (OpenCV's 0-180 scale), saturation and brightness scaled a little."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + hue) % 180
    hsv[..., 1] *= rng.uniform(0.8, 1.2)
    hsv[..., 2] *= rng.uniform(0.7, 1.25)
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)


def _paste(dst: np.ndarray, rgba: np.ndarray, x: int, y: int) -> tuple[float, float, float, float] | None:
    """Blend ``rgba`` into ``dst`` (float32 RGB) at (x, y); the visible part's box (None: too little)."""
    h, w = rgba.shape[:2]
    height, width = dst.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    part = rgba[y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32)
    alpha = part[..., 3:4] / 255.0
    dst[y0:y1, x0:x1] = dst[y0:y1, x0:x1] * (1.0 - alpha) + part[..., :3] * alpha
    box = content_box(part[..., 3], 40)
    if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 24:
        return None
    return (x0 + box[0], y0 + box[1], x0 + box[2], y0 + box[3])


def _position(rng: np.random.Generator, size: int, side: int) -> int:
    """Where a thing ``size`` wide goes in a picture ``side`` wide: at least three quarters inside
    when it fits, any overlap otherwise."""
    low = -size // 4
    return int(rng.integers(low, max(low + 1, side - 3 * size // 4 + 1)))


@dataclass
class Example:
    """A training picture: boxes taught as characters ``(index, box)`` and boxes not taught as background."""

    image: np.ndarray
    boxes: list[tuple[int, tuple[float, float, float, float]]]
    ignore: list[tuple[float, float, float, float]]


class Synthesizer:
    """Training pictures: references pasted on pieces of the film's frames (see the module's
    docstring). ``found`` holds, per background frame, what the network found there halfway."""

    def __init__(self, cutouts: list[list[np.ndarray]], backgrounds: list[np.ndarray], side: int) -> None:
        self.cutouts = [[_trim(c) for c in own] for own in cutouts]
        self.backgrounds = backgrounds
        self.side = side
        self.found: list[list[Hit]] | None = None
        self.positive_score = 1.1
        # A hue-turned copy is no other character when the character has hardly any hue.
        self.colourful = [
            [
                float(cv2.cvtColor(c[..., :3], cv2.COLOR_RGB2HSV)[..., 1][c[..., 3] > 128].mean()) > 40
                for c in own
            ]
            for own in self.cutouts
        ]

    def _background(
        self, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[tuple[int, float, tuple[float, ...]]]]:
        side = self.side
        index = int(rng.integers(len(self.backgrounds)))
        frame = self.backgrounds[index]
        height, width = frame.shape[:2]
        crop = max(16, int(rng.uniform(0.3, 1.0) * min(height, width)))
        y, x = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
        piece = cv2.resize(frame[y : y + crop, x : x + crop], (side, side), interpolation=cv2.INTER_AREA)
        flip = bool(rng.random() < 0.5)
        if flip:
            piece = piece[:, ::-1]
        found = []
        for hit in (self.found or [[]] * len(self.backgrounds))[index]:
            k = side / crop
            left, top, right, bottom = ((v - o) * k for v, o in zip(hit.box, (x, y, x, y), strict=True))
            if flip:
                left, right = side - right, side - left
            if right > 0 and bottom > 0 and left < side and top < side:
                found.append((hit.index, hit.score, (left, top, right, bottom)))
        return piece.astype(np.float32), found

    def _character(self, rng: np.random.Generator, index: int, hue: int | None = None) -> np.ndarray:
        """A reference of character ``index``, changed as a film might show it."""
        own = self.cutouts[index]
        choice = int(rng.integers(len(own)))
        rgba = own[choice]
        if hue is None:
            hue = int(rng.integers(-4, 5))
        if rng.random() < 0.2:  # only its top (a head and shoulders), as films often frame it
            h = rgba.shape[0]
            rgba = rgba[: max(8, int(h * rng.uniform(0.45, 0.9)))]
        if rng.random() < 0.5:
            rgba = rgba[:, ::-1]
        target = math.exp(rng.uniform(math.log(14), math.log(self.side * 0.95)))
        scale = target / max(rgba.shape[0], rgba.shape[1] * 0.6)
        size = (max(4, round(rgba.shape[1] * scale)), max(4, round(rgba.shape[0] * scale)))
        rgba = cv2.resize(
            np.ascontiguousarray(rgba), size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        )
        if rng.random() < 0.5:
            rgba = _rotate(rgba, rng.uniform(-12, 12))
        rgb = _recolour(np.ascontiguousarray(rgba[..., :3]), rng, hue)
        if rng.random() < 0.2:
            rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.6, 2.0))
        return np.dstack([rgb, rgba[..., 3]])

    def _distractor(self, rng: np.random.Generator) -> np.ndarray:
        side = self.side
        colourful = [(i, j) for i, own in enumerate(self.colourful) for j, ok in enumerate(own) if ok]
        if colourful and rng.random() < 0.5:
            return self._character(
                rng, colourful[int(rng.integers(len(colourful)))][0], hue=int(rng.integers(30, 150))
            )
        piece, _ = self._background(rng)
        h, w = int(rng.uniform(16, side * 0.7)), int(rng.uniform(16, side * 0.7))
        piece = cv2.resize(piece.astype(np.uint8), (w, h))
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 2, h // 2), (w // 2, h // 2), 0, 0, 360, 255, -1)
        return np.dstack([piece, mask])

    def example(self, rng: np.random.Generator) -> Example:
        side = self.side
        image, found = self._background(rng)
        for _ in range(int(rng.integers(0, 3))):
            thing = self._distractor(rng)
            _paste(image, thing, _position(rng, thing.shape[1], side), _position(rng, thing.shape[0], side))
        boxes = []
        for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3]))):
            index = int(rng.integers(len(self.cutouts)))
            thing = self._character(rng, index)
            box = _paste(
                image, thing, _position(rng, thing.shape[1], side), _position(rng, thing.shape[0], side)
            )
            if box is not None:
                boxes.append((index, box))
        for index, score, box in found:
            if score >= self.positive_score:
                boxes.append((index, tuple(min(side, max(0.0, v)) for v in box)))
        return Example(np.clip(image, 0, 255).astype(np.uint8), boxes, [b for _, _, b in found])


def _trim(rgba: np.ndarray) -> np.ndarray:
    box = content_box(rgba[..., 3])
    if box is None:
        raise ValueError("a cutout with nothing opaque in it")
    return np.ascontiguousarray(rgba[box[1] : box[3], box[0] : box[2]])


def targets(example: Example, classes: int, side: int) -> tuple[np.ndarray, ...]:
    """CenterNet's targets of one picture: Gaussian peaks per character, log box sizes and their
    mask at the centre cells, and the weight of each cell as background (0 where found ignored)."""
    grid = side // STRIDE
    heat = np.zeros((classes, grid, grid), np.float32)
    size = np.zeros((2, grid, grid), np.float32)
    mask = np.zeros((grid, grid), np.float32)
    background = np.ones((grid, grid), np.float32)
    for left, top, right, bottom in example.ignore:
        t, b = max(0, int(top / STRIDE)), math.ceil(bottom / STRIDE)
        lo, hi = max(0, int(left / STRIDE)), math.ceil(right / STRIDE)
        background[t:b, lo:hi] = 0.0
    yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32)
    for index, (left, top, right, bottom) in example.boxes:
        cx, cy = (left + right) / 2 / STRIDE - 0.5, (top + bottom) / 2 / STRIDE - 0.5
        w, h = max(1e-3, (right - left) / STRIDE), max(1e-3, (bottom - top) / STRIDE)
        sigma = max(0.5, 0.15 * math.sqrt(w * h))
        heat[index] = np.maximum(heat[index], np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)))
        ix, iy = round(cx), round(cy)
        if 0 <= ix < grid and 0 <= iy < grid:
            heat[index, iy, ix] = 1.0
            size[:, iy, ix] = (math.log(w), math.log(h))
            mask[iy, ix] = 1.0
    return heat, size, mask, background


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss; a cell's background term weighted by ``background``
    (0 where the film's own unlabelled characters may be)."""
    import torch  # lazy: torch takes 1.1 s to import

    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1.0).float()
    pos = -torch.log(p) * (1 - p) ** 2 * positive
    weight = torch.maximum(background[:, None], heat.gt(0.05).float())
    neg = -torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - positive) * weight
    return (pos.sum() + neg.sum()) / positive.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# The fitted detector


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _within(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The share of the smaller of two boxes that lies in the other."""
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter / smaller if smaller > 0 else 0.0


def suppress(hits: list[Hit], same: float = 0.4, other: float = 0.7, nested: float = 0.6) -> list[Hit]:
    """Non-maximum suppression, best first, with the boxes of one sighting fused.

    A hit overlapping a kept one of its character by ``same`` (IoU), or lying ``nested`` in it
    (or it in the hit: the same character found at two scales, its head and its whole figure),
    is the same sighting; one of another character overlapping by ``other`` is dropped (two
    characters may stand close; one place is not two of them). A sighting's box is the mean of its
    hits' boxes weighted by their scores (weighted box fusion, Solovyev et al. 2021): the two
    scales a frame is searched at each place the box a little differently, and their mean is
    nearer the truth than either."""
    groups: list[list[Hit]] = []
    for hit in sorted(hits, key=lambda h: -h.score):
        for group in groups:
            first = group[0]
            overlap = iou(hit.box, first.box)
            if hit.index == first.index and (overlap >= same or _within(hit.box, first.box) >= nested):
                group.append(hit)
                break
            if hit.index != first.index and overlap >= other:
                break
        else:
            groups.append([hit])
    kept = []
    for group in groups:
        weights = np.asarray([h.score for h in group], dtype=np.float64)
        if not weights.sum() > 0:  # scores of 0 (a search at threshold 0): every hit counts alike
            weights = np.ones(len(group))
        box = tuple(
            float(v) for v in (np.asarray([h.box for h in group]) * weights[:, None]).sum(0) / weights.sum()
        )
        kept.append(Hit(group[0].index, group[0].score, box, group[0].feature))
    return kept


def decode(
    maps: tuple[np.ndarray, np.ndarray, np.ndarray],
    frame: tuple[int, int],
    searched: tuple[int, int],
    threshold: float,
) -> list[Hit]:
    """The network's ``maps`` for one searched image (heat-map logits ``(C, H, W)``, log box
    sizes ``(2, H, W)``, features ``(D, H, W)``) as hits: each local maximum of a character's heat
    map (3x3, as CenterNet decodes) at ``threshold`` or above, its box in the pixels of the
    ``frame`` (width, height) the ``searched`` image (width, height) was scaled from, and its
    unit-length feature. In numpy, so a search needs no torch (stage 03's workers run the network
    with ONNX Runtime)."""
    heat, sizes, features = maps
    # Logits clipped where float32's exp would overflow (a sigmoid of 1e-35 there, not 0).
    p = 1.0 / (1.0 + np.exp(-np.clip(heat.astype(np.float32), -80.0, 80.0)))
    kernel = np.ones((3, 3), np.uint8)
    # cv2.dilate pads with the lowest value, as max pooling pads with -inf.
    peaks = np.stack([(c == cv2.dilate(c, kernel)) & (c >= threshold) for c in p])
    width, height = frame
    sx, sy = width / searched[0], height / searched[1]
    hits: list[Hit] = []
    for c, y, x in zip(*np.nonzero(peaks), strict=True):
        bw = math.exp(float(sizes[0, y, x])) * STRIDE
        bh = math.exp(float(sizes[1, y, x])) * STRIDE
        cx, cy = (int(x) + 0.5) * STRIDE, (int(y) + 0.5) * STRIDE
        box = (
            max(0.0, (cx - bw / 2) * sx),
            max(0.0, (cy - bh / 2) * sy),
            min(float(width), (cx + bw / 2) * sx),
            min(float(height), (cy + bh / 2) * sy),
        )
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            feature = features[:, y, x].astype(np.float32)
            feature = feature / max(float(np.linalg.norm(feature)), 1e-12)
            hits.append(Hit(int(c), float(p[c, y, x]), box, feature))
    return hits


def search(
    rgb: np.ndarray,
    widths: tuple[int, ...],
    threshold: float,
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> list[Hit]:
    """Characters in an RGB frame at every searched width, boxes in its pixels: ``run`` is the
    network (input as :func:`to_array` makes it; its three maps for the one image)."""
    height, width = rgb.shape[:2]
    hits: list[Hit] = []
    for searched in widths:
        w = max(32, round(min(searched, width * 2) / 32) * 32)
        h = max(32, round(height * w / width / 32) * 32)
        small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if w < width else cv2.INTER_LINEAR)
        hits += decode(run(to_array([small])), (width, height), (w, h), threshold)
    return suppress(hits)


class FittedDetector:
    """The fitted network with the names of its characters; searches RGB frames."""

    def __init__(self, names: list[str], settings: FittedSettings, net: Any, key: str) -> None:
        self.names = list(names)
        self.settings = settings
        self.key = key
        self.net = net

    @classmethod
    def from_state(
        cls, names: list[str], settings: FittedSettings, state: dict[str, Any], key: str
    ) -> FittedDetector:
        """The detector with the weights ``state``, ready to search."""
        net = build_net(len(names))
        net.load_state_dict(state)
        net.eval()
        return cls(names, settings, net, key)

    def detect(self, rgb: np.ndarray, min_score: float | None = None) -> list[Hit]:
        """Characters in an RGB frame, boxes in its pixels, at ``min_score`` (default the
        settings') or above."""
        import torch  # lazy: torch takes 1.1 s to import

        # The network is on the CPU except while it trains on a GPU, where the self-training
        # searches the film's frames with it.
        device = next(self.net.parameters()).device

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with torch.inference_mode():
                maps = self.net(torch.from_numpy(batch).to(device))
            return tuple(m[0].cpu().numpy() for m in maps)  # type: ignore[return-value]

        threshold = self.settings.min_score if min_score is None else min_score
        return search(rgb, self.settings.widths, threshold, run)

    def onnx_bytes(self) -> bytes:
        """The network as an ONNX model (any input height and width), with the names, settings
        and key in its metadata: what :class:`FittedSearch` runs, without torch."""
        import onnx  # lazy: only where a detector was just fitted or loaded
        import torch  # lazy: torch takes 1.1 s to import

        buffer = io.BytesIO()
        example = torch.from_numpy(to_array([np.zeros((64, 64, 3), np.uint8)]))
        with warnings.catch_warnings():
            # The TorchScript exporter is the one that needs no extra package (the newer one
            # needs onnxscript); torch warns that it is the older one.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self.net,
                (example,),
                buffer,
                dynamo=False,
                input_names=["image"],
                output_names=["heat", "size", "feature"],
                dynamic_axes={"image": {2: "height", 3: "width"}},
                opset_version=17,
            )
        model = onnx.load_from_string(buffer.getvalue())
        meta = {
            "format": FILE_FORMAT,
            "names": json.dumps(self.names),
            "key": self.key,
            "settings": json.dumps(self.settings.model_dump()),
        }
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        return model.SerializeToString()

    # -- files ---------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The weights and what they were fitted to, as one torch file's bytes (the stage writes
        them atomically into the run folder)."""
        import torch  # lazy: torch takes 1.1 s to import

        meta = {
            "format": FILE_FORMAT,
            "names": self.names,
            "settings": self.settings.model_dump(),
            "key": self.key,
        }
        buffer = io.BytesIO()
        torch.save({"meta": json.dumps(meta), "state": self.net.state_dict()}, buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> FittedDetector | None:
        """The detector saved at ``path``, or None when it is missing, damaged or of another format
        (it is then simply fitted again)."""
        import torch  # lazy: torch takes 1.1 s to import

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(data["meta"])
            if meta.get("format") != FILE_FORMAT:
                return None
            return cls.from_state(
                meta["names"], FittedSettings(**meta["settings"]), data["state"], meta["key"]
            )
        except Exception:
            return None


class FittedSearch:
    """A fitted detector's search on ONNX Runtime, from the ``.onnx`` file stage 03 writes beside
    the torch one: stage 03's worker processes search every frame without importing torch (2-4 s
    a worker) and ONNX Runtime runs the network in 0.6x torch's time on one thread (convolution,
    batch norm and ReLU fused; 20 against 34 ms for a 720p frame's two searches, measured on an
    AMD EPYC with AVX2). The hits are :class:`FittedDetector`'s, decoded by the same code."""

    def __init__(self, names: list[str], settings: FittedSettings, session: Any, key: str) -> None:
        self.names, self.settings, self.session, self.key = list(names), settings, session, key

    @classmethod
    def load(cls, path: Path) -> FittedSearch | None:
        """The search saved at ``path``, or None when it is missing, damaged or of another format."""
        try:
            session = cpu_session(path.read_bytes())
            meta = session.get_modelmeta().custom_metadata_map
            if meta.get("format") != FILE_FORMAT:
                return None
            settings = FittedSettings(**json.loads(meta["settings"]))
            return cls(json.loads(meta["names"]), settings, session, meta["key"])
        except Exception:
            return None

    def detect(self, rgb: np.ndarray, min_score: float | None = None) -> list[Hit]:
        """As :meth:`FittedDetector.detect`."""

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            heat, size, feature = self.session.run(None, {"image": batch})
            return heat[0], size[0], feature[0]

        threshold = self.settings.min_score if min_score is None else min_score
        return search(rgb, self.settings.widths, threshold, run)


def fit_key(
    cutouts: dict[str, list[np.ndarray]], backgrounds: list[np.ndarray], settings: FittedSettings
) -> str:
    """What a fitted detector depends on: its characters' pictures, its background frames, its
    settings and this module's code; the cache file is named after it."""
    digest = hashlib.sha256()
    for name in sorted(cutouts):
        digest.update(name.encode() + b"\0")
        # The pictures as a set, not in their files' order: a picture renamed so that it sorts
        # elsewhere (or a copy of one, taken once) refitted the detector and searched every
        # frame again, minutes at the default steps, for the pictures it had.
        for picture in sorted(
            str(rgba.shape).encode() + hashlib.sha256(np.ascontiguousarray(rgba).tobytes()).digest()
            for rgba in cutouts[name]
        ):
            digest.update(picture)
    for frame in backgrounds:
        digest.update(hashlib.sha256(np.ascontiguousarray(frame[::4, ::4]).tobytes()).digest())
    # min_score is applied to the detections afterwards (stage 03 keeps them from a lower score):
    # moving it must re-label a run, not fit the detector again.
    # The device changes only the arithmetic's order, as another CPU does: a fit made on a GPU
    # serves a run on the CPU and the other way round.
    # Nor do the threads that make the batches: another count draws other pictures of the same
    # kind, a fit as good (as another device's arithmetic is), not one to make again. Nor torch's
    # own threads (0 and 1 are the same, and 2 only adds in another order).
    kept = settings.model_dump(exclude={"min_score", "device", "batch_threads", "threads"})
    digest.update(json.dumps(kept, sort_keys=True).encode())
    digest.update(code_hash(__name__).encode())
    return digest.hexdigest()[:16]


class _Batches:
    """Training batches made on threads of their own while the network trains on the calling
    one: pasting pictures (OpenCV and numpy, which release the GIL) keeps a core busy per thread.
    On 2 CPU cores one thread makes them beside the network's step, which trains on one torch
    thread: its OpenMP threads spin-wait for each other, and with a core taken by the batches
    (or another process) a spin costs a scheduler slice (techContext: 3.4 s instead of 0.17 s
    for a small step). On a GPU the step takes milliseconds and the batches are what it waits
    for, so several threads make them (:func:`batch_threads`).

    Thread ``w`` of ``k`` makes steps ``w``, ``w + k``, ... from a random stream of its own,
    into a queue of its own, which the training thread reads in step order; so the batches (and
    on the CPU the fit, bit for bit) are the same on every run with ``k`` threads, however the
    threads are scheduled. Thread 0's stream is the one a single maker has always drawn from
    (the seed alone): with one thread, the default on the CPU, the fit is the one it was before
    several threads could make its batches. Before a step at or after one where the network
    searches the film's frames (``refresh``), a maker waits until what was found there is in
    the synthesizer."""

    def __init__(
        self, synth: Synthesizer, settings: FittedSettings, classes: int, refresh: set[int], threads: int
    ) -> None:
        self.synth, self.settings, self.classes = synth, settings, classes
        self.ready = {step: threading.Event() for step in refresh}
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=2) for _ in range(max(1, threads))]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._make, args=(w,), name=f"fit-batches-{w}", daemon=True)
            for w in range(len(self.queues))
        ]
        for thread in self.threads:
            thread.start()

    def _make(self, first: int) -> None:
        out = self.queues[first]
        seed = self.settings.seed
        rng = np.random.default_rng(seed if first == 0 else (seed, first))
        try:
            for step in range(first, self.settings.steps, len(self.queues)):
                for searched in sorted(s for s in self.ready if s <= step):
                    self.ready[searched].wait()
                if self.stop.is_set():
                    return
                examples = [self.synth.example(rng) for _ in range(self.settings.batch)]
                goal = [targets(e, self.classes, self.settings.crop) for e in examples]
                out.put(([e.image for e in examples], [np.stack(p) for p in zip(*goal, strict=True)]))
        except BaseException as exc:  # handed to the training thread, which raises it
            out.put(exc)

    def get(self, step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        item = self.queues[step % len(self.queues)].get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        for event in self.ready.values():
            event.set()
        while any(thread.is_alive() for thread in self.threads):
            for out in self.queues:
                with contextlib.suppress(queue.Empty):
                    out.get_nowait()
            for thread in self.threads:
                thread.join(0.05)


def batch_threads(settings: FittedSettings, device: str) -> int:
    """How many threads make the training batches: ``settings.batch_threads``, or when 0, one on
    the CPU (torch's step holds the other core of two, and is the slower of the two: 320 against
    50-80 ms on AVX2 cores) and, on a GPU, up to 4, leaving a core to the training thread.

    Why 4: on an H200 a fit of 1000 steps took 61 and 91 s (two machines) with one thread making
    the batches, nearly all of it waiting for them; 53 s with two, 41 s with four and 43 s with
    eight (docs/characters.md)."""
    if settings.batch_threads:
        return settings.batch_threads
    if device == "cpu":
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


def fit_detector(
    cutouts: dict[str, list[np.ndarray]],
    backgrounds: list[np.ndarray],
    settings: FittedSettings,
    *,
    progress: bool = True,
    key: str | None = None,
    desc: str = "fit characters",
) -> FittedDetector:
    """Fit the detector of the characters ``cutouts`` (name -> RGBA pictures) on ``backgrounds``
    (RGB frames of the film, best at most a few hundred pixels wide); ``desc`` labels the bar."""
    import torch  # lazy: torch takes 1.1 s to import
    from torch.nn import functional as F  # lazy: torch takes 1.1 s to import

    names = sorted(cutouts)
    if not names or not all(cutouts[n] for n in names):
        raise ModelError("the fitted character detector needs at least one picture of each character")
    if not backgrounds:
        raise ModelError("the fitted character detector needs at least one frame of the film")
    refresh = {settings.steps // 2, 3 * settings.steps // 4} if settings.self_training else set()
    device = resolve_device(settings.device, "characters.fitted.device")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads or 1)
    batches = bar = None
    # Everything from here on inside the try: whatever fails (the GPU out of memory as the
    # network moves there, an interrupt), the kernel gets its torch threads back and no picture
    # maker is left waiting on a full queue with the frames in memory.
    try:
        torch.manual_seed(settings.seed)
        synth = Synthesizer([cutouts[n] for n in names], backgrounds, settings.crop)
        net = build_net(len(names)).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, 3e-3, total_steps=settings.steps, pct_start=0.15
        )
        batches = _Batches(synth, settings, len(names), refresh, batch_threads(settings, device))
        # A relayed bar: under `bunny run` the fit (minutes on a CPU) shows on the terminal as well.
        bar = relay_bar_class()(
            range(settings.steps), unit="step", desc=desc, disable=not progress, **bar_options(0.5)
        )
        net.train()
        for step in bar:
            if step in refresh:
                net.eval()
                so_far = FittedDetector(names, settings, net, "")
                synth.found = [so_far.detect(frame, settings.ignore_score) for frame in backgrounds]
                synth.positive_score = settings.positive_score
                batches.ready[step].set()
                net.train()
            images, goal = batches.get(step)
            heat, size, mask, background = (torch.from_numpy(part).to(device) for part in goal)
            logits, sizes, _ = net(to_input(images).to(device))
            size_loss = (F.l1_loss(sizes, size, reduction="none").sum(1) * mask).sum() / mask.sum().clamp(
                min=1.0
            )
            loss = focal_loss(logits, heat, background) + 0.2 * size_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        if bar is not None:
            bar.close()
        if batches is not None:
            batches.close()
        torch.set_num_threads(threads_before)
    # Searched, saved and exported on the CPU whatever it trained on; the GPU's memory goes back
    # to the later stages sharing the kernel (stage 07 trains there).
    net = net.cpu().eval()
    if device != "cpu":
        torch.cuda.empty_cache()
    return FittedDetector(names, settings, net, key or fit_key(cutouts, backgrounds, settings))


def film_cast(detector: FittedDetector, backgrounds: list[np.ndarray], score: float) -> list[str]:
    """The characters ``detector`` finds at ``score`` or more in at least one of the film's frames
    ``backgrounds``, in its order.

    Why so low a score, and one frame: a character dropped here cannot be named in the film at
    all, while one kept wrongly costs only what it costs today. On the truth set's fit films, a
    character of another film (a 6-character fit on a 2-character film) reached 0.15 on none of
    its 67 frames; every character of the film reached 0.25 on 18 or more.
    """
    seen: set[int] = set()
    for frame in backgrounds:
        seen.update(hit.index for hit in detector.detect(frame, score))
    return [name for index, name in enumerate(detector.names) if index in seen]


def fit_film_detector(
    cutouts: dict[str, list[np.ndarray]],
    backgrounds: list[np.ndarray],
    settings: FittedSettings,
    *,
    progress: bool = True,
    key: str | None = None,
) -> FittedDetector:
    """:func:`fit_detector` for one film: fitted on every character of ``cutouts``, then, when
    some of them are not in the film (:func:`film_cast` at ``settings.cast_score``) and others
    are, fitted again on those others alone, under the same key (what it was fitted from).

    Why: one folder of pictures for a whole folder of films is the natural way to give them, and
    every character's heat map must say "not me" to every other one, so the film's own characters
    score lower the more characters share the fit. The self-training, which teaches the film's
    drawings of a character only where the half-trained network is sure of it, then no longer
    starts, and the fit loses most of what it finds (a frog on its film: 23 of 23 sightings at 0.5
    with its 2 characters, 0 of 23 with 6).
    """
    key = key or fit_key(cutouts, backgrounds, settings)
    detector = fit_detector(cutouts, backgrounds, settings, progress=progress, key=key)
    if settings.cast_score is None or len(detector.names) < 2:
        return detector
    cast = film_cast(detector, backgrounds, settings.cast_score)
    if not cast or len(cast) == len(detector.names):
        return detector
    return fit_detector(
        {name: cutouts[name] for name in cast},
        backgrounds,
        settings,
        progress=progress,
        key=key,
        # a second bar, said apart from the first: a person watching sees why the fit goes on
        desc=f"fit again for the {len(cast)} of {len(detector.names)} characters in the film",
    )
