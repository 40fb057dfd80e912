"""Stage 05 ``captions``: a caption per frame, offline from the tables or from a vision LLM
(OpenAI, Anthropic, a local OpenAI-compatible server, AWS Bedrock), never paid for twice, editable
by hand.

* :mod:`.facts`: what each frame shows (who, how close, moving or not, which scene, how light),
  pure over the tables of stages 01-04, and the offline template caption built from it;
* :mod:`.providers`: the providers behind one interface, with rate limits, retries, circuit
  breakers and the answer cache;
* :mod:`.stage`: the stage on a run, and the edit API notebook 05 calls
  (:func:`~diffusion_bunny.stages.captions.stage.edit_caption`);
* :mod:`.tables`: ``captions``, ``caption_edits`` and which captions a dataset may use;
* :mod:`.plots`, :mod:`.widgets`: notebook 05's figures and caption editor.
"""

from __future__ import annotations

from typing import Any

from diffusion_bunny.pipeline.contract import Reads, Stage
from diffusion_bunny.stages.extract.tables import BOX_COLUMNS, REGION_COLUMNS


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 05: captioned, failed, edited, and what was paid for."""
    c, f = manifest["counts"], manifest["facts"]
    by = ", ".join(f"{k.removeprefix('by_')} {v}" for k, v in c.items() if k.startswith("by_"))
    gone = c.get("edits_on_frames_gone")
    gone = f" ({gone} more of frames no longer kept)" if gone else ""
    return (
        f"{c['captioned']} of {c['frames']} frames captioned ({by or 'none'}), {c['failed']} failed, "
        f"{c['edited']} edited by hand{gone}; {c['paid_requests']} paid request(s) this run, "
        f"{c['cache_hits']} answer(s) from the cache; prompt {f['prompt_version']}"
    )


STAGE = Stage(
    name="captions",
    notebook="05_caption.ipynb",
    package=__name__,
    summary=summary,
    reads=(
        Reads("frames", "extract", ("frame_id", "path", "shot_id", "width", "height", *BOX_COLUMNS)),
        Reads("quality", "quality", ("frame_id", "keep", "brightness", *REGION_COLUMNS)),
        Reads("shots", "extract", ("shot_id", "kind"), optional=True),
        # low_confidence: whether a face named as a person counts (captions.facts.faces_are_people);
        # edited: a face fixed to none is no one (captions.facts.without_false_sightings).
        Reads(
            "faces",
            "characters",
            ("frame_id", "character", "top", "bottom", "kind", "low_confidence", "edited"),
            optional=True,
        ),
        Reads("face_frames", "characters", ("frame_id", "status"), optional=True),
        Reads("clusters", "scenes", ("frame_id", "level", "cluster_id"), optional=True),
        # A person's edits: re-applied on top of every rerun.
        Reads("caption_edits", "captions", ("event_id",), optional=True, nonempty=True),
    ),
    config=("captions", "run.seed"),
    writes=("captions", "caption_calls"),
    edits=("caption_edits",),  # the captions people type (edit_caption)
)
