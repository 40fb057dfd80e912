"""Stage 08 (``generate``): what the trained LoRA draws, and which checkpoint draws the characters best.

For each character (every name stage 03 knows, or ``generation.characters``) the stage renders a
grid: prompt templates (``{trigger} {character}, close-up portrait``) x seeds x LoRA scales x
training checkpoints. Each seed drives its own ``torch.Generator`` (on the CPU, so a seed gives
the same starting noise on any device), so the images of one seed differ only by what the LoRA,
its scale and its checkpoint change. Scale 0 is the base model alone: it is the same for every
checkpoint, so it is rendered once per prompt and seed and filed as checkpoint ``base`` (the
reference column of every grid).

Scores, computed once per image (DESIGN: scores once, choices by pure functions):

* **identity distance**: stage 03's face code (face_recognition HOG + ResNet encodings) finds the
  faces of the image; the distance of the best face to the character is its encoding distance to
  the nearest of that character's references: the reference photos stage 03 used and the faces of
  the movie stage 03 named after the character (confident ones only). 0.6 is face_recognition's
  "same person" tolerance; lower is more alike. No face: ``identity_distance`` null,
  ``face_found`` false (a random tiny model draws noise, so on the demo most images have none:
  that is reported, never an error);
* **CLIP score** (``generation.clip_model``): 100 x cosine of the CLIP image and prompt
  embeddings, floored at 0, as torchmetrics' ``CLIPScore``. Its own setting rather than
  ``scenes.clip_model``: that one always holds a hub id (its default), and scoring with a model
  that is not in the local cache would fail a default run; here null means "no CLIP score".

A checkpoint's score is the mean identity distance over its images with a face (scale > 0), next
to the share of its images with a face. The best checkpoint has the lowest mean distance; a tie,
or no face anywhere, goes to the latest checkpoint (the final LoRA when it is in the grid).

Every image is written atomically as a PNG that carries its settings key in a text chunk; a rerun
(after a kill, or with more seeds) renders only images whose file is missing or was made with
other settings. Before any image is rendered, the base model is loaded (a missing one is one
ModelError naming the setting) and every selected LoRA file is checked against it (one ModelError
naming the file that does not fit).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diffusion_bunny.config import GenerationConfig
from diffusion_bunny.errors import ConfigError, StageError
from diffusion_bunny.faces import DetectSettings, detect_and_encode, read_rgb
from diffusion_bunny.progress import ProgressFile
from diffusion_bunny.run import atomic_write_bytes, file_fingerprint

if TYPE_CHECKING:
    from PIL import Image

#: Checkpoint name of the images rendered with LoRA scale 0 (the base model alone).
BASE = "base"
#: Character name used when stage 03 named nobody: the prompts then carry the trigger word only.
NO_CHARACTER = "(none)"
#: Name of the final LoRA (``<checkpoint dir>/pytorch_lora_weights.safetensors``).
FINAL = "final"
LORA_FILE = "pytorch_lora_weights.safetensors"
#: PNG text chunk holding an image's settings key (what makes a rerun skip it).
PNG_KEY = "diffusion_bunny"
#: Bump when rendering changes what an image of the same settings looks like.
RENDER_VERSION = 1
#: Generated images at most this many pixels on their short side are searched for faces once
#: more with one more upsampling when the first pass finds none (HOG's window is 80 px).
SMALL_IMAGE_SIDE = 256

GENERATIONS_SCHEMA = {
    "character": pl.Utf8,
    "prompt_index": pl.Int64,
    "prompt": pl.Utf8,
    "seed": pl.Int64,
    "lora_scale": pl.Float64,
    "checkpoint": pl.Utf8,
    "step": pl.Int64,
    "path": pl.Utf8,
    "faces": pl.Int64,
    "face_found": pl.Boolean,
    "identity_distance": pl.Float64,
    "clip_score": pl.Float64,
    "best": pl.Boolean,
}
SCORES_SCHEMA = {
    "checkpoint": pl.Utf8,
    "step": pl.Int64,
    "order": pl.Int64,
    "images": pl.Int64,
    "with_face": pl.Int64,
    "face_share": pl.Float64,
    "identity_distance": pl.Float64,
    "clip_score": pl.Float64,
    "best": pl.Boolean,
}


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One LoRA file stage 07 wrote: ``checkpoint-<step>`` or ``final``."""

    name: str
    step: int | None
    path: Path


