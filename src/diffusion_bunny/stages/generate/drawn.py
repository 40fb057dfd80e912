"""How well a picture shows a drawn character: the detector stage 03 fitted to that character's
pictures on the film's frames, run on the generated picture.

A drawn character (a cartoon animal, a sprite, a 3D creature) has no human face, so the face
distance that scores a person says nothing about it. The detector stage 03 fitted to it is the one
model that knows it, in the film's own look: its heat-map peak for the character is the score
(0-1), and the picture shows the character when it reaches the score stage 03 names a sighting at
(``characters.fitted.min_score``). What stage 08 needs of stage 03 it reads from stage 03's
manifest (the stages' import rule keeps stage 03's code out of here): the detector's file and which
characters it took as drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_bunny.models.fitted.detector import FittedDetector
from diffusion_bunny.stages.characters.tables import CHARACTERS_CACHE

#: Peaks under this are not even looked at: a picture without the character scores 0.
FLOOR = 0.01


@dataclass(frozen=True)
class Stage03Characters:
    """What stage 03's manifest says of the characters: the fitted detector's file (None without
    one: no drawn character's picture, or the hub backend) and the characters whose pictures it
    took as drawn (cut-outs)."""

    fitted_file: Path | None = None
    drawn: frozenset[str] = frozenset()
    backend: str = "offline"


def stage03_characters(manifest: dict[str, Any] | None, run_dir: Path | None = None) -> Stage03Characters:
    """:class:`Stage03Characters` from stage 03's manifest (an empty one without it). The
    detector's file is looked for in ``run_dir``'s own ``cache/characters/`` first: the manifest
    holds the path it had when stage 03 ran, and a run folder may have been moved or copied since."""
    facts = (manifest or {}).get("facts") or {}
    taken = facts.get("references_taken") or []
    fitted = facts.get("fitted") or {}
    file = Path(fitted["file"]) if fitted.get("file") else None
    if file is not None and run_dir is not None and (Path(run_dir) / CHARACTERS_CACHE / file.name).is_file():
        file = Path(run_dir) / CHARACTERS_CACHE / file.name
    return Stage03Characters(
        fitted_file=file,
        drawn=frozenset(r["character"] for r in taken if r.get("use") == "cutout"),
        backend="hub" if "hub" in facts else "offline",
    )


class DrawnScorer:
    """Scores generated pictures of the characters a fitted detector knows."""

    def __init__(self, detector: FittedDetector) -> None:
        self.detector = detector

    @property
    def names(self) -> list[str]:
        return list(self.detector.names)

    @property
    def min_score(self) -> float:
        """The score from which a sighting names the character (the detector's own setting)."""
        return float(self.detector.settings.min_score)

    def score(self, rgb: np.ndarray, name: str) -> float | None:
        """The detector's highest peak for ``name`` in ``rgb`` (0 where it finds nothing of it);
        None for a character the detector does not know. Its boxes are not held to a size: a
        detector fitted to head crops too peaks on a full figure's head."""
        if name not in self.detector.names:
            return None
        index = self.detector.names.index(name)
        hits = [h.score for h in self.detector.detect(rgb, FLOOR) if h.index == index]
        return max(hits, default=0.0)


def load_drawn_scorer(
    characters: Stage03Characters, wanted: list[str]
) -> tuple[DrawnScorer | None, list[str]]:
    """The scorer for the drawn characters among ``wanted`` and the warnings: one line when they
    cannot be scored (the hub backend, or a fitted detector file that is gone or damaged). None
    when no drawn character is wanted."""
    if not wanted:
        return None, []
    names = ", ".join(wanted)
    if characters.fitted_file is None:
        why = (
            "characters.backend is hub, and its models do not score generated pictures"
            if characters.backend == "hub"
            else "stage 03 kept no fitted detector"
        )
        return None, [f"the pictures of {names} are drawn but not scored: {why}"]
    detector = FittedDetector.load(characters.fitted_file)
    if detector is None:
        return None, [
            f"the pictures of {names} are drawn but not scored: stage 03's fitted detector "
            f"{characters.fitted_file} is gone or cannot be read; rerun stage characters "
            "(bunny run MOVIE --stages characters --force) to fit it again"
        ]
    return DrawnScorer(detector), []
