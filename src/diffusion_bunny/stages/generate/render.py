"""Stage 08 (``generate``): what the trained LoRA draws, and which checkpoint draws the characters
best.

For each character (every name stage 03 knows, or ``generate.characters``) the stage renders a
grid: prompt templates (``{trigger} {character}, close-up portrait``) x seeds x LoRA scales x
training checkpoints. Each seed drives its own ``torch.Generator`` (on the CPU, so a seed gives
the same starting noise on any device), so the images of one seed differ only by what the LoRA,
its scale and its checkpoint change. Scale 0 is the base model alone: it is the same for every
checkpoint, so it is rendered once per prompt and seed and filed as checkpoint ``base`` (the
reference column of every grid).

Scores, computed once per image (DESIGN: scores once, choices by pure functions):

* **identity distance**: stage 03's face code (dlib HOG + ResNet encodings) finds the
  faces of the image; the distance of the best face to the character is its encoding distance to
  the nearest of that character's references: the reference photos stage 03 used and the faces of
  the movie stage 03 named after the character (confident ones only). 0.6 is face_recognition's
  "same person" tolerance; lower is more alike. No face: ``identity_distance`` null,
  ``face_found`` false (a random tiny model draws noise, so on the demo most images have none:
  that is reported, never an error);
* **CLIP score** (``generate.clip_model``): 100 x cosine of the CLIP image and prompt
  embeddings, floored at 0, as torchmetrics' ``CLIPScore``. Its own setting rather than
  ``scenes.clip_model``: that one always holds a hub id (its default), and scoring with a model
  that is not in the local cache would fail a default run; here null means "no CLIP score".

A checkpoint's score is the mean identity distance over its images with a face (scale > 0), next
to the share of its images with a face. The best checkpoint has the lowest mean distance; a tie,
or no face anywhere, goes to the latest checkpoint (the final LoRA when it is in the grid).

Every image is written atomically as a PNG that carries its settings key in a text chunk; a
rerun (after a kill, or with more seeds) renders only images whose file is missing or was made
with other settings or other rendering code. Before any image is rendered, the base model is
loaded (a missing one is one ModelError naming the setting) and every selected LoRA file is
checked against it (one ModelError naming the file that does not fit).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from diffusion_bunny.codegraph import code_hash
from diffusion_bunny.models.diffusion import load_lora, lora_mismatches, read_lora_state_dict
from diffusion_bunny.pipeline.atomic import atomic_write_bytes
from diffusion_bunny.pipeline.manifest import file_fingerprint
from diffusion_bunny.pipeline.progress import ProgressFile
from diffusion_bunny.stages.generate.grid import Checkpoint, GridItem
from diffusion_bunny.stages.generate.tables import BASE, lora_file

#: PNG text chunk holding an image's settings key (what makes a rerun skip it).
PNG_KEY = "diffusion_bunny"


@dataclass(frozen=True)
class RenderSettings:
    """What, besides the prompt, seed, scale and LoRA file, decides an image."""

    base_model: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    #: FLUX.1 / SD3.5 only: T5 tokens per prompt (None: the pipeline's default).
    max_sequence_length: int | None = None

    def key(self, item: GridItem, lora: dict[str, Any] | None) -> str:
        """The settings key stored in the image's PNG: a rerun reuses an image only when it matches.

        Besides the settings it covers the code that renders (this module and what it imports:
        the pipeline and LoRA loading of :mod:`diffusion_bunny.models.diffusion`, the tiny
        presets; :func:`~diffusion_bunny.codegraph.code_hash`), so a change to rendering draws
        the images again without a version to bump."""
        # Settings left at None are not in the key, so images made before they existed are reused.
        settings = {k: v for k, v in self.__dict__.items() if v is not None or k == "negative_prompt"}
        blob = json.dumps(
            {
                "code": code_hash(__name__),
                "settings": settings,
                "prompt": item.prompt,
                "seed": item.seed,
                "scale": item.lora_scale,
                "lora": lora,
            },
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


#: ``generate.guidance_scale`` when null: Stable Diffusion's usual 7.5, FLUX.1-dev's distilled
#: guidance 3.5 (its pipeline's default; schnell ignores it), SD3.5's 7.0 (its model card's).
DEFAULT_GUIDANCE = {"sd1": 7.5, "sdxl": 7.5, "flux": 3.5, "sd3": 7.0}


def pipe_family(pipe: Any) -> str:
    """sd1 / sdxl / flux / sd3 of a loaded pipeline."""
    ref = getattr(pipe, "bunny_base", None)
    if ref is not None:
        return str(ref.family)
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    return "sdxl" if "XL" in name else "sd1"


def default_size(pipe: Any) -> int:
    """The base model's own image size: the UNet's (SD3 transformer's) sample size x the VAE's
    scale factor; FLUX.1 has none in its config, its pipeline's 1024 px. The tiny presets draw at
    128 px (what they are built for)."""
    ref = getattr(pipe, "bunny_base", None)
    if ref is not None and ref.source == "preset":
        return 128
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "unet", None) is not None:
        return int(pipe.unet.config.sample_size) * scale
    sample = getattr(pipe.transformer.config, "sample_size", None) or getattr(
        pipe, "default_sample_size", 128
    )
    return int(sample) * scale


#: ``generate.batch_size`` when null for the built-in tiny presets (128 px, a few MB each).
PRESET_BATCH = 8


def batch_size_for(pipe: Any, setting: int | None) -> int:
    """``generate.batch_size``, or when null: :data:`PRESET_BATCH` for a tiny preset, 1 for a real
    model (whose batch must fit the device's memory)."""
    if setting is not None:
        return setting
    ref = getattr(pipe, "bunny_base", None)
    return PRESET_BATCH if ref is not None and ref.source == "preset" else 1


def render(pipe: Any, prompt: str, seed: int, settings: RenderSettings) -> Image.Image:
    """One image. The seed drives a fresh CPU ``torch.Generator``, so the same seed gives the same
    starting noise on any device and for any LoRA (scales and checkpoints are then comparable)."""
    return render_batch(pipe, [prompt], [seed], settings)[0]


def render_batch(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: RenderSettings
) -> list[Image.Image]:
    """Several images in one pipeline call: each denoising step runs once for the whole batch,
    which on a CPU, or a GPU with memory to spare, costs far less than one call per image.

    Each image keeps its own CPU generator (diffusers draws every image's starting noise from
    its own generator of the list), so an image starts from the same noise as when drawn alone.
    """
    import torch  # lazy: torch takes 1.1 s to import

    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    kwargs: dict[str, Any] = {}
    if getattr(pipe, "unet", None) is None and settings.max_sequence_length is not None:
        kwargs["max_sequence_length"] = settings.max_sequence_length
    if pipe_family(pipe) != "flux":  # FLUX.1's guidance is distilled: a negative prompt does nothing
        kwargs["negative_prompt"] = (
            [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
        )
    out = pipe(
        prompt=list(prompts),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        width=settings.width,
        height=settings.height,
        generator=generators,
        **kwargs,
    )
    return list(out.images)


def stored_key(path: Path) -> str | None:
    """The settings key of an image written by this stage, or None (missing, unreadable, foreign)."""
    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get(PNG_KEY)
    except (OSError, UnidentifiedImageError):
        return None


def save_png(path: Path, image: Image.Image, key: str) -> None:
    """Write ``image`` atomically as a PNG carrying ``key``."""
    info = PngInfo()
    info.add_text(PNG_KEY, key)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def check_loras(pipe: Any, checkpoints: Sequence[Checkpoint]) -> None:
    """Every LoRA file must fit the base model: checked before any image is rendered, so a LoRA
    trained on another base model stops the stage at once with one message naming the file."""
    for ck in checkpoints:
        n_layers, problems = lora_mismatches(pipe, read_lora_state_dict(pipe, ck.path))
        if n_layers == 0 or problems:
            load_lora(pipe, ck.path)  # raises its one-line ModelError before loading anything
            raise AssertionError(
                "load_lora accepted a LoRA that lora_mismatches rejected"
            )  # pragma: no cover


def generate_images(
    pipe: Any,
    run_dir: Path,
    items: Sequence[GridItem],
    checkpoints: Sequence[Checkpoint],
    settings: RenderSettings,
    *,
    batch_size: int = 1,
    progress: bool = False,
    progress_path: Path | None = None,
) -> tuple[int, int]:
    """Render every item whose PNG is missing or was made with other settings; returns (rendered
    now, reused). Base images first (no LoRA loaded), then one checkpoint at a time, its LoRA
    loaded once and its scale changed per batch; up to ``batch_size`` images of one checkpoint
    and scale are drawn in one pipeline call (:func:`render_batch`)."""
    lora_fp = {c.name: file_fingerprint(c.path) for c in checkpoints}
    todo: list[tuple[GridItem, str]] = []
    reused = 0
    for item in items:
        key = settings.key(item, lora_fp.get(item.checkpoint))
        if stored_key(run_dir / item.rel_path) == key:
            reused += 1
        else:
            todo.append((item, key))
    order = {BASE: -1, **{c.name: i for i, c in enumerate(checkpoints)}}
    todo.sort(key=lambda t: (order[t[0].checkpoint], t[0].lora_scale))
    batches: list[list[tuple[GridItem, str]]] = []
    for entry in todo:
        last = batches[-1][0][0] if batches else None
        same = last is not None and (last.checkpoint, last.lora_scale) == (
            entry[0].checkpoint,
            entry[0].lora_scale,
        )
        if same and len(batches[-1]) < batch_size:
            batches[-1].append(entry)
        else:
            batches.append([entry])
    paths = {c.name: c.path for c in checkpoints}
    bar = tqdm(total=len(todo), unit="image", desc="generate", disable=not progress)
    report = ProgressFile(progress_path, "generate", len(todo), "image")
    loaded: str | None = None
    scale: float | None = None
    done = 0
    try:
        for batch in batches:
            first = batch[0][0]
            if first.checkpoint != BASE and first.checkpoint != loaded:
                load_lora(pipe, paths[first.checkpoint], first.lora_scale, adapter_name="generate")
                loaded, scale = first.checkpoint, first.lora_scale
            elif first.checkpoint != BASE and first.lora_scale != scale:
                pipe.set_adapters(["generate"], adapter_weights=[first.lora_scale])
                scale = first.lora_scale
            images = render_batch(pipe, [i.prompt for i, _ in batch], [i.seed for i, _ in batch], settings)
            for (item, key), image in zip(batch, images, strict=True):
                save_png(run_dir / item.rel_path, image, key)
                done += 1
                bar.update()
                report.update(done)
    finally:
        bar.close()
        report.close()
        if loaded is not None:
            pipe.delete_adapters("generate")
    return len(todo), reused


def loading_snippet(facts: dict[str, Any], base_path: str | None = None, run_dir: Path | None = None) -> str:
    """Python that loads the best checkpoint into a diffusers pipeline (notebook 08 prints it);
    ``run_dir``: the run folder a LoRA file recorded inside it is in now (:func:`.tables.lora_file`)."""
    lora = lora_file(facts.get("best_lora"), run_dir or Path())
    base = base_path or facts.get("base_model")
    if not lora:
        return "# no LoRA checkpoint was compared"
    lora = str(lora)
    return (
        "import torch\n"
        "from diffusers import AutoPipelineForText2Image\n\n"
        f"pipe = AutoPipelineForText2Image.from_pretrained({str(base)!r}, local_files_only=True)\n"
        f"pipe.load_lora_weights({lora!r})\n"
        "image = pipe(\n"
        f"    {facts.get('trigger_word', '')!r} + ' ' + 'CHARACTER, close-up portrait',\n"
        "    generator=torch.Generator('cpu').manual_seed(0),\n"
        f"    width={facts.get('resolution')}, height={facts.get('resolution')},\n"
        ").images[0]"
    )
