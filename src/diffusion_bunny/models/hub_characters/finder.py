"""Stronger character models from the Hugging Face hub, for when the hub can be reached: opt-in.

Offline, stage 03 finds drawn and animated characters with a detector it fits to the user's
reference pictures (:mod:`diffusion_bunny.models.fitted`). Online, a user may choose models trained
on far more pictures than any film holds:

* OWLv2 (Minderer et al., "Scaling Open-Vocabulary Object Detection", 2023) finds a character
  **guided by its reference pictures** (image-conditioned detection: each reference's embedding is
  a class query, compared with every patch of the frame), and, for a film without references,
  **guided by text** ("a cartoon animal"): :class:`HubFinder`.
* DINOv2 or SigLIP (or CLIP) gives each sighting a feature, so sightings of one character can be
  told from another's and grouped (:class:`HubFeatures`, :func:`cluster_appearances`).

Both come through :func:`diffusion_bunny.models.hub.hub_model`: from the local cache when there,
downloaded with a progress bar when not and the hub is reachable, ``HF_HUB_OFFLINE=1`` honoured,
and one :class:`~diffusion_bunny.errors.ModelError` line naming the setting when neither works. A
local folder is taken as it is (the tests build tiny models in code and load them this way).

The settings live in the package's ``__init__`` (the configuration imports them on every command);
this module imports numpy, OpenCV, torch and transformers inside the functions that use them, so
that stage 03 importing :class:`HubFinder` costs nothing for a run on the offline default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from diffusion_bunny.codegraph import code_hash
from diffusion_bunny.errors import ModelError
from diffusion_bunny.media.images import l2_rows
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.models.fitted.detector import Hit, content_box, iou, suppress
from diffusion_bunny.models.hub import HUB_ID, TRANSFORMERS_FILES, hub_model, short_reason, snapshot_hint
from diffusion_bunny.models.hub_characters import HubCharacterSettings
from diffusion_bunny.paths import local_model_path

if TYPE_CHECKING:
    import torch


#: The grey a cut-out is put on (its transparent parts) and a frame is padded with to a square:
#: mid-grey favours no colour, and OWLv2's own code pads with 0.5 grey.
GREY = 128
#: A reference is trimmed to its opaque pixels plus this fraction of its longer side of grey on
#: each side: the character whole, with room around it as a frame would show it.
REFERENCE_MARGIN = 0.08
#: Among a reference's predicted boxes, those overlapping the character's own box by at least this
#: share of the best overlap are candidates for its query (OWL-ViT's own image-conditioning rule).
QUERY_IOU_SHARE = 0.65
#: At most this many boxes a frame, best first, go into non-maximum suppression (OWLv2 predicts one
#: box per patch: 3600 at 960 px; with a low threshold all of them would pass).
MAX_CANDIDATES = 100
#: A box is kept only when it is at least this many frame pixels wide and tall after clipping.
MIN_BOX_SIDE = 2.0

_WHAT_INSTEAD = "a local model folder, or use the offline default, characters.backend: offline"


def local_model_stamp(model: str) -> str:
    """What says that a model folder's weights changed, for ``model`` a local folder: each file's
    name, size and time of change (a model saved over the folder in place, a fine-tuned OWLv2),
    read without loading anything; "" for a hub id. A hub id's cached snapshot is what is loaded
    and the cache never replaces it on its own, so the id says which weights."""
    path = local_model_path(model)
    if not path.is_dir():
        return ""
    stamp = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        info = file.stat()
        stamp.update(f"{file.relative_to(path)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return stamp.hexdigest()[:16]


def hub_key(settings: HubCharacterSettings, references: dict[str, list[np.ndarray]]) -> str:
    """What the hub's sightings in a frame depend on: the settings that change a detection (not
    ``cluster_distance``, applied afterwards), the weights of a model given as a local folder
    (:func:`local_model_stamp`), the reference pictures and this module's code. Stage 03 reuses
    a frame's sightings while this stays the same."""
    digest = hashlib.sha256()
    for model in (settings.detector, settings.features):
        digest.update(local_model_stamp(model).encode() + b"\0")
    for name in sorted(references):
        digest.update(name.encode() + b"\0")
        for picture in references[name]:
            digest.update(str(np.shape(picture)).encode())
            digest.update(hashlib.sha256(np.ascontiguousarray(picture).tobytes()).digest())
    fields = settings.model_dump(exclude={"cluster_distance", "device", "batch_size"})
    digest.update(json.dumps(fields, sort_keys=True).encode())
    digest.update(code_hash(__name__).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading


def model_folder(model: str, setting: str) -> str:
    """The local folder of ``model`` (a folder here, else a hub id from the cache or downloaded now
    with a progress bar); anything else is one :class:`ModelError` naming ``setting``."""
    path = local_model_path(model)
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"{setting} = {model!r} is a file, not a model folder; set {setting} to {_WHAT_INSTEAD}"
            )
        if not (path / "config.json").is_file():
            # transformers' own words for this ("should have a `model_type` key in its
            # config.json") name a file that is not there.
            raise ModelError(
                f"{setting} = {model!r} holds no config.json, so no model (a folder a hub download or "
                f"save_pretrained made holds one beside its weights); point {setting} at such a folder, "
                "or use the offline default, characters.backend: offline"
            )
        return str(path)
    if HUB_ID.match(model):
        return str(hub_model(model, setting, TRANSFORMERS_FILES, instead=_WHAT_INSTEAD))
    raise ModelError(
        f"{setting} = {model!r} is no folder here and no hub id (owner/name); set {setting} to a hub id or "
        f"{_WHAT_INSTEAD}"
    )


