"""Stage 08 ``generate``: what the trained LoRA draws, and which checkpoint draws the characters
best.

* :mod:`.grid`: the checkpoints stage 07 left and the grid of prompts x seeds x scales (pure);
* :mod:`.render`: drawing the grid with the base model and each LoRA, resumable picture by picture;
* :mod:`.identity`: face-encoding distance to each human character's references, CLIP score, the
  best checkpoint (pure choice);
* :mod:`.drawn`: a drawn character's score, from the detector stage 03 fitted to its pictures;
* :mod:`.stage`: the stage on a run; :mod:`.tables`: ``generations``, ``generation_scores``;
* :mod:`.plots`: notebook 08's score plot and grids.

Its settings are its own section and the few of other stages it reads: the base model and LoRA
folder of ``training``, the trigger word of ``captioning`` and the face detector and references
of ``characters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.pipeline.contract import ConfigView, Reads, Stage
from diffusion_bunny.pipeline.manifest import file_fingerprint
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.registry import FACE_DETECTORS
from diffusion_bunny.stages.characters.tables import references_input


def _inputs(run: Run, cfg: ConfigView) -> dict[str, Any]:
    from diffusion_bunny.stages.generate.stage import (  # lazy: keeps tqdm out of `bunny --help` (0.05 s)
        selected_checkpoints,
    )

    return {
        # The LoRA files compared (a retrained one makes the stage stale).
        "checkpoints": {c.name: file_fingerprint(c.path) for c in selected_checkpoints(run, cfg)},
        "references": references_input(run.run_dir, cfg.characters),
        # The detector that scores the drawn characters' pictures (stage 03 fits it again when their
        # pictures or the film's frames change).
        "drawn_detector": _fitted_fingerprint(run),
    }


def _fitted_fingerprint(run: Run) -> Any:
    from diffusion_bunny.stages.generate.drawn import (  # lazy: keeps cv2 and tqdm out of `bunny --help`
        stage03_characters,
    )

    path = stage03_characters(run.read_manifest("characters"), run.run_dir).fitted_file
    return file_fingerprint(path) if path is not None and path.is_file() else None


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    return {"generated/": run.run_dir / "generated"}


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 08: pictures drawn, and the best checkpoint and its score;
    with no best (``generate.lora_scales`` only 0: the base model alone drawn), why none is, not
    "best None" (a manifest of before also counted the LoRA files that drew nothing)."""
    c, f = manifest["counts"], manifest["facts"]
    best, drawn = f.get("best_identity_distance"), f.get("best_drawn_score")
    parts = []
    if set(f.get("characters") or []) - set(f.get("drawn_characters") or []):  # people, or nobody named
        parts.append(f"identity distance {best:.2f}" if best is not None else f.get("no_face", "no face"))
    if f.get("drawn_characters"):
        parts.append(f"drawn score {drawn:.2f}" if drawn is not None else "drawn characters not scored")
    score = "; ".join(parts)
    images = f"{c['images']} images ({c['rendered_now']} drawn now, {c['reused']} reused)"
    if f.get("best_checkpoint") is None:
        return (
            f"{images} by the base model alone; no LoRA checkpoint compared "
            f"(generate.lora_scales has only 0) ({score})"
        )
    return f"{images} over {c['checkpoints']} checkpoints; best {f['best_checkpoint']} ({score})"


def _detectors(cfg: ConfigView) -> tuple[tuple[frozenset[str], str], ...]:
    # The face detector finds the faces (stage 08: in the generated pictures, to score them).
    return (FACE_DETECTORS.code_choice(cfg.characters.detector),)


STAGE = Stage(
    name="generate",
    notebook="08_generate.ipynb",
    package=__name__,
    summary=summary,
    reads=(
        # The references are also the confidently named faces: a relabel of stage 03 changes them.
        Reads(
            "faces",
            "characters",
            ("face_id", "frame_id", "character", "low_confidence", "embedding", "kind"),
            optional=True,
        ),
        # Which of the LoRAs kept stage 07 trained last (the folder drawn with).
        Reads("loras", "train", ("folder", "current"), optional=True),
    ),
    config=(
        "generate",
        "train.base_model",
        "train.family",
        "train.output_dir",
        "train.resolution",
        "captions.trigger_word",
        "captions.character_descriptions",
        "characters",
    ),
    writes=("generations", "generation_scores"),
    owns=_owns,
    inputs=_inputs,
    detectors=_detectors,
)
