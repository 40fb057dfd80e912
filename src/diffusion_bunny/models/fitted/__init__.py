"""The reference-fitted character detector (:mod:`.detector`) and its settings.

The settings live here, apart from the torch code, because the configuration reads them on every
``bunny`` command and must not import OpenCV or torch to do so.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffusion_bunny.section import MAX_SEED, Section


class FittedSettings(Section):
    """``characters.fitted``: how the reference-fitted detector is trained and how it searches."""

    #: Training steps (batches of pasted pictures).
    steps: int = Field(1000, ge=10, le=100_000)
    batch: int = Field(16, ge=1, le=512)
    #: Side of a training picture in pixels.
    crop: int = Field(192, ge=64, le=1024)
    #: Widths the frame is searched at (each a multiple of 32 after rounding).
    widths: tuple[int, ...] = (512, 224)
    #: A detection's heat-map peak must reach this to name the character.
    min_score: float = Field(0.5, gt=0.0, lt=1.0)
    #: Search the film's frames halfway through training (and again at three quarters) and learn
    #: from what is found there.
    self_training: bool = True
    #: Found there from this score on: not taught as background.
    ignore_score: float = Field(0.25, gt=0.0, lt=1.0)
    #: Found there from this score on: taught as that character.
    positive_score: float = Field(0.5, gt=0.0, le=1.0)
    #: A character its own heat map finds at this score on none of the film's frames is taken as
    #: not in the film, and the detector is fitted again without it (None: never). Each character
    #: must also refuse every other one, so characters of other films weaken the fit of those in
    #: this one (a frog of a 2-character fit scored 0.69 on its film, of a 6-character fit 0.35).
    cast_score: float | None = Field(0.15, gt=0.0, lt=1.0)
    #: At most this many of the film's frames serve as backgrounds (evenly spaced).
    backgrounds: int = Field(120, ge=1, le=100_000)
    #: Torch threads while training on the CPU (0: one; the training pictures are made on a
    #: thread of their own beside it, and torch's threads spin-wait for each other on a busy
    #: machine).
    threads: int = Field(0, ge=0, le=256)
    #: Where the network trains: ``auto`` is the GPU when torch sees one (the search always runs
    #: on the CPU, on ONNX Runtime). Not part of the fit's key: a fit made on one device serves
    #: the other.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Threads that make the training pictures (0: one on the CPU, where torch's step is the
    #: slower; up to 4 on a GPU, which otherwise waits for them). Each thread draws from a random
    #: stream of its own, so another count is another draw of the same kind of pictures: not
    #: part of the fit's key, as the device is not.
    batch_threads: int = Field(0, ge=0, le=64)
    #: Seeds torch's generator: at most MAX_SEED (a larger one stopped stage 03 with an overflow
    #: inside torch).
    seed: int = Field(0, ge=0, le=MAX_SEED)
