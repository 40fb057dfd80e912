"""How well a checkpoint draws a character: face-encoding distance of the pictures' faces to the
character's references (stage 03's reference photos and its confidently named faces) for a human
character, the score of the model stage 03 found a drawn one with (:mod:`.drawn`), an optional
CLIP score, and the pure choice of the best checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diffusion_bunny.errors import ConfigError, StageError
from diffusion_bunny.logs import relay_bar_class
from diffusion_bunny.models.clip import ClipEmbedder
from diffusion_bunny.models.faces import (
    DetectSettings,
    character_folders,
    detect_and_encode,
    read_rgb,
)
from diffusion_bunny.stages.characters.tables import reference_faces
from diffusion_bunny.stages.generate.drawn import DrawnScorer, HubDrawnScorer
from diffusion_bunny.stages.generate.grid import GridItem
from diffusion_bunny.stages.generate.tables import BASE, NO_CHARACTER, SCORES_SCHEMA

#: Mean drawn scores are compared to this many decimals: a detector's confidence moving in the third
#: decimal is noise (the demo's LoRA checkpoints, which barely change its pictures, differed by 0.0005).
DRAWN_DECIMALS = 2
#: Generated images at most this many pixels on their short side are searched for faces once
#: more with one more upsampling when the first pass finds none (HOG's window is 80 px).
SMALL_IMAGE_SIDE = 256


# ---------------------------------------------------------------------------------------------
# Identity


@dataclass
class CharacterReferences:
    """Face encodings per human character that a generated face is compared with, and where they
    came from (reference photos, named faces of the movie); and the drawn characters stage 03
    named in the film (no face to compare: :mod:`.drawn` scores them)."""

    encodings: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    drawn: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [*self.encodings, *(n for n in self.drawn if n not in self.encodings)]


def character_references(
    ref_dir: Path | None,
    faces: pl.DataFrame | None,
    settings: DetectSettings,
    drawn_pictures: frozenset[str] = frozenset(),
) -> tuple[CharacterReferences, list[str]]:
    """The encodings of each named character: stage 03's reference photos (encoded again by stage
    03's own loader) and the faces of the movie stage 03 named after it, leaving out low-confidence ones.
    Returns the references and the reference folder's warnings.

    Identity is a human face's distance: a character none of whose pictures shows a face (a drawn
    character) has no encoding to compare, so its pictures are not warned about again (stage 03
    said what it took from each); its rows of ``faces`` (``kind`` ``drawn``) name it in
    :attr:`CharacterReferences.drawn`. ``drawn_pictures`` are the characters stage 03 took as
    drawn (its manifest's cut-outs): their pictures give no encoding here even where a face
    detector sees a face in a cartoon's (stage 03 confirms a photo's face with a second detector
    trained on photographs; this loader alone would take a cartoon bat's face for a person's)."""
    out = CharacterReferences()
    warnings: list[str] = []
    per_char: dict[str, list[np.ndarray]] = {}
    if faces is not None and faces.height and "kind" in faces.columns:
        drawn = faces.filter((pl.col("kind") == "drawn") & pl.col("character").is_not_null())
        out.drawn = sorted(drawn["character"].unique().to_list())
        faces = faces.filter(pl.col("kind").fill_null("face") == "face")
    if ref_dir is not None:
        # Read as stage 03 reads them (transparency on grey, a face confirmed as photographed):
        # a picture stage 03 left out of a character is no reference of it here either.
        refs, warnings = reference_faces(ref_dir, settings)
        folders_of = character_folders(ref_dir)
        skipped = [name for name in folders_of if name not in refs.names or name in drawn_pictures]
        folders = [str(f) for name in skipped for f in folders_of[name]]
        warnings = [w for w in warnings if not any(f"{f}/" in w or w.endswith(f) for f in folders)]
        for i, name in enumerate(refs.names):
            if name in drawn_pictures:
                continue
            own = refs.encodings[refs.owners == i]
            per_char[name] = [own]
            out.sources[name] = {"reference_images": len(own), "movie_faces": 0}
    if faces is not None and faces.height:
        named = faces.filter(pl.col("character").is_not_null())
        if "low_confidence" in named.columns:
            named = named.filter(~pl.col("low_confidence").fill_null(False))
        for name in sorted(named["character"].unique().to_list()):
            vecs = np.asarray(named.filter(pl.col("character") == name)["embedding"].to_list(), np.float32)
            per_char.setdefault(name, []).append(vecs.reshape(len(vecs), -1))
            out.sources.setdefault(name, {"reference_images": 0, "movie_faces": 0})["movie_faces"] = len(vecs)
    out.encodings = {name: np.concatenate(parts).astype(np.float32) for name, parts in per_char.items()}
    return out, warnings


@dataclass(frozen=True)
class IdentityScore:
    """One picture's scores: faces found and the best one's distance (a human character), and the
    drawn scorer's (a drawn one; None for any other)."""

    faces: int
    distance: float | None
    drawn: float | None = None


