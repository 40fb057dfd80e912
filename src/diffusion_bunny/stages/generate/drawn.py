"""How well a picture shows a drawn character: the model stage 03 found that character with, run
on the generated picture.

A drawn character (a cartoon animal, a sprite, a 3D creature) has no human face, so the face
distance that scores a person says nothing about it. The model that found it in the film knows it:

* offline (the default), the detector stage 03 fitted to its pictures on the film's frames
  (:class:`DrawnScorer`): its heat-map peak for the character is the score (0-1);
* with ``characters.backend: hub``, OWLv2 guided by the character's cut-outs, as stage 03 searched
  with it (:class:`HubDrawnScorer`): the best image-guided score anywhere in the picture.

The picture shows the character when the score reaches the one stage 03 names a sighting at
(``characters.fitted.min_score`` or ``characters.hub.min_score``). What stage 08 needs of stage 03
it reads from stage 03's manifest (the stages' import rule keeps stage 03's code out of here): the
detector's file, which characters it took as drawn and the files of their cut-outs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.fitted.detector import FittedDetector
from diffusion_bunny.models.hub_characters import HubCharacterSettings
from diffusion_bunny.models.hub_characters.finder import HubFinder, model_folder
from diffusion_bunny.stages.characters.tables import CHARACTERS_CACHE

#: Peaks under this are not even looked at: a picture without the character scores 0.
FLOOR = 0.01


@dataclass(frozen=True)
class Stage03Characters:
    """What stage 03's manifest says of the characters: the fitted detector's file (None without
    one: no drawn character's picture, or the hub backend), the characters whose pictures it
    took as drawn, and the files of their cut-outs (character, file)."""

    fitted_file: Path | None = None
    drawn: frozenset[str] = frozenset()
    backend: str = "offline"
    cutouts: tuple[tuple[str, Path], ...] = ()


def stage03_characters(manifest: dict[str, Any] | None, run_dir: Path | None = None) -> Stage03Characters:
    """:class:`Stage03Characters` from stage 03's manifest (an empty one without it). The
    detector's file is looked for in ``run_dir``'s own ``cache/characters/`` first: the manifest
    holds the path it had when stage 03 ran, and a run folder may have been moved or copied since."""
    facts = (manifest or {}).get("facts") or {}
    taken = facts.get("references_taken") or []
    fitted = facts.get("fitted") or {}
    file = Path(fitted["file"]) if fitted.get("file") else None
    return Stage03Characters(
        fitted_file=_in_run(file, run_dir, CHARACTERS_CACHE) if file is not None else None,
        drawn=frozenset(r["character"] for r in taken if r.get("use") == "cutout"),
        backend="hub" if "hub" in facts else "offline",
        cutouts=tuple(
            (r["character"], _in_run(Path(r["cutout"]), run_dir, f"{CHARACTERS_CACHE}/cutouts"))
            for r in taken
            if r.get("use") == "cutout" and r.get("cutout")
        ),
    )


def _in_run(file: Path, run_dir: Path | None, folder: str) -> Path:
    """``file`` in ``run_dir``'s own ``folder`` when it is there (a moved or copied run folder),
    else as the manifest wrote it."""
    if run_dir is not None and (Path(run_dir) / folder / file.name).is_file():
        return Path(run_dir) / folder / file.name
    return file


class DrawnScorer:
    """Scores generated pictures of the characters a fitted detector knows."""

    #: What scores, and the setting its ``min_score`` comes from (for the run's warning line).
    model = "stage 03's fitted detector"
    setting = "characters.fitted.min_score"
    #: Why the pictures went unscored (the detector is loaded before: never here).
    failed: str | None = None

    def __init__(self, detector: FittedDetector, min_score: float | None = None) -> None:
        self.detector = detector
        self._min_score = min_score

    @property
    def names(self) -> list[str]:
        return list(self.detector.names)

    @property
    def min_score(self) -> float:
        """The score from which a sighting names the character: the run's own
        ``characters.fitted.min_score``, as stage 03 names with it. A fit is reused across that
        setting (it is no part of the fit's key), so the detector's file holds the value of the
        run that fitted it: a run at 0.75 counted the pictures found at 0.5. The file's value only
        where no setting is given."""
        return float(self._min_score if self._min_score is not None else self.detector.settings.min_score)

    def score(self, rgb: np.ndarray, name: str) -> float | None:
        """The detector's highest peak for ``name`` in ``rgb`` (0 where it finds nothing of it);
        None for a character the detector does not know. Its boxes are not held to a size: a
        detector fitted to head crops too peaks on a full figure's head."""
        if name not in self.detector.names:
            return None
        index = self.detector.names.index(name)
        hits = [h.score for h in self.detector.detect(rgb, FLOOR) if h.index == index]
        return max(hits, default=0.0)


class HubDrawnScorer:
    """Scores generated pictures of drawn characters with OWLv2 guided by their cut-outs, as stage
    03 searched the film with ``characters.backend: hub`` (:meth:`HubFinder.character_scores`).

    OWLv2 is loaded at the first picture scored, not before: stage 08 draws every picture first
    and lets the diffusion model go, so the two never share the GPU's memory. Whether it can be had
    is checked before (:func:`_hub_scorer`); one whose folder is there but fails to load then
    leaves the pictures unscored and says why in :attr:`failed` (a warning line)."""

    model = "OWLv2 (characters.hub.detector)"
    setting = "characters.hub.min_score"

    def __init__(self, settings: HubCharacterSettings, cutouts: dict[str, list[np.ndarray]]) -> None:
        self.settings = settings
        self.cutouts = cutouts
        self.failed: str | None = None
        self._finder: HubFinder | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.cutouts)

    @property
    def min_score(self) -> float:
        return float(self.settings.min_score)

    @property
    def finder(self) -> HubFinder:
        """OWLv2 with the cut-outs as queries (loaded once, no features model)."""
        if self._finder is None:
            self._finder = HubFinder(self.settings, self.cutouts, with_features=False)
        return self._finder

    def score(self, rgb: np.ndarray, name: str) -> float | None:
        """The best score of ``name``'s cut-outs anywhere in ``rgb``; None for a character without
        cut-outs, or once the model failed to load."""
        if name not in self.cutouts or self.failed is not None:
            return None
        try:
            finder = self.finder
        except ModelError as exc:
            self.failed = str(exc)
            return None
        return float(finder.character_scores([rgb])[0, finder.names.index(name)])


def _hub_scorer(
    characters: Stage03Characters, wanted: list[str], settings: HubCharacterSettings | None
) -> tuple[HubDrawnScorer | None, list[str]]:
    """:func:`load_drawn_scorer` for the hub backend: OWLv2 guided by the wanted characters' cut-outs
    (stage 03's files). The model is looked for now (downloaded when it must be, one line when it
    cannot be had) and loaded when the first picture is scored."""
    names = ", ".join(wanted)
    if settings is None:
        return None, [f"the pictures of {names} are drawn but not scored: no characters.hub settings given"]
    cutouts: dict[str, list[np.ndarray]] = {}
    for name, file in characters.cutouts:
        picture = cv2.imread(str(file), cv2.IMREAD_UNCHANGED) if name in wanted else None
        if picture is not None and picture.ndim == 3 and picture.shape[2] == 4:
            cutouts.setdefault(name, []).append(cv2.cvtColor(picture, cv2.COLOR_BGRA2RGBA))
    missing = [n for n in wanted if n not in cutouts]
    warnings = []
    if missing:
        warnings.append(
            f"the pictures of {', '.join(missing)} are drawn but not scored: stage 03's cut-outs of them "
            "are gone or cannot be read; rerun stage characters (bunny run MOVIE --stages characters "
            "--force) to cut them out again"
        )
    if not cutouts:
        return None, warnings
    try:
        model_folder(settings.detector, "characters.hub.detector")
    except ModelError as exc:
        # Before any drawing, as a CLIP model that cannot be had stops it: a warning after minutes
        # of drawing left the stage done with its best checkpoint picked unscored, and the model
        # once back, a rerun skipped the stage as up to date.
        scored = ", ".join(sorted(cutouts))
        raise ModelError(
            f"{exc}; stage 08 scores the pictures of {scored} with it (stage 03 ran with "
            "characters.backend: hub), or leave them out of generate.characters"
        ) from None
    return HubDrawnScorer(settings, cutouts), warnings


def load_drawn_scorer(
    characters: Stage03Characters,
    wanted: list[str],
    hub: HubCharacterSettings | None = None,
    min_score: float | None = None,
) -> tuple[DrawnScorer | HubDrawnScorer | None, list[str]]:
    """The scorer for the drawn characters among ``wanted`` and the warnings: one line when they
    cannot be scored (a fitted detector file or cut-outs that are gone or damaged). None when no
    drawn character is wanted. ``hub``: the settings of the hub's models, used when stage 03 ran
    with ``characters.backend: hub`` (one that cannot be had is a :class:`ModelError`);
    ``min_score``: ``characters.fitted.min_score`` of the run (:attr:`DrawnScorer.min_score`)."""
    if not wanted:
        return None, []
    if characters.backend == "hub":
        return _hub_scorer(characters, wanted, hub)
    names = ", ".join(wanted)
    if characters.fitted_file is None:
        return None, [f"the pictures of {names} are drawn but not scored: stage 03 kept no fitted detector"]
    detector = FittedDetector.load(characters.fitted_file)
    if detector is None:
        return None, [
            f"the pictures of {names} are drawn but not scored: stage 03's fitted detector "
            f"{characters.fitted_file} is gone or cannot be read; rerun stage characters "
            "(bunny run MOVIE --stages characters --force) to fit it again"
        ]
    scorer = DrawnScorer(detector, min_score)
    return scorer, _unknown_to(scorer, wanted)


def _unknown_to(scorer: DrawnScorer | HubDrawnScorer, wanted: list[str]) -> list[str]:
    """One line for the drawn characters the scorer has no pictures of: a name given by hand in
    notebook 03 to a character no reference folder holds. Their pictures were drawn and silently
    left out of every score and count (36 of 180 of a SuperTux run's)."""
    unknown = [name for name in wanted if name not in scorer.names]
    if not unknown:
        return []
    return [
        f"the pictures of {', '.join(unknown)} are drawn but not scored: stage 03 has no pictures of "
        "them (named by hand); add a still from the film of each (notebook 03, or add_still) or "
        "pictures of them, then rerun stage characters"
    ]
