"""Stage 07 ``train``: a LoRA fine-tuned on the dataset stage 06 exported, with diffusers, peft
and accelerate, resumable after a kill.

* :mod:`.data`: the pictures and captions, aspect-ratio buckets, the seeded batch order;
* :mod:`.lora`: the training loop (cached latents, checkpoints, validation images, resume);
* :mod:`.stage`: the stage on a run;
* :mod:`.tables`: ``training_log``, ``training_validation`` and where the LoRA files go;
* :mod:`.plots`: notebook 07's loss curve and validation grid.

Base models (presets built in code, the hub cache, a local folder) are
:mod:`diffusion_bunny.models.diffusion`'s business; stage 08 loads the LoRA with it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_bunny.pipeline.contract import ConfigView, Reads, Stage
from diffusion_bunny.pipeline.run import Run, from_run_fact
from diffusion_bunny.stages.train.tables import checkpoint_dir, current_lora_dir, describe_loras, kept_loras


def _owns(run: Run, cfg: ConfigView) -> dict[str, Path]:
    # The LoRA folders (one per training, named by what it trains: files, checkpoints, validation
    # pictures) under train.output_dir, else <run>/loras/.
    return {"LoRA folder": checkpoint_dir(run.run_dir, cfg.train)}


def kept(run: Run, cfg: ConfigView) -> list[str]:
    """One line per LoRA kept for this run (``bunny status``, notebooks 07 and 08)."""
    base = checkpoint_dir(run.run_dir, cfg.train)
    return describe_loras(kept_loras(base, current=current_lora_dir(base, run.optional_table("loras"))))


def summary(manifest: dict[str, Any]) -> str:
    """One line about a run of stage 07: steps, data, base model, loss and where the LoRA is."""
    c, f = manifest["counts"], manifest["facts"]
    loss = f"{c['final_loss']:.3f}" if c.get("final_loss") is not None else "none"
    resumed = f", resumed from checkpoint-{f['resumed_from']}" if f.get("resumed_from") else ""
    if f.get("resumed_from_folder"):
        resumed += f" of {Path(f['resumed_from_folder']).name}"
    kept = f" ({f['loras_kept']} LoRAs kept)" if f.get("loras_kept", 1) > 1 else ""
    lora = from_run_fact(f["lora_path"], manifest.get("run_folder", ""))
    return (
        f"{c['steps']} steps on {c['images']} images ({f['base_model']}, {f['device']}){resumed}, "
        f"final loss {loss}; LoRA in {lora}{kept}"
    )


STAGE = Stage(
    name="train",
    notebook="07_finetune_lora.ipynb",
    package=__name__,
    summary=summary,
    reads=(Reads("dataset_items", "export"),),
    config=("train",),
    writes=("training_log", "training_validation", "loras"),
    owns=_owns,
    kept=kept,
)