def find_checkpoints(out_dir: Path) -> list[Checkpoint]:
    """The LoRA files of a training output folder, in training order: every
    ``checkpoint-<step>/pytorch_lora_weights.safetensors`` by step, then the final
    ``pytorch_lora_weights.safetensors`` (its step: the last checkpoint's, when known)."""
    out_dir = Path(out_dir)
    found: list[Checkpoint] = []
    if out_dir.is_dir():
        for sub in out_dir.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", sub.name)
            if m and (sub / LORA_FILE).is_file():
                found.append(Checkpoint(sub.name, int(m.group(1)), sub / LORA_FILE))
    found.sort(key=lambda c: c.step or 0)
    final = out_dir / LORA_FILE
    if final.is_file():
        found.append(Checkpoint(FINAL, found[-1].step if found else None, final))
    return found


def select_checkpoints(found: Sequence[Checkpoint], which: str | Sequence[str]) -> list[Checkpoint]:
    """The checkpoints ``generation.checkpoints`` asks for (``all``, ``final`` or names), in
    training order; a name the training output does not hold is a ConfigError listing those it does."""
    if which == "all":
        return list(found)
    names = [FINAL] if which == FINAL else list(which)
    by_name = {c.name: c for c in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(
            f"generation.checkpoints: {missing[0]} is not in the training output (it has: "
            f"{', '.join(by_name) or 'nothing'}); list those, or set all"
        )
    return [c for c in found if c.name in names]


# ---------------------------------------------------------------------------------------------
# The grid


def render_prompt(template: str, trigger: str, character: str) -> str:
    """A prompt from its template; without a character (:data:`NO_CHARACTER`) the placeholder is
    dropped and the spaces and commas around it tidied."""
    name = "" if character == NO_CHARACTER else character
    text = template.format(trigger=trigger, character=name)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip(" ,")


@dataclass(frozen=True)
class GridItem:
    """One image of the grid."""

    character: str
    prompt_index: int
    prompt: str
    seed: int
    lora_scale: float
    checkpoint: str
    step: int | None

    @property
    def rel_path(self) -> str:
        """Where the image lives, relative to the run folder."""
        char = re.sub(r"[^\w.-]+", "_", self.character).strip("_") or "none"
        scale = f"{self.lora_scale:+.2f}".replace("+", "").replace("-", "m")
        return f"generated/{self.checkpoint}/{char}/p{self.prompt_index:02d}_seed{self.seed}_scale{scale}.png"


def plan_grid(
    characters: Sequence[str],
    templates: Sequence[str],
    trigger: str,
    seeds: Sequence[int],
    scales: Sequence[float],
    checkpoints: Sequence[Checkpoint],
) -> list[GridItem]:
    """Every image of the grid: characters x prompts x seeds x scales x checkpoints, with scale 0
    planned once, as checkpoint :data:`BASE` (it does not depend on the LoRA)."""
    items: list[GridItem] = []
    for character in characters:
        for p, template in enumerate(templates):
            prompt = render_prompt(template, trigger, character)
            for seed in seeds:
                for scale in scales:
                    if scale == 0:
                        items.append(GridItem(character, p, prompt, seed, 0.0, BASE, None))
                        continue
                    items.extend(
                        GridItem(character, p, prompt, seed, float(scale), c.name, c.step)
                        for c in checkpoints
                    )
    return items


@dataclass(frozen=True)
class RenderSettings:
    """What, besides the prompt, seed, scale and LoRA file, decides an image."""

    base_model: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int

    def key(self, item: GridItem, lora: dict[str, Any] | None) -> str:
        """The settings key stored in the image's PNG: a rerun reuses an image only when it matches."""
        blob = json.dumps(
            {
                "render": RENDER_VERSION,
                "settings": self.__dict__,
                "prompt": item.prompt,
                "seed": item.seed,
                "scale": item.lora_scale,
                "lora": lora,
            },
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def default_size(pipe: Any) -> int:
    """The base model's own image size: UNet sample size x the VAE's scale factor."""
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def render(pipe: Any, prompt: str, seed: int, settings: RenderSettings) -> Image.Image:
    """One image. The seed drives a fresh CPU ``torch.Generator``, so the same seed gives the same
    starting noise on any device and for any LoRA (scales and checkpoints are then comparable)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(int(seed))
    out = pipe(
        prompt=prompt,
        negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        width=settings.width,
        height=settings.height,
        generator=generator,
    )
    return out.images[0]


def stored_key(path: Path) -> str | None:
    """The settings key of an image written by this stage, or None (missing, unreadable, foreign)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get(PNG_KEY)
    except (OSError, UnidentifiedImageError):
        return None


def save_png(path: Path, image: Image.Image, key: str) -> None:
    """Write ``image`` atomically as a PNG carrying ``key``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, key)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def check_loras(pipe: Any, checkpoints: Sequence[Checkpoint]) -> None:
    """Every LoRA file must fit the base model: checked before any image is rendered, so a LoRA
    trained on another base model stops the stage at once with one message naming the file."""
    from diffusion_bunny.sd_models import load_lora, lora_mismatches, read_lora_state_dict

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
    progress: bool = False,
    progress_path: Path | None = None,
) -> tuple[int, int]:
    """Render every item whose PNG is missing or was made with other settings; returns (rendered
    now, reused). Base images first (no LoRA loaded), then one checkpoint at a time, its LoRA
    loaded once and its scale changed per image."""
    from diffusion_bunny.sd_models import load_lora

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
    paths = {c.name: c.path for c in checkpoints}
    bar = tqdm(total=len(todo), unit="image", desc="generate", disable=not progress)
    report = ProgressFile(progress_path, "generate", len(todo), "image")
    loaded: str | None = None
    scale: float | None = None
    try:
        for done, (item, key) in enumerate(todo):
            if item.checkpoint != BASE and item.checkpoint != loaded:
                load_lora(pipe, paths[item.checkpoint], item.lora_scale, adapter_name="generate")
                loaded, scale = item.checkpoint, item.lora_scale
            elif item.checkpoint != BASE and item.lora_scale != scale:
                pipe.set_adapters(["generate"], adapter_weights=[item.lora_scale])
                scale = item.lora_scale
            save_png(run_dir / item.rel_path, render(pipe, item.prompt, item.seed, settings), key)
            bar.update()
            report.update(done + 1)
    finally:
        bar.close()
        report.close()
        if loaded is not None:
            pipe.delete_adapters("generate")
    return len(todo), reused


# ---------------------------------------------------------------------------------------------
# Identity


@dataclass
class CharacterReferences:
    """Face encodings per character that a generated face is compared with, and where they came
    from (reference photos, named faces of the movie)."""

    encodings: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.encodings)


def character_references(
    ref_dir: Path | None, faces: pl.DataFrame | None, settings: DetectSettings
) -> tuple[CharacterReferences, list[str]]:
    """The encodings of each named character: stage 03's reference photos (encoded again, as stage
    03 does) and the faces of the movie stage 03 named after it, leaving out low-confidence ones.
    Returns the references and the reference folder's warnings."""
    from diffusion_bunny.faces import load_references

    out = CharacterReferences()
    warnings: list[str] = []
    per_char: dict[str, list[np.ndarray]] = {}
    if ref_dir is not None:
        refs, warnings = load_references(ref_dir, settings)
        for i, name in enumerate(refs.names):
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
    faces: int
    distance: float | None


def score_identity(rgb: np.ndarray, references: np.ndarray | None, settings: DetectSettings) -> IdentityScore:
    """Find the faces of a generated image and return how many, and the distance of the best one to
    the nearest of ``references`` (None without a face or without references)."""
    faces = detect_and_encode(rgb, settings)
    if not faces and min(rgb.shape[:2]) <= SMALL_IMAGE_SIDE:
        faces = detect_and_encode(rgb, settings, upsample=settings.upsample + 1)
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
    progress: bool = False,
) -> list[IdentityScore]:
    """:func:`score_identity` for every image of the grid (faces need no minimum size here: a
    generated portrait may be small)."""
    settings = replace(settings, min_face_px=0)
    out: list[IdentityScore] = []
    for item in tqdm(items, unit="image", desc="identity", disable=not progress):
        rgb = read_rgb(run_dir / item.rel_path)
        if rgb is None:
            raise StageError(f"generated image {run_dir / item.rel_path} cannot be read; rerun with --force")
        out.append(score_identity(rgb, references.encodings.get(item.character), settings))
    return out