def _load_failed(setting: str, model: str, exc: BaseException, source: str = "") -> ModelError:
    text = short_reason(exc)
    return ModelError(
        f"cannot load {setting} = {model!r}: {text}{snapshot_hint(source, exc) if source else ''}; "
        f"set {setting} to {_WHAT_INSTEAD}"
    )


def _load_owlv2(model: str, device: str) -> tuple[Any, Any]:
    """OWLv2 and its processor from ``model`` (``characters.hub.detector``), on ``device``."""
    from transformers import (  # lazy: transformers takes 0.56 s to import
        AutoConfig,
        Owlv2ForObjectDetection,
        Owlv2Processor,
    )

    setting = "characters.hub.detector"
    source = model_folder(model, setting)
    try:
        kind = AutoConfig.from_pretrained(source, local_files_only=True).model_type
        if kind != "owlv2":
            raise ValueError(f"it holds a {kind!r} model, not OWLv2 (owlv2)")
        net = Owlv2ForObjectDetection.from_pretrained(source, local_files_only=True)
        processor = Owlv2Processor.from_pretrained(source, local_files_only=True)
        # transformers builds an empty tokenizer when its files are missing: every text query
        # then embedded alike (as models/clip.py guards for CLIP).
        vocab, table = len(processor.tokenizer), int(net.config.text_config.vocab_size)
        if not 256 <= vocab <= table:
            raise ValueError(
                f"it has no usable tokenizer ({vocab} tokens for a model of {table}; are vocab.json "
                "and merges.txt or tokenizer.json missing?)"
            )
    except Exception as exc:  # every failure of from_pretrained means "no usable model"
        raise _load_failed(setting, model, exc, source) from None
    return net.to(device).eval(), processor


# ---------------------------------------------------------------------------------------------
# Pictures


