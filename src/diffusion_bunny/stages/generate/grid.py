"""What stage 08 draws, pure: the checkpoints stage 07 left, the characters, and the grid of
prompts x seeds x LoRA scales x checkpoints (scale 0 planned once, as checkpoint ``base``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusion_bunny.errors import ConfigError
from diffusion_bunny.pipeline.run import bounded_name
from diffusion_bunny.stages.generate.tables import BASE, FINAL, NO_CHARACTER
from diffusion_bunny.stages.train.tables import LORA_FILE

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
    """The checkpoints ``generate.checkpoints`` asks for (``all``, ``final`` or names), in
    training order; a name the training output does not hold is a ConfigError listing those it does."""
    if which == "all":
        return list(found)
    names = [FINAL] if which == FINAL else list(which)
    by_name = {c.name: c for c in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(
            f"generate.checkpoints: {missing[0]} is not in the training output (it has: "
            f"{', '.join(by_name) or 'nothing'}); list those, or set all"
        )
    return [c for c in found if c.name in names]


# ---------------------------------------------------------------------------------------------
# The grid


def render_prompt(template: str, trigger: str, character: str, description: str = "") -> str:
    """A prompt from its template; without a character (:data:`NO_CHARACTER`) the placeholder is
    dropped and the spaces and commas around it tidied. A character's ``description``
    (``captions.character_descriptions``) follows its name as in the captions the LoRA learned
    from ("biscuit, a cartoon dog")."""
    name = "" if character == NO_CHARACTER else (f"{character}, {description}" if description else character)
    text = template.format(trigger=trigger, character=name)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip(" ,")


def character_folders(characters: Sequence[str]) -> dict[str, str]:
    """The folder of each character's pictures: its name made safe for a folder (as it always
    was), and where two names of the grid come out alike ("Mary Jane" and "Mary_Jane"; "???" and
    "!!!", both "none"), each not already that safe name gets 6 hex of its hash too: they shared
    one folder and drew over each other's pictures. ``.`` and ``..`` always get it (``..`` wrote
    beside the checkpoint's folder). A name alone keeps its old folder, so a rerun's pictures land
    where the last run's are."""
    groups: dict[str, list[str]] = {}
    for character in dict.fromkeys(characters):
        groups.setdefault(re.sub(r"[^\w.-]+", "_", character).strip("_") or "none", []).append(character)
    out = {}
    for safe, names in groups.items():
        for name in names:
            clash = (len(names) > 1 and name != safe) or safe in (".", "..")
            tag = hashlib.sha1(name.encode()).hexdigest()[:6]
            out[name] = bounded_name(f"{safe}~{tag}" if clash else safe)
    return out


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
    #: The character's folder among the grid's (:func:`character_folders`); None: its own.
    folder: str | None = None

    @property
    def rel_path(self) -> str:
        """Where the image lives, relative to the run folder. The prompt is named by 8 hex of the
        hash of its text (:func:`prompt_tag`), not by its place in ``generate.prompts``: named by
        place, a prompt removed or moved redrew every picture after it, over the others' files."""
        char = self.folder or character_folders([self.character])[self.character]
        scale = scale_name(self.lora_scale)
        name = f"{prompt_tag(self.prompt)}_seed{self.seed}_scale{scale}.png"
        return f"generated/{self.checkpoint}/{char}/{name}"


def scale_name(scale: float) -> str:
    """A LoRA scale in a file name: two decimals where they give the scale back (``1.00``,
    ``m0.50`` for -0.5), else its shortest exact spelling (``0.125``, ``1e-07``), so each scale
    is a file of its own. Six decimals made 1e-7 and 2e-7 one file (``0.``), drawn over by both
    and drawn again on every rerun."""
    text = f"{abs(scale):.2f}"
    if float(text) != abs(scale):
        text = repr(abs(float(scale)))
    return ("m" if scale < 0 else "") + text


def prompt_tag(prompt: str) -> str:
    """A picture's prompt in its file name: ``prompt-`` and 8 hex of the hash of the rendered
    text, so a picture keeps its file whatever the prompt's place in the list."""
    return "prompt-" + hashlib.sha1(prompt.encode()).hexdigest()[:8]


def plan_grid(
    characters: Sequence[str],
    templates: Sequence[str],
    trigger: str,
    seeds: Sequence[int],
    scales: Sequence[float],
    checkpoints: Sequence[Checkpoint],
    descriptions: Mapping[str, str] | None = None,
) -> list[GridItem]:
    """Every image of the grid: characters x prompts x seeds x scales x checkpoints, with scale 0
    planned once, as checkpoint :data:`BASE` (it does not depend on the LoRA); ``descriptions``
    name the characters in the prompts as the captions do (:func:`render_prompt`). Two templates
    that render to one prompt (``{trigger} {character}`` and ``{character}`` with no trigger word)
    are planned once, under the first: a picture is filed by its prompt, and both drew into one
    file."""
    items: list[GridItem] = []
    folders = character_folders(characters)
    for character in characters:
        folder = folders[character]
        planned: set[str] = set()
        for p, template in enumerate(templates):
            prompt = render_prompt(template, trigger, character, (descriptions or {}).get(character, ""))
            if prompt in planned:
                continue
            planned.add(prompt)
            for seed in seeds:
                for scale in scales:
                    if scale == 0:
                        items.append(GridItem(character, p, prompt, seed, 0.0, BASE, None, folder))
                        continue
                    items.extend(
                        GridItem(character, p, prompt, seed, float(scale), c.name, c.step, folder)
                        for c in checkpoints
                    )
    return items
