"""Diffusion base models (SD 1.x, SDXL, FLUX.1, SD3.5) and LoRA files: where they come from and
whether they fit.

Stages 07 (train) and 08 (generate) both start from ``train.base_model`` /
``generate.base_model``, which is one of

- a preset built in code: ``tiny`` (Stable Diffusion 1.x layout), ``tiny-sdxl`` (SDXL layout),
  ``tiny-flux`` (FLUX.1-dev layout) or ``tiny-sd3`` (SD3.5-medium layout), see
  :mod:`diffusion_bunny.models.tiny`:
  a small denoiser (UNet or transformer), VAE and text encoder(s) with random, seeded weights and
  real CLIP (and T5) tokenizers written by :mod:`diffusion_bunny.models.tiny_clip` /
  :mod:`diffusion_bunny.models.tiny_t5`. It is saved once per machine with
  ``save_pretrained`` under the user cache, as an ordinary diffusers pipeline folder, so the same
  loading code (and diffusers' own example scripts, given the folder) runs on it as on a real
  model, in seconds on a CPU;
- a Hugging Face hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), used from the local
  hub cache, or downloaded into it with a progress bar when it is not there and the hub can be
  reached (``HF_HUB_OFFLINE=1`` honoured: then one line naming the id; :mod:`.hub`);
- a local diffusers pipeline folder (one holding ``model_index.json``).

Every way this can go wrong (absent from the cache, a folder that is not a pipeline, a damaged
weight file, a family that contradicts the folder, a folder of an unsupported family) ends in one
:class:`ModelError` that names the setting to change. :func:`load_lora` checks a LoRA file
against the loaded pipeline, layer by layer, before loading it, so a LoRA trained on another
base model fails with one line naming the file and the base model instead of a shape error deep
in peft (or, worse, silently loading nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors import safe_open

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models.device import resolve_device
from diffusion_bunny.models.hub import DIFFUSERS_FILES, hub_model, snapshot_hint
from diffusion_bunny.models.lora_keys import is_kohya, kohya_to_diffusers
from diffusion_bunny.models.tiny import PRESETS, Family, ensure_preset
from diffusion_bunny.paths import local_model_path

if TYPE_CHECKING:
    import torch


#: The pipeline classes whose folders we know how to train and load, by family.
PIPELINE_CLASSES: dict[Family, str] = {
    "sd1": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
}
FAMILIES: tuple[Family, ...] = ("sd1", "sdxl", "flux", "sd3")
_FAMILY_OF_CLASS = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionImg2ImgPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}
#: A pipeline folder of another class is still recognised by its denoiser's class.
_FAMILY_OF_TRANSFORMER = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved base model: what the user wrote, the local pipeline folder it names, its family
    (``sd1``/``sdxl``) and where it came from (``preset``/``hub``/``local``)."""

    name: str
    path: Path
    family: Family
    source: Literal["preset", "hub", "local"]


# ---------------------------------------------------------------------------------------------
# Resolving and loading


