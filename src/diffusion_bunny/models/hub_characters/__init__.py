"""Stronger character models from the Hugging Face hub (``characters.backend: hub``): their
settings, light enough for the configuration to import on every command. The models themselves
are in :mod:`diffusion_bunny.models.hub_characters.finder`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffusion_bunny.section import Section


class HubCharacterSettings(Section):
    """``characters.hub``: the opt-in hub models that find drawn and animated characters (read
    only when ``characters.backend`` is ``hub``; the offline default fits its own detector)."""

    #: The OWLv2 detector: a hub id (downloaded once into the Hugging Face cache, about 620 MB for
    #: the default) or a local folder holding one (``Owlv2ForObjectDetection`` + its processor).
    detector: str = "google/owlv2-base-patch16-ensemble"
    #: The model that gives each sighting its feature (who it is): DINOv2 (its CLS token) or SigLIP
    #: or CLIP (their pooled image feature); a hub id or a local folder.
    features: str = "facebook/dinov2-small"
    #: A sighting of a named character needs this image-guided score (sigmoid of OWLv2's logit
    #: against the best of the character's references).
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    #: Text queries that find characters in a film without references (any of them may match).
    discover_queries: tuple[str, ...] = (
        "an anime character",
        "a cartoon character",
        "a cartoon animal",
        "a creature",
    )
    #: A discovered sighting needs this text-guided score (text queries score lower than picture
    #: queries: OWLv2's text scores of a clear match are often 0.2-0.4).
    discover_score: float = Field(0.2, ge=0.0, le=1.0)
    #: Where both models run: ``auto`` is the GPU when torch sees one.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Frames (for the detector) or crops (for the features) a forward pass takes at once.
    batch_size: int = Field(8, ge=1, le=1024)
    #: Without references, sightings (their tracks' mean features) whose clusters are on average
    #: closer than this cosine distance are one character (:func:`~.finder.cluster_appearances`). Not
    #: calibrated here (the hub cannot be reached from where the project is built): DINOv2's
    #: features of one object in two views are typically 0.2-0.4 apart; lower it when two
    #: characters of one style share a cluster, raise it when one character is split.
    cluster_distance: float = Field(0.35, gt=0.0, lt=2.0)