def score_identity(rgb: np.ndarray, references: np.ndarray | None, settings: DetectSettings) -> IdentityScore:
    """Find the faces of a generated image and return how many, and the distance of the best one to
    the nearest of ``references`` (None without a face or without references)."""
    faces = detect_and_encode(rgb, settings)
    if not faces and min(rgb.shape[:2]) <= SMALL_IMAGE_SIDE:
        faces = detect_and_encode(rgb, settings.finer())
    if not faces or references is None or len(references) == 0:
        return IdentityScore(len(faces), None)
    enc = np.stack([f.encoding for f in faces]).astype(np.float32)
    dist = np.sqrt(((enc[:, None, :] - references[None, :, :]) ** 2).sum(-1))
    return IdentityScore(len(faces), float(dist.min()))


def score_images(
    run_dir: Path,
    items: Sequence[GridItem],
    references: CharacterReferences,
    settings: DetectSettings,
    *,
    drawn: DrawnScorer | HubDrawnScorer | None = None,
    progress: bool = False,
) -> list[IdentityScore]:
    """:func:`score_identity` for every image of the grid (faces need no minimum size here: a
    generated portrait may be small), and for a drawn character's pictures the score of ``drawn``
    (stage 03's fitted detector, or OWLv2 with the hub backend)."""
    settings = replace(settings, min_face_px=0)
    out: list[IdentityScore] = []
    # relayed: under `bunny run` the terminal shows it too (a grid of many checkpoints takes a while)
    for item in relay_bar_class()(items, unit="image", desc="identity", disable=not progress):
        rgb = read_rgb(run_dir / item.rel_path)
        if rgb is None:
            raise StageError(f"generated image {run_dir / item.rel_path} cannot be read; rerun with --force")
        score = score_identity(rgb, references.encodings.get(item.character), settings)
        if drawn is not None and item.character in references.drawn:
            score = replace(score, drawn=drawn.score(rgb, item.character))
        out.append(score)
    return out


def clip_scores(
    paths: Sequence[Path], prompts: Sequence[str], embedder: Any, *, progress: bool = False
) -> list[float]:
    """CLIP score per image: 100 x cosine of its image and prompt embeddings, floored at 0 (as
    torchmetrics' ``CLIPScore``). ``embedder`` is an :class:`~diffusion_bunny.models.clip.ClipEmbedder`."""
    images = embedder.embed_images(list(paths), progress=progress)
    unique = sorted(set(prompts))
    texts = dict(zip(unique, embedder.embed_texts(unique), strict=True))
    return [max(0.0, 100.0 * float(img @ texts[p])) for img, p in zip(images, prompts, strict=True)]


def load_clip(model: str, device: str) -> Any:
    """The CLIP model of ``generate.clip_model`` through the loading code of stage 04 (local
    files only); a failure is one ModelError naming ``generate.clip_model``."""
    instead = "a local CLIP folder (downloaded once where there is network), or to null for no CLIP score"
    return ClipEmbedder(model, device=device, setting="generate.clip_model", instead=instead)