def clip_scores(
    paths: Sequence[Path], prompts: Sequence[str], embedder: Any, *, progress: bool = False
) -> list[float]:
    """CLIP score per image: 100 x cosine of its image and prompt embeddings, floored at 0 (as
    torchmetrics' ``CLIPScore``). ``embedder`` is an :class:`embeddings.ClipEmbedder`."""
    images = embedder.embed_images(list(paths), progress=progress)
    unique = sorted(set(prompts))
    texts = dict(zip(unique, embedder.embed_texts(unique), strict=True))
    return [max(0.0, 100.0 * float(img @ texts[p])) for img, p in zip(images, prompts, strict=True)]


def load_clip(model: str, device: str) -> Any:
    """The CLIP model of ``generation.clip_model`` through the loading code of stage 04 (local
    files only); a failure is one ModelError naming ``generation.clip_model``."""
    from diffusion_bunny.embeddings import ClipEmbedder

    hint = (
        "download it once where there is network, or set generation.clip_model to a local CLIP "
        "folder, or to null for no CLIP score"
    )
    return ClipEmbedder(model, device=device, setting="generation.clip_model", hint=hint)


# ---------------------------------------------------------------------------------------------
# Choosing the checkpoint (pure)


def checkpoint_scores(generations: pl.DataFrame, order: Sequence[str]) -> pl.DataFrame:
    """Per checkpoint (``base`` first, then ``order``): images, images with a face and their share,
    mean identity distance over the images with a face (lower is better), mean CLIP score, and
    which checkpoint is best (:func:`pick_best`; ``base`` never is)."""
    rows = []
    for rank, name in enumerate([BASE, *order]):
        sub = generations.filter(pl.col("checkpoint") == name)
        if sub.height == 0:
            continue
        with_face = int(sub["face_found"].sum())
        dist = sub["identity_distance"].drop_nulls()
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
                "clip_score": float(clip.mean()) if clip.len() else None,
                "best": False,
            }
        )
    scores = pl.DataFrame(rows, schema=SCORES_SCHEMA)
    best = pick_best(scores)
    return scores.with_columns((pl.col("checkpoint") == best).alias("best"))