def family_of_folder(path: Path) -> Family | None:
    """The family a diffusers pipeline folder holds, from ``model_index.json``: its class name,
    else its transformer's class (FLUX.1 / SD3), else whether its UNet has a second text encoder
    (SDXL / SD 1.x); None when the file is not a pipeline index of a supported family."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    family = _FAMILY_OF_CLASS.get(str(index.get("_class_name", "")))
    transformer = index.get("transformer")
    if family is None and isinstance(transformer, list) and transformer:
        family = _FAMILY_OF_TRANSFORMER.get(str(transformer[-1]))
    if family is None and "unet" in index:
        family = "sdxl" if "text_encoder_2" in index else "sd1"
    return family  # type: ignore[return-value]


def resolve_base_model(
    base_model: str, family: str = "auto", *, setting: str = "train.base_model"
) -> BaseModelRef:
    """Turn the ``base_model`` setting into a local pipeline folder and its family, building a
    preset, or looking up the hub cache and downloading a hub id that is not there (with a
    progress bar; ``HF_HUB_OFFLINE=1`` honoured). ``setting`` is the config key the messages name
    (``generate.base_model`` for stage 08).

    ``family`` (``auto``/``sd1``/``sdxl``/``flux``/``sd3``) only picks the preset for ``tiny``
    (``tiny`` with ``sdxl`` is ``tiny-sdxl``, with ``flux`` ``tiny-flux``); for a real model it
    must agree with the folder.
    """
    name = str(base_model).strip()
    family_key = setting.rsplit(".", 1)[0] + ".family"
    if family not in ("auto", *FAMILIES):
        raise ModelError(f"{family_key} = {family!r}: use auto, sd1, sdxl, flux or sd3")
    if not name:
        raise ModelError(f"{setting} is empty; set it to tiny, a hub id or a local diffusers pipeline folder")
    if name in PRESETS:
        preset = f"tiny-{family}" if (name == "tiny" and family not in ("auto", "sd1")) else name
        if family != "auto" and PRESETS[preset] != family:
            raise ModelError(
                f"{setting} = {name!r} is an {PRESETS[preset]} preset but {family_key} = {family}"
            )
        return BaseModelRef(name=preset, path=ensure_preset(preset), family=PRESETS[preset], source="preset")

    local = local_model_path(name)
    if local.exists():
        path, source = local.resolve(), "local"
    elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        path, source = _hub_snapshot(name, setting), "hub"
    else:
        raise ModelError(
            f"{setting} = {name!r}: no such folder; set it to tiny, a hub id (owner/name) "
            "or a local diffusers pipeline folder"
        )
    found = family_of_folder(path)
    if found is None:
        raise ModelError(
            f"{setting} = {name!r}: {path} is not a diffusers pipeline folder of a supported family "
            "(sd1, sdxl, flux, sd3: a readable model_index.json naming a StableDiffusion, "
            "StableDiffusionXL, Flux or StableDiffusion3 pipeline); point it at one (save_pretrained layout)"
        )
    if family != "auto" and family != found:
        raise ModelError(
            f"{setting} = {name!r} is an {found} model but {family_key} = {family}; set it to auto"
        )
    return BaseModelRef(name=name, path=path, family=found, source=source)  # type: ignore[arg-type]


def _hub_snapshot(repo_id: str, setting: str) -> Path:
    """The cached snapshot folder of a hub repo, downloaded first (the files diffusers loads, with
    a progress bar) when it is not cached and the hub can be reached (:mod:`.hub`)."""
    return hub_model(repo_id, setting, DIFFUSERS_FILES, instead="a local pipeline folder or to tiny")


def _torch_dtype(dtype: Any) -> torch.dtype:
    import torch  # lazy: torch takes 1.1 s to import

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        table = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in table:
            raise ModelError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
        return table[dtype]
    return dtype


def pipeline_class(family: Family) -> type:
    """The diffusers pipeline class of a family."""
    import diffusers  # lazy: diffusers takes 2.7 s to import

    return getattr(diffusers, PIPELINE_CLASSES[family])


def load_pipeline(
    base_model: str | BaseModelRef,
    family: str = "auto",
    dtype: Any = None,
    device: str = "cpu",
    *,
    setting: str = "train.base_model",
    device_setting: str | None = None,
    components: dict[str, Any] | None = None,
) -> Any:
    """Load the base model as a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
    ``FluxPipeline`` / ``StableDiffusion3Pipeline`` on
    ``device`` (``auto`` picks the GPU when there is one) in ``dtype`` (torch dtype or
    ``fp32``/``fp16``/``bf16``; default float32), from local files only. The resolved
    :class:`BaseModelRef` is kept on the pipeline as ``pipe.bunny_base``; the safety checker is
    not loaded (SD 1.x folders that ship one keep it on disk). ``components`` are models already
    loaded (e.g. an NF4 ``transformer``): used as they are, the folder's copies never read.
    ``device_setting`` names the device in errors (default: ``device`` beside ``setting``; stage
    08 passes its own, as it may draw with ``train.base_model``). The device is checked before
    the model is read: a model of gigabytes is not loaded to be refused."""
    target = resolve_device(device, device_setting or setting.rsplit(".", 1)[0] + ".device")
    ref = (
        base_model
        if isinstance(base_model, BaseModelRef)
        else resolve_base_model(base_model, family, setting=setting)
    )
    cls = pipeline_class(ref.family)
    extra: dict[str, Any] = dict(components or {})
    if ref.family == "sd1":
        extra |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(ref.path, dtype=_torch_dtype(dtype), local_files_only=True, **extra)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"{setting} = {ref.name!r}: the pipeline in {ref.path} could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})"
            f"{snapshot_hint(ref.path, exc) or _incomplete(ref)}"
            ", or point the setting elsewhere"
        ) from None
    _check_tokenizers(pipe, setting, ref)
    pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    pipe.bunny_base = ref
    return pipe


def _incomplete(ref: BaseModelRef) -> str:
    """What to do about a folder of the user's own that did not load (a hub download's is
    :func:`~diffusion_bunny.models.hub.snapshot_hint`)."""
    return "" if ref.source == "hub" else "; the folder is incomplete or damaged: save it again"


def _check_tokenizers(pipe: Any, setting: str, ref: BaseModelRef) -> None:
    """Refuse a pipeline whose tokenizer cannot tell two words apart: transformers builds an empty
    tokenizer when a folder lacks its files (``tokenizer.json``, ``vocab.json``), and every prompt
    then embedded to one vector: a training and a generation that ignored their prompts."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None and tokenizer("cat").input_ids == tokenizer("dog").input_ids:
            raise ModelError(
                f"{setting} = {ref.name!r}: the pipeline in {ref.path} has no usable {name} "
                f"({len(tokenizer)} tokens; are its files in {name}/ missing?); download or save it "
                "again, or point the setting elsewhere"
            )


