"""Stage 07's data side, pure of models: the exported pictures and captions, aspect-ratio buckets,
centre crops to a bucket, the seeded batch order of each epoch (so a resumed run sees the batches
the killed one would have), and the fingerprint of the data a checkpoint may resume with."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from diffusion_bunny.errors import BadInputError, StageError
from diffusion_bunny.models.hub import short_reason
from diffusion_bunny.paths import file_sha256

if TYPE_CHECKING:
    import torch


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class TrainImage:
    """One training image: its file, caption, and how often it appears per epoch."""

    path: Path
    text: str
    repeats: int = 1


# ---------------------------------------------------------------------------------------------
# Dataset


def read_dataset(run_dir: Path, items: pl.DataFrame) -> tuple[list[TrainImage], list[str]]:
    """The training images of the ``dataset_items`` table (files under ``<run>/dataset/hf/<split>/``)
    and the captions of its validation split. An empty train split is a StageError and a missing
    image file a BadInputError naming it, both before any model is loaded."""
    hf = Path(run_dir) / "dataset" / "hf"
    train_rows = items.filter(pl.col("split") == "train")
    if train_rows.height == 0:
        raise StageError(
            f"the dataset of {run_dir} has no training images (dataset_items has no 'train' rows); "
            "check that stages captions and export kept some frames, then rerun stage export"
        )
    images: list[TrainImage] = []
    repeats = train_rows["repeats"] if "repeats" in train_rows.columns else None
    for i, row in enumerate(train_rows.iter_rows(named=True)):
        path = hf / "train" / row["file_name"]
        if not path.is_file():
            raise BadInputError(
                f"training image {path} is missing; rerun stage export (bunny run --stages export --force)"
            )
        text = str(row.get("text") or "")
        images.append(
            TrainImage(path=path, text=text, repeats=max(1, int(repeats[i])) if repeats is not None else 1)
        )
    validation = [str(t) for t in items.filter(pl.col("split") == "validation")["text"].to_list() if t]
    return images, validation


def class_images_from_dir(folder: Path, class_prompt: str, limit: int) -> list[TrainImage]:
    """Up to ``limit`` images of a class folder (sorted by name), captioned with the class prompt,
    each header read now: one that does not open stopped the training at the step its batch came
    up (minutes or hours in), saying to rerun stage export, which does not write this folder."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:  # PIL's errors are of many classes; each says why in its text
            raise BadInputError(
                f"class image {path} in train.class_data_dir cannot be read ({short_reason(exc)}); "
                "remove or replace it"
            ) from None
    return [TrainImage(path=p, text=class_prompt) for p in files]


# ---------------------------------------------------------------------------------------------
# Buckets and image preparation


def bucket_step(resolution: int, vae_scale: int) -> int:
    """Bucket sides are multiples of this: 64 px for real models (kohya's default), smaller at
    tiny resolutions so there is more than one bucket, and always a multiple of the VAE's factor."""
    step = min(64, max(vae_scale, resolution // 4))
    return max(vae_scale, step - step % vae_scale)


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets: for every width that is a multiple of ``step``, the largest height
    (a multiple of ``step``) that keeps the area within ``resolution``², aspect at most ``max_ratio``."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_ratio:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    buckets.add((resolution - resolution % step, resolution - resolution % step))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log scale) the image's; larger area on a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 in [-1, 1], the same arithmetic as on the numpy array."""
    return pixels.float() / 127.5 - 1.0


Prepared = tuple["torch.Tensor", tuple[int, int], tuple[int, int]]


def prepare_pixels(path: Path, size: tuple[int, int]) -> Prepared:
    """The image scaled to cover ``size`` (width, height) and centre-cropped, as uint8 (3, H, W),
    with its original (height, width) and the crop's (top, left) in the scaled image: the
    numbers SDXL is conditioned on."""
    import torch  # lazy: torch takes 1.1 s to import

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"training image {path} cannot be read ({exc}); replace it or rerun stage export"
        ) from None
    width, height = size
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image_resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    crop = image_resized.crop((left, top, left + width, top + height))
    array = np.asarray(crop, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return pixels, (image.height, image.width), (top, left)


#: Bytes of prepared training images kept in memory when latents are not cached (uint8: 0.75 MB
#: per 512 px image, so 1 GiB holds about 1,400 of them).
PIXEL_MEMORY_BYTES = 1 << 30


class PixelMemory:
    """Training images as prepared for the VAE (decoded, scaled, cropped; uint8), kept in memory.

    Without ``cache_latents`` the VAE encodes every batch, but decoding and resizing the same
    files again on every step is work the reference trainers do not do (diffusers' DreamBooth
    scripts prepare every image once, at start): on small CPU runs it cost about a tenth of each
    step. Entries are keyed by file, size and modification time, so an edited image is prepared
    again. When the budget is full, new images are prepared each time and not kept: an epoch
    visits every image once, so evicting old ones (LRU) would only replace each entry before it
    is used again.
    """

    def __init__(self, budget_bytes: int = PIXEL_MEMORY_BYTES):
        self.budget = budget_bytes
        self.used = 0
        self.items: dict[tuple, Prepared] = {}

    def prepare(self, path: Path, size: tuple[int, int]) -> Prepared:
        """:func:`prepare_pixels` as a [-1, 1] float tensor, from memory when this image was
        prepared before."""
        try:
            stat = path.stat()
        except OSError:
            stat = None
        key = (str(path), size, stat.st_size if stat else None, stat.st_mtime_ns if stat else None)
        entry = self.items.get(key)
        if entry is None:
            entry = prepare_pixels(path, size)
            nbytes = entry[0].numel()
            if stat is not None and self.used + nbytes <= self.budget:
                self.items[key] = entry
                self.used += nbytes
        pixels, original, crop = entry
        return to_unit_range(pixels), original, crop


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding it."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"training image {path} cannot be read ({exc}); replace it or rerun stage export"
        ) from None


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (the latent cache key: a changed image is encoded again)."""
    return file_sha256(path)[:24]


def epoch_batches(
    bucket_of: Sequence[tuple[int, int]], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """The batches of one epoch (lists of sample indices; one bucket per batch): samples shuffled
    within their bucket, chunked, and the chunks shuffled. A function of (seed, epoch) only, which
    is what lets a resumed run see the batches the killed one would have seen."""
    rng = random.Random(seed * 100_003 + epoch)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(bucket_of):
        groups.setdefault(bucket, []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Sample:
    """One training sample after bucketing: image, caption, bucket (width, height)."""

    image: TrainImage
    bucket: tuple[int, int]


def dataset_key(images: Sequence[TrainImage]) -> str:
    """A fingerprint of the training data (captions, repeats, file sizes), part of the resume key."""
    digest = hashlib.sha256()
    for image in images:
        size = image.path.stat().st_size if image.path.exists() else -1
        digest.update(f"{image.path.name}|{image.text}|{image.repeats}|{size}\n".encode())
    return digest.hexdigest()[:16]
