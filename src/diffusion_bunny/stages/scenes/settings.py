"""Stage 04's settings (``scenes``): embeddings, clustering, the adapter and the library.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from diffusion_bunny.section import MAX_SEED, Section


class ScenesSettings(Section):
    """Settings of stage 04 (``scenes``): scene embeddings, two-level clustering, the adapter
    learned from a person's corrections, and the shared library of clusters."""

    embedder: Literal["descriptor", "clip"] = "descriptor"
    clip_model: str = "openai/clip-vit-base-patch32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1, le=4096)
    frames: Literal["kept", "all"] = "kept"
    assign_threshold: float = Field(0.85, gt=-1.0, le=1.0)
    noise_threshold: float = Field(0.5, ge=-1.0, lt=1.0)
    index_min_frames: int = Field(50_000, ge=0, le=100_000_000)
    library_dir: str | None = None
    adapter: Literal["auto", "off"] = "auto"
    adapter_hidden: int = Field(0, ge=0, le=4096)
    adapter_epochs: int = Field(300, ge=1, le=100_000)
    adapter_lr: float = Field(0.01, gt=0.0, le=10.0)
    adapter_margin: float = Field(0.2, gt=0.0, le=2.0)
    adapter_identity_weight: float = Field(1.0, ge=0.0, le=1000.0)
    #: Seeds the adapter's torch generator: at most MAX_SEED (a larger one stopped the stage with
    #: an overflow inside torch).
    seed: int = Field(0, ge=0, le=MAX_SEED)
    board_max_thumbs: int = Field(120, ge=1, le=100_000)

    @field_validator("library_dir")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        """A blank folder is no library, as in the other folder settings: ``Path("")`` is the current
        folder, and the scene library went into the checkout."""
        return value if value is None or value.strip() else None

    @model_validator(mode="after")
    def _threshold_order(self) -> ScenesSettings:
        if self.noise_threshold >= self.assign_threshold:
            raise ValueError(
                f"noise_threshold ({self.noise_threshold}) must be under assign_threshold "
                f"({self.assign_threshold})"
            )
        return self