def pick_best(scores: pl.DataFrame) -> str | None:
    """The checkpoint with the lowest mean identity distance; on a tie, or when no checkpoint has a
    scored face, the latest one (highest ``order``). ``base`` is not a candidate; None without any
    checkpoint."""
    cand = scores.filter(pl.col("checkpoint") != BASE).sort("order")
    if cand.height == 0:
        return None
    scored = cand.filter(pl.col("identity_distance").is_not_null())
    if scored.height == 0:
        return cand["checkpoint"][-1]
    best = scored["identity_distance"].min()
    return scored.filter(pl.col("identity_distance") == best)["checkpoint"][-1]


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class GenerateResult:
    """What :func:`generate_stage` returns."""

    generations: pl.DataFrame
    scores: pl.DataFrame
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def characters_to_draw(
    references: CharacterReferences, wanted: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The characters of the grid (``generation.characters``, or every named one) and warnings.
    A configured name stage 03 does not know is a ConfigError (a typo would otherwise cost a grid
    of unscorable images); nobody named means one grid with the trigger word alone."""
    known = references.names
    if wanted is not None:
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ConfigError(
                f"generation.characters: {unknown[0]!r} is not a character of this run (known: "
                f"{', '.join(known) or 'none'}); fix the name or set null for all"
            )
        return list(wanted), []
    if not known:
        return [NO_CHARACTER], [
            "no named characters (stage 03 has no references and no named faces): the grid uses the "
            "trigger word alone and cannot score identity; name characters in notebook 03 for that"
        ]
    return list(known), []


def generate_stage(
    run_dir: Path,
    cfg: GenerationConfig,
    *,
    pipe_loader: Any,
    checkpoints: Sequence[Checkpoint],
    references: CharacterReferences,
    detect: DetectSettings,
    trigger: str,
    resolution: int | None,
    base_model: str,
    progress: bool = False,
    progress_path: Path | None = None,
) -> GenerateResult:
    """Stage 08 without the run bookkeeping: check the LoRA files, render the grid (resuming),
    score every image and pick the best checkpoint.

    ``pipe_loader()`` loads the base model (called first: a missing model fails before anything
    else); ``checkpoints`` are the LoRA files to compare, in training order.
    """
    run_dir = Path(run_dir)
    warnings: list[str] = []
    characters, char_warnings = characters_to_draw(references, cfg.characters)
    warnings.extend(char_warnings)
    if not checkpoints and any(s != 0 for s in cfg.lora_scales):
        raise StageError("no LoRA checkpoint to generate with; run stage train first")
    pipe = pipe_loader()
    check_loras(pipe, checkpoints)
    clip = None
    if cfg.clip_model:
        from diffusion_bunny.sd_models import pick_device

        clip = load_clip(cfg.clip_model, pick_device(cfg.device))
    size = resolution or default_size(pipe)
    settings = RenderSettings(
        base_model=base_model,
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        width=size,
        height=size,
    )
    items = plan_grid(characters, cfg.prompts, trigger, cfg.seeds, cfg.lora_scales, checkpoints)
    rendered, reused = generate_images(
        pipe, run_dir, items, checkpoints, settings, progress=progress, progress_path=progress_path
    )
    del pipe
    ids = score_images(run_dir, items, references, detect, progress=progress)
    clips: list[float | None] = [None] * len(items)
    if clip is not None:
        clips = list(clip_scores([run_dir / i.rel_path for i in items], [i.prompt for i in items], clip))
    generations = pl.DataFrame(
        [
            {
                "character": it.character,
                "prompt_index": it.prompt_index,
                "prompt": it.prompt,
                "seed": it.seed,
                "lora_scale": it.lora_scale,
                "checkpoint": it.checkpoint,
                "step": it.step,
                "path": it.rel_path,
                "faces": sc.faces,
                "face_found": sc.faces > 0,
                "identity_distance": sc.distance,
                "clip_score": cs,
                "best": False,
            }
            for it, sc, cs in zip(items, ids, clips, strict=True)
        ],
        schema=GENERATIONS_SCHEMA,
    )
    scores = checkpoint_scores(generations, [c.name for c in checkpoints])
    best = pick_best(scores)
    generations = generations.with_columns((pl.col("checkpoint") == best).alias("best"))
    with_face = int(generations["face_found"].sum())
    if with_face < generations.height:
        warnings.append(
            f"no face in {generations.height - with_face} of {generations.height} generated images "
            "(identity_distance is null there); a base model that draws people, or more training, "
            "gives the identity score more to measure"
        )
    best_ck = next((c for c in checkpoints if c.name == best), None)
    counts = {
        "images": generations.height,
        "rendered_now": rendered,
        "reused": reused,
        "with_face": with_face,
        "characters": len(characters),
        "checkpoints": len(checkpoints),
    }
    facts = {
        "best_checkpoint": best,
        "best_lora": str(best_ck.path) if best_ck else None,
        "best_identity_distance": (
            scores.filter(pl.col("best"))["identity_distance"][0] if best is not None else None
        ),
        "base_model": base_model,
        "resolution": size,
        "trigger_word": trigger,
        "characters": characters,
        "checkpoints": {c.name: str(c.path) for c in checkpoints},
        "references": references.sources,
        "clip_model": cfg.clip_model,
        "no_face": f"no face in {generations.height - with_face} of {generations.height} images",
    }
    return GenerateResult(generations, scores, counts, warnings, facts)


def loading_snippet(facts: dict[str, Any], base_path: str | None = None) -> str:
    """Python that loads the best checkpoint into a diffusers pipeline (notebook 08 prints it)."""
    lora = facts.get("best_lora")
    base = base_path or facts.get("base_model")
    if not lora:
        return "# no LoRA checkpoint was compared"
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