# ---------------------------------------------------------------------------------------------
# LoRA files

_LORA_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
)
#: diffusers' older attention-processor names (what it turns kohya files into):
#: ``attn1.processor.to_out_lora.down.weight`` is the LoRA of ``attn1.to_out.0``.
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _lora_layers(state_dict: dict[str, Any]) -> dict[tuple[str, str], dict[str, tuple[int, ...]]]:
    """``(component, module path) -> {"down": shape, "up": shape}`` from a diffusers/peft-style
    LoRA state dict (keys ``unet.<module>.lora_A.weight`` etc.); keys of other shapes are ignored
    (alphas, metadata)."""
    layers: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        old = _PROCESSOR_KEY.search(key)
        if old:
            target = "to_out.0" if old.group(1) == "to_out" else old.group(1)
            component, _, module = key[: old.start()].partition(".")
            layers.setdefault((component, f"{module}.{target}"), {})[old.group(2)] = tuple(value.shape)
            continue
        for suffix, side in _LORA_SUFFIXES:
            if key.endswith(suffix):
                component, _, module = key[: -len(suffix)].partition(".")
                layers.setdefault((component, module), {})[side] = tuple(value.shape)
                break
    return layers


def lora_mismatches(pipe: Any, state_dict: dict[str, Any]) -> tuple[int, list[str]]:
    """Check each LoRA layer of ``state_dict`` (diffusers format, as ``lora_state_dict`` returns it)
    against ``pipe``: the module must exist in that component and be a linear/conv layer whose
    input and output sizes match the LoRA's down and up matrices. Returns (number of LoRA layers,
    one line per problem)."""
    import torch  # lazy: torch takes 1.1 s to import

    layers = _lora_layers(state_dict)
    problems: list[str] = []
    for (component, module_path), sides in sorted(layers.items()):
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            problems.append(f"{component}.{module_path}: the base model has no {component}")
            continue
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            problems.append(f"{component}.{module_path}: no such layer in the base model")
            continue
        module = getattr(module, "base_layer", module)  # already wrapped by peft
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim < 2:
            problems.append(f"{component}.{module_path}: not a linear or convolution layer")
            continue
        out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
        down, up = sides.get("down"), sides.get("up")
        if down is None or up is None:
            problems.append(f"{component}.{module_path}: only one of the two LoRA matrices")
        elif down[1] != in_features or up[0] != out_features:
            problems.append(
                f"{component}.{module_path}: LoRA maps {down[1]} -> {up[0]} features, the base layer "
                f"{in_features} -> {out_features}"
            )
    return len(layers), problems