# ---------------------------------------------------------------------------------------------
# Choosing the checkpoint (pure)


def checkpoint_scores(generations: pl.DataFrame, order: Sequence[str]) -> pl.DataFrame:
    """Per checkpoint (``base`` first, then ``order``): images, images with a face and their share,
    mean identity distance over the images with a face (lower is better), the drawn characters'
    pictures scored, those showing the character (``drawn_found``) and their share, the mean
    fitted-detector score (higher is better), mean CLIP score, and which checkpoint is best
    (:func:`pick_best`; ``base`` never is)."""
    rows = []
    for rank, name in enumerate([BASE, *order]):
        sub = generations.filter(pl.col("checkpoint") == name)
        if sub.height == 0:
            continue
        with_face = int(sub["face_found"].sum())
        dist = sub["identity_distance"].drop_nulls()
        drawn = sub["drawn_score"].drop_nulls()
        found = int(sub["drawn_found"].fill_null(False).sum())
        clip = sub["clip_score"].drop_nulls()
        rows.append(
            {
                "checkpoint": name,
                "step": sub["step"][0],
                "order": rank - 1,
                "images": sub.height,
                "with_face": with_face,
                "face_share": with_face / sub.height,
                "identity_distance": float(dist.mean()) if dist.len() else None,
                "drawn_images": drawn.len(),
                "drawn_found": found,
                "drawn_share": found / drawn.len() if drawn.len() else None,
                "drawn_score": float(drawn.mean()) if drawn.len() else None,
                "clip_score": float(clip.mean()) if clip.len() else None,
                "best": False,
            }
        )
    scores = pl.DataFrame(rows, schema=SCORES_SCHEMA)
    best = pick_best(scores)
    # False, not null, without a checkpoint to choose (only the base model drawn): ``== None`` is
    # null, and polars warns of the comparison.
    chosen = pl.col("checkpoint") == best if best is not None else pl.lit(False)
    return scores.with_columns(chosen.alias("best"))


def pick_best(scores: pl.DataFrame) -> str | None:
    """The checkpoint with the lowest mean identity distance; where no checkpoint has a scored
    face, the one with the highest mean drawn-character score (to :data:`DRAWN_DECIMALS`
    decimals); on a tie, or with neither, the latest one (highest ``order``). A face's distance
    goes first because it is the measure stage 03 names people by and is comparable across
    characters; a drawn character's score is a detector's confidence, fitted to that film.
    ``base`` is not a candidate; None without any checkpoint."""
    cand = scores.filter(pl.col("checkpoint") != BASE).sort("order")
    if cand.height == 0:
        return None
    scored = cand.filter(pl.col("identity_distance").is_not_null())
    if scored.height:
        best = scored["identity_distance"].min()
        return scored.filter(pl.col("identity_distance") == best)["checkpoint"][-1]
    drawn = cand.filter(pl.col("drawn_score").is_not_null()).with_columns(
        pl.col("drawn_score").round(DRAWN_DECIMALS)
    )
    if drawn.height:
        best = drawn["drawn_score"].max()
        return drawn.filter(pl.col("drawn_score") == best)["checkpoint"][-1]
    return cand["checkpoint"][-1]


def characters_to_draw(
    references: CharacterReferences, wanted: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The characters of the grid (``generate.characters``, or every named one: the human
    characters with references or named faces, the drawn ones stage 03 named) and warnings.
    A configured name stage 03 does not know is a ConfigError (a typo would otherwise cost a grid
    of unscorable images); nobody named means one grid with the trigger word alone."""
    known = references.names
    if wanted is not None:
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ConfigError(
                f"generate.characters: {unknown[0]!r} is not a character of this run (known: "
                f"{', '.join(known) or 'none'}); fix the name or set null for all"
            )
        return list(wanted), []
    if not known:
        return [NO_CHARACTER], [
            "no named characters (stage 03 has no references and no named faces): the grid uses the "
            "trigger word alone and cannot score identity; name characters in notebook 03 for that"
        ]
    return list(known), []