def on_grey(picture: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture of ``picture`` (RGB, or RGBA composited on :data:`GREY`): a model sees
    no alpha, and a cut-out's transparent pixels hold whatever colour its editor left there."""
    picture = np.asarray(picture)
    if picture.ndim != 3 or picture.shape[2] not in (3, 4):
        raise ValueError(f"an RGB or RGBA picture is HxWx3 or HxWx4, not {picture.shape}")
    if picture.shape[2] == 3:
        return np.ascontiguousarray(picture, dtype=np.uint8)
    alpha = picture[..., 3:4].astype(np.float32) / 255.0
    rgb = picture[..., :3].astype(np.float32) * alpha + GREY * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def square_on_grey(rgb: np.ndarray, centre: bool = True) -> tuple[np.ndarray, int, int]:
    """``rgb`` on a grey square of its longer side, and where it went in it (x, y offsets):
    centred for a crop (a features model crops the middle), top-left for a frame (as OWLv2's
    processor pads, so its boxes, fractions of the square, are fractions of the longer side)."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    x, y = ((side - w) // 2, (side - h) // 2) if centre else (0, 0)
    square = np.full((side, side, 3), GREY, np.uint8)
    square[y : y + h, x : x + w] = rgb
    return square, x, y


def reference_square(picture: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A reference cut-out ready to be a query: trimmed to its opaque pixels with a grey margin,
    centred on a grey square; and the character's box in it as fractions (x0, y0, x1, y1)."""
    picture = np.asarray(picture)
    box = content_box(picture[..., 3]) if picture.ndim == 3 and picture.shape[2] == 4 else None
    if picture.ndim == 3 and picture.shape[2] == 4 and box is None:
        raise ModelError("a reference picture of a character is transparent everywhere (nothing cut out)")
    x0, y0, x1, y1 = box or (0, 0, picture.shape[1], picture.shape[0])
    rgb = on_grey(picture[y0:y1, x0:x1])
    pad = round(REFERENCE_MARGIN * max(rgb.shape[:2]))
    rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=GREY)
    square, x, y = square_on_grey(rgb, centre=True)
    side = float(square.shape[0])
    inner = (x + pad, y + pad, x + pad + (x1 - x0), y + pad + (y1 - y0))
    return square, (inner[0] / side, inner[1] / side, inner[2] / side, inner[3] / side)


# ---------------------------------------------------------------------------------------------
# Features


class HubFeatures:
    """A features model (DINOv2, SigLIP, CLIP) that gives each crop a unit-length vector: who a
    sighting is, compared by cosine similarity. Loaded in the constructor, so a missing model
    fails before any work; ``dim`` is the vectors' length."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        batch_size: int = 8,
        *,
        setting: str = "characters.hub.features",
    ) -> None:
        import torch  # lazy: torch takes 1.1 s to import
        from transformers import AutoImageProcessor, AutoModel  # lazy: transformers takes 0.56 s to import

        self.model_id = model
        self.batch_size = int(batch_size)
        self.device = resolve_device(device, "characters.hub.device")
        source = model_folder(model, setting)
        try:
            self.model = AutoModel.from_pretrained(source, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        except Exception as exc:  # every failure of from_pretrained means "no usable model"
            raise _load_failed(setting, model, exc, source) from None
        self.model.to(self.device).eval()
        self._torch = torch
        # One grey picture through the model: its output's length, and a model that loads but
        # cannot embed a picture (a text-only folder) fails here, before any work.
        try:
            self.dim = int(self._forward([np.full((32, 32, 3), GREY, np.uint8)]).shape[1])
        except Exception as exc:
            raise _load_failed(setting, model, exc, source) from None

    def _forward(self, pictures: list[np.ndarray]) -> torch.Tensor:
        """The raw features of RGB pictures, one batch. CLIP and SigLIP (two-tower models): the
        pooled, projected image feature, the one their training compared; DINOv2 (and any vision
        backbone): the pooled output, DINOv2's layer-normed CLS token, which its paper uses for
        retrieval; else the first token."""
        inputs = self.processor(images=pictures, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device)
        with self._torch.inference_mode():
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pixels)
                return out if hasattr(out, "shape") else out.pooler_output
            out = self.model(pixel_values=pixels)
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-length features of ``crops`` (RGB, or RGBA put on grey), float32 ``[n, dim]``,
        batched by ``batch_size``. Each crop is centred on a grey square first: the processors
        squash (SigLIP) or crop the middle (DINOv2) a picture that is not square, and a standing
        character is tall."""
        out = np.zeros((len(crops), self.dim), np.float32)
        for start in range(0, len(crops), self.batch_size):
            chunk = [square_on_grey(on_grey(c))[0] for c in crops[start : start + self.batch_size]]
            out[start : start + len(chunk)] = self._forward(chunk).float().cpu().numpy()
        return l2_rows(out)