def read_lora_state_dict(pipe: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """A LoRA file's weights in diffusers' key format; a missing or unreadable file is a
    ModelError naming it.

    UNet pipelines: kohya/A1111 files are converted by diffusers' own reader. FLUX.1 / SD3.5:
    kohya files go through :func:`diffusion_bunny.models.lora_keys.kohya_to_diffusers`, because
    diffusers has no kohya reader for SD3 and its FLUX one hard-codes FLUX.1's layer sizes (it
    fails on any other transformer, the tiny preset included)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}; train one (stage train) or fix the path")
    try:
        if getattr(pipe, "unet", None) is not None:
            out = type(pipe).lora_state_dict(str(path), unet_config=pipe.unet.config)
        else:
            from safetensors.torch import load_file  # lazy: pulls in torch (1.1 s)

            raw = load_file(str(path))
            if is_kohya(raw):
                out = kohya_to_diffusers(raw, pipe.transformer, transformer_family(pipe))
            else:
                out = type(pipe).lora_state_dict(str(path))
    except Exception as exc:
        raise ModelError(
            f"LoRA file {path} cannot be read as a LoRA ({type(exc).__name__}); it is damaged or not a "
            "LoRA: train it again or pick another file"
        ) from None
    return out[0] if isinstance(out, tuple) else out


#: The diffusers LoRA file in a LoRA folder (diffusers' ``LORA_WEIGHT_NAME_SAFE``); stage 07 writes
#: it, stage 08 and :func:`load_lora` read it.
LORA_FILE = "pytorch_lora_weights.safetensors"


def _lora_file(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A LoRA folder (what stage 07 writes, and what diffusers' ``load_lora_weights`` takes) stands
    for the diffusers file inside it: given the folder, the line said the LoRA file was not found."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    inside = folder / LORA_FILE
    if inside.is_file():
        return inside
    raise ModelError(
        f"LoRA folder {folder} holds no {LORA_FILE}; give a LoRA file (a kohya "
        "one ends in _kohya.safetensors) or a folder stage train wrote"
    )


def load_lora(
    pipe: Any,
    path: str | os.PathLike[str],
    scale: float = 1.0,
    *,
    adapter_name: str = "default",
    base_model: str | None = None,
) -> str:
    """Load a LoRA file (diffusers or kohya format, or a folder holding a diffusers one) into
    ``pipe`` at strength ``scale`` and return
    its adapter name. Before anything is loaded, every LoRA layer is checked against the base model
    (:func:`lora_mismatches`); a file made for another base model (other family, other sizes,
    other layer names) raises one ModelError naming the file, the base model and the first problem.

    The loaded adapter becomes the only active one (``pipe.set_adapters`` to combine several);
    loading again under the same ``adapter_name`` replaces the earlier file.
    """
    path = _lora_file(path)
    ref = getattr(pipe, "bunny_base", None)
    base = base_model or (
        ref.name if ref is not None else str(getattr(pipe, "name_or_path", "the base model"))
    )
    family = ref.family if ref is not None else "unknown family"
    state_dict = read_lora_state_dict(pipe, path)
    n_layers, problems = lora_mismatches(pipe, state_dict)
    if n_layers == 0:
        raise ModelError(f"LoRA file {path} holds no LoRA layers; train it again or pick another file")
    if problems:
        raise ModelError(
            f"LoRA file {path} does not match base model {base!r} ({family}): {problems[0]} "
            f"({len(problems)} of {n_layers} LoRA layers do not fit); use the base model it was trained "
            "on (train.base_model / generate.base_model) or another LoRA"
        )
    listed = getattr(pipe, "get_list_adapters", dict)() or {}
    if any(adapter_name in names for names in listed.values()):  # "unet" or "transformer"
        pipe.delete_adapters(adapter_name)
    with _quiet_diffusers():
        if getattr(pipe, "unet", None) is None and not _has_peft_keys(path):
            # a kohya FLUX/SD3 file: load what our converter made of it (alpha already folded into A)
            pipe.load_lora_weights(state_dict, adapter_name=adapter_name)
        else:  # by path: a state dict would drop the alpha kept in the file's metadata
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    return adapter_name


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings off while a LoRA loads: stage 07 trains the denoiser only, so every load
    printed "No LoRA keys associated to CLIPTextModel found" (once per checkpoint in notebook 08).
    What a warning there could say of a LoRA that does not fit, :func:`lora_mismatches` has said
    before, as one line."""
    from diffusers.utils import logging as dlogging  # lazy: diffusers takes 2.7 s to import

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def transformer_family(pipe: Any) -> Family:
    """``flux`` or ``sd3`` for a loaded transformer pipeline (from its class, so it works without
    ``bunny_base``)."""
    return "flux" if type(pipe).__name__.startswith("Flux") else "sd3"


def _has_peft_keys(path: str | os.PathLike[str]) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(k.endswith(".lora_A.weight") for k in f.keys())  # noqa: SIM118 (not a dict)