# ---------------------------------------------------------------------------------------------
# Detection


def _iou_to(boxes: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """IoU of ``boxes`` (N x 4, centre x, centre y, width, height) with one (x0, y0, x1, y1) box."""
    import torch  # lazy: torch takes 1.1 s to import

    x0, y0 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
    x1, y1 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    w = (torch.minimum(x1, torch.tensor(box[2])) - torch.maximum(x0, torch.tensor(box[0]))).clamp(min=0)
    h = (torch.minimum(y1, torch.tensor(box[3])) - torch.maximum(y0, torch.tensor(box[1]))).clamp(min=0)
    inter = w * h
    union = boxes[:, 2] * boxes[:, 3] + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / union.clamp(min=1e-9)


def _frame_boxes(boxes: torch.Tensor, scale: tuple[float, float], shape: tuple[int, ...]) -> torch.Tensor:
    """Predicted boxes (P x 4: centre and size as fractions of the square) in frame pixels (left,
    top, right, bottom), clipped to the frame of ``shape``; ``scale`` from
    :meth:`HubFinder._frame_square`. In double precision, as Python's floats."""
    import torch  # lazy: torch takes 1.1 s to import

    h, w = shape
    cx, cy, bw, bh = boxes.double().unbind(-1)
    return torch.stack(
        [
            ((cx - bw / 2) * scale[0]).clamp(min=0.0),
            ((cy - bh / 2) * scale[1]).clamp(min=0.0),
            ((cx + bw / 2) * scale[0]).clamp(max=float(w)),
            ((cy + bh / 2) * scale[1]).clamp(max=float(h)),
        ],
        -1,
    )


def _usable(placed: torch.Tensor) -> torch.Tensor:
    """Which boxes in frame pixels (:func:`_frame_boxes`) are at least :data:`MIN_BOX_SIDE` wide
    and tall: the ones a hit may have."""
    return ((placed[:, 2] - placed[:, 0]) >= MIN_BOX_SIDE) & ((placed[:, 3] - placed[:, 1]) >= MIN_BOX_SIDE)


def _span(low: float, high: float) -> slice:
    """The pixels from ``low`` to ``high`` (at least one)."""
    start = int(low)
    return slice(start, max(start + 1, round(high)))


class HubFinder:
    """OWLv2 finding characters in RGB frames: named ones guided by their reference pictures
    (:meth:`detect`), unnamed ones guided by text (:meth:`discover`); each sighting's feature
    from :class:`HubFeatures` on its crop.

    ``references`` maps a character's name to its pictures (RGBA cut-outs, uint8 HxWx4; RGB is
    taken as opaque). A hit's ``index`` is the name's place in :attr:`names` (sorted).
    """

    def __init__(
        self,
        settings: HubCharacterSettings,
        references: dict[str, list[np.ndarray]],
        *,
        features: HubFeatures | None = None,
        with_features: bool = True,
    ) -> None:
        """``with_features=False`` loads no features model: for :meth:`character_scores` alone
        (stage 08 scoring generated pictures), which needs no sighting's feature."""
        import torch  # lazy: torch takes 1.1 s to import

        self.settings = settings
        self.names = sorted(references)
        empty = [n for n in self.names if not references[n]]
        if empty:
            raise ModelError(f"no reference picture of {', '.join(map(repr, empty))}; give at least one each")
        self.device = resolve_device(settings.device, "characters.hub.device")
        self.model, self.processor = _load_owlv2(settings.detector, self.device)
        self.features = features
        if features is None and with_features:
            self.features = HubFeatures(settings.features, settings.device, settings.batch_size)
        self._torch = torch
        size = self.processor.image_processor.size
        #: OWLv2's input side (960 for the base models, 1008 for the large ones).
        self.input_side = int(max(size["height"], size["width"]))
        squares = [reference_square(p) for n in self.names for p in references[n]]
        self._owners = torch.tensor([i for i, n in enumerate(self.names) for _ in references[n]])
        self._queries = self._reference_queries(squares) if squares else None
        self._texts = self._text_queries(settings.discover_queries) if settings.discover_queries else None

    # -- queries ----------------------------------------------------------------------------------

    def _patches(self, squares: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """OWLv2's patch embeddings (B x P x D) and their predicted boxes (B x P x 4, centre and
        size as fractions of the square) of square RGB pictures."""
        pixels = self.processor.image_processor(images=squares, return_tensors="pt")["pixel_values"]
        with self._torch.inference_mode():
            grid, _ = self.model.image_embedder(pixel_values=pixels.to(self.device))
            feats = grid.reshape(grid.shape[0], -1, grid.shape[-1])
            boxes = self.model.box_predictor(feats, grid)
        return feats, boxes

    def _reference_queries(
        self, squares: list[tuple[np.ndarray, tuple[float, float, float, float]]]
    ) -> torch.Tensor:
        """One query embedding per reference (R x D): the class embedding of the predicted box
        that covers the character. Of the boxes that overlap its opaque pixels' box by at least
        :data:`QUERY_IOU_SHARE` of the best overlap, the most object-like (OWLv2's objectness head):
        transformers' ``image_guided_detection`` takes the most object-like box of the whole
        picture, which may be a part (a face, a hat); the cut-out says where the whole one is."""
        torch = self._torch
        chosen = []
        for start in range(0, len(squares), self.settings.batch_size):
            chunk = squares[start : start + self.settings.batch_size]
            feats, boxes = self._patches([s for s, _ in chunk])
            with torch.inference_mode():
                _, class_embeds = self.model.class_predictor(feats)
                objectness = self.model.objectness_predictor(feats)
            for k, (_, inner) in enumerate(chunk):
                iou = _iou_to(boxes[k].float().cpu(), inner)
                candidate = iou >= QUERY_IOU_SHARE * iou.max()
                best = int(torch.where(candidate, objectness[k].float().cpu(), -torch.inf).argmax())
                chosen.append(class_embeds[k, best])
        return torch.stack(chosen)

    def _text_queries(self, texts: Sequence[str]) -> torch.Tensor:
        """OWLv2's embeddings of the text queries (T x D), once: every frame is compared with them."""
        tokenizer = self.processor.tokenizer
        length = int(self.model.config.text_config.max_position_embeddings)
        tokens = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        with self._torch.inference_mode():
            out = self.model.owlv2.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        return out if hasattr(out, "shape") else out.pooler_output

    # -- frames -----------------------------------------------------------------------------------

    def _frame_square(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The frame at OWLv2's input size at most, padded with grey to a square at its bottom and
        right; and the frame pixels per fraction of that square across and down."""
        h, w = rgb.shape[:2]
        scale = min(1.0, self.input_side / max(h, w))
        small = rgb
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        square, _, _ = square_on_grey(small, centre=False)
        side = square.shape[0]
        # A fraction f of the square is f * side pixels of the small frame, each w / small-width
        # pixels of the frame (exact per axis, whatever the rounding of the small frame's size).
        return square, side * w / small.shape[1], side * h / small.shape[0]

    def _search(
        self,
        frames: Sequence[np.ndarray],
        searches: Sequence[tuple[torch.Tensor, torch.Tensor | None, float]],
    ) -> list[list[Hit]]:
        """Hits in ``frames`` of each search (queries, owners, threshold), the frame's patches
        computed once for all of them: each patch's best query (``owners`` maps a query to a
        character, whose score is its best query's; None: every query is one unnamed kind, -1), at
        the search's threshold or above, boxes in frame pixels, suppressed, with features. A hit of
        a later search that overlaps one of an earlier search (IoU 0.5) is the same sighting and
        dropped: a named character is not also discovered."""
        torch = self._torch
        out: list[list[Hit]] = []
        for start in range(0, len(frames), self.settings.batch_size):
            chunk = [np.asarray(f) for f in frames[start : start + self.settings.batch_size]]
            prepared = [self._frame_square(on_grey(f)) for f in chunk]
            feats, boxes = self._patches([p[0] for p in prepared])
            found: list[list[Hit]] = [[] for _ in chunk]
            frame_boxes = [b.float().cpu() for b in boxes]
            for queries, owners, threshold in searches:
                with torch.inference_mode():
                    logits, _ = self.model.class_predictor(feats, queries[None].expand(len(chunk), -1, -1))
                scores = logits.float().sigmoid().cpu()
                if owners is None:
                    best, index = scores.amax(-1), torch.full(scores.shape[:2], -1)
                else:
                    per = torch.stack([scores[..., owners == c].amax(-1) for c in range(len(self.names))], -1)
                    best, index = per.max(-1)
                for k, frame in enumerate(chunk):
                    hits = self._hits(frame, prepared[k][1:], best[k], index[k], frame_boxes[k], threshold)
                    earlier = list(found[k])
                    found[k].extend(h for h in hits if all(iou(h.box, o.box) < 0.5 for o in earlier))
            out.extend(found)
        return out

    def _hits(
        self,
        frame: np.ndarray,
        scale: tuple[float, float],
        best: torch.Tensor,
        index: torch.Tensor,
        boxes: torch.Tensor,
        threshold: float,
    ) -> list[Hit]:
        """One frame's hits: boxes mapped back to its pixels and clipped to it, suppressed, each
        with the feature of its crop."""
        order = [
            int(i)
            for i in best.argsort(descending=True, stable=True)[:MAX_CANDIDATES]
            if best[i] >= threshold
        ]
        placed = _frame_boxes(boxes, scale, frame.shape[:2])
        usable = _usable(placed)
        found = [
            Hit(int(index[i]), float(best[i]), tuple(float(v) for v in placed[i]), np.zeros(0, np.float32))
            for i in order
            if usable[i]
        ]
        kept = suppress(found)
        if self.features is None:
            raise RuntimeError("this HubFinder was made with_features=False: it only scores characters")
        crops = [frame[_span(k.box[1], k.box[3]), _span(k.box[0], k.box[2])] for k in kept]
        feats = self.features.embed(crops) if crops else np.zeros((0, self.features.dim), np.float32)
        return [Hit(k.index, k.score, k.box, feats[j]) for j, k in enumerate(kept)]

    def detect_frames(self, frames: Sequence[np.ndarray]) -> list[list[Hit]]:
        """:meth:`detect` of each frame, ``batch_size`` frames a forward pass."""
        if self._queries is None:
            return [[] for _ in frames]
        return self._search(frames, [(self._queries, self._owners, self.settings.min_score)])

    def detect(self, rgb: np.ndarray) -> list[Hit]:
        """The named characters in an RGB frame (uint8 HxWx3): OWLv2 image-guided detection with
        every reference as a query, a character's score the best over its references, at
        ``min_score`` or above; boxes in the frame's pixels, suppressed, best first."""
        return self.detect_frames([rgb])[0]

    def discover_frames(self, frames: Sequence[np.ndarray]) -> list[list[Hit]]:
        """:meth:`discover` of each frame, ``batch_size`` frames a forward pass."""
        if self._texts is None:
            return [[] for _ in frames]
        return self._search(frames, [(self._texts, None, self.settings.discover_score)])

    def find_frames(self, frames: Sequence[np.ndarray]) -> list[list[Hit]]:
        """Every character in each frame, as stage 03 asks: the named ones (:meth:`detect`) and,
        where they are not, characters of any name (:meth:`discover`, index -1), each frame's
        patches computed once for both."""
        searches = []
        if self._queries is not None:
            searches.append((self._queries, self._owners, self.settings.min_score))
        if self._texts is not None:
            searches.append((self._texts, None, self.settings.discover_score))
        return self._search(frames, searches) if searches else [[] for _ in frames]

    def character_scores(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Each named character's best image-guided score anywhere in each RGB frame (frames x
        :attr:`names`, 0-1, no threshold): how strongly OWLv2 sees the character there, the
        score :meth:`detect` names a sighting from. Stage 08 scores generated pictures with it."""
        torch = self._torch
        out = np.zeros((len(frames), len(self.names)), np.float32)
        if self._queries is None:
            return out
        size = self.settings.batch_size
        for start in range(0, len(frames), size):
            chunk = [on_grey(np.asarray(f)) for f in frames[start : start + size]]
            prepared = [self._frame_square(f) for f in chunk]
            feats, boxes = self._patches([p[0] for p in prepared])
            with torch.inference_mode():
                logits, _ = self.model.class_predictor(feats, self._queries[None].expand(len(chunk), -1, -1))
            scores = logits.float().sigmoid().cpu()
            per = torch.stack([scores[..., self._owners == c].amax(-1) for c in range(len(self.names))], -1)
            for k, frame in enumerate(chunk):
                # Only patches whose box is one detect() could keep (inside the frame, not on the
                # grey padding, MIN_BOX_SIDE wide and tall): the score is the one it names from.
                kept = _usable(_frame_boxes(boxes[k].float().cpu(), prepared[k][1:], frame.shape[:2]))
                out[start + k] = per[k][kept].amax(0).numpy() if bool(kept.any()) else 0.0
        return out

    def discover(self, rgb: np.ndarray) -> list[Hit]:
        """Characters of any name in an RGB frame, for a film without references: OWLv2 guided by
        the text queries ``discover_queries`` (a box's score is its best query's), at
        ``discover_score`` or above; every hit's index is -1 (who it is: :func:`cluster_appearances`
        of the hits' features)."""
        return self.discover_frames([rgb])[0]


# ---------------------------------------------------------------------------------------------
# Identities without references


def cluster_appearances(features: np.ndarray, threshold: float, *, min_size: int = 2) -> list[int]:
    """Identity clusters of sightings without references: one label per row of ``features``
    (N x D), clusters numbered from 0 in the order of their first row, and -1 (noise) for a row in
    a cluster of fewer than ``min_size`` rows.

    Average-linkage agglomerative clustering on cosine distance, cut at ``threshold`` (two clusters
    merge while their rows are on average closer than ``threshold``, ``1 - cosine similarity``).
    Chosen over HDBSCAN because a film's characters differ wildly in how often they appear (a lead
    in hundreds of frames, a passer-by in three): a fixed distance says "the same one" the same way
    for both, where HDBSCAN's density estimate lets the lead's many sightings decide what counts as
    dense and folds the rare ones into noise, and its answer has no threshold a user can read. The
    labels are deterministic (no random start). Memory grows with N² (the pairwise distances):
    about 200 MB for 5000 sightings."""
    if not 0.0 < threshold < 2.0:
        raise ValueError(f"a cosine-distance threshold lies between 0 and 2, not {threshold}")
    features = np.asarray(features, dtype=np.float64)
    if len(features) == 0:
        return []
    features = features.reshape(len(features), -1)
    # A zero row has no direction, so no cosine distance: it is noise.
    usable = np.flatnonzero(np.linalg.norm(features, axis=1) > 1e-12)
    raw = np.full(len(features), -1)
    if len(usable) == 1:
        raw[usable] = 0
    elif len(usable) > 1:
        from sklearn.cluster import AgglomerativeClustering  # lazy: sklearn takes 0.88 s to import

        raw[usable] = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=threshold
        ).fit_predict(features[usable])
    sizes = np.bincount(raw[raw >= 0], minlength=1)
    labels: list[int] = []
    renumber: dict[int, int] = {}
    for label in raw:
        if label < 0 or sizes[label] < min_size:
            labels.append(-1)
        else:
            labels.append(renumber.setdefault(int(label), len(renumber)))
    return labels
