"""LoRA layers and key layouts of FLUX.1 and SD3.5: which transformer layers get a LoRA, and
diffusers/peft <-> kohya sd-scripts / ComfyUI files.

*diffusers layout* (``FluxPipeline`` / ``StableDiffusion3Pipeline.save_lora_weights``):
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` on diffusers' module names, separate
q/k/v projections; alpha in the file's ``lora_adapter_metadata``. ComfyUI reads this layout for
both families too (``comfy/lora.py``: ``transformer.*`` keys via ``flux_to_diffusers`` /
``mmdit_to_diffusers``).

*kohya layout* (what sd-scripts' ``networks/lora_flux.py`` / ``lora_sd3.py`` save, and what
ComfyUI, Forge and A1111-Forge read): ``lora_unet_<original-model module path with _>`` with
``.lora_down.weight`` (rank x in), ``.lora_up.weight`` (out x rank) and a scalar ``.alpha`` per
module; the *original* (BFL / SAI) checkpoints fuse q, k, v (and, in FLUX single blocks, the MLP
input) into one Linear, so a LoRA on them is one module:

- FLUX ``double_blocks_{i}_img_attn_qkv`` = to_q|to_k|to_v, ``txt_attn_qkv`` = add_{q,k,v}_proj,
  ``img_attn_proj`` = to_out.0, ``txt_attn_proj`` = to_add_out, ``img_mlp_0/2`` = ff.net.0.proj /
  ff.net.2, ``txt_mlp_0/2`` = ff_context.*, ``img_mod_lin`` / ``txt_mod_lin`` = norm1(_context).linear;
  ``single_blocks_{i}_linear1`` = to_q|to_k|to_v|proj_mlp, ``linear2`` = proj_out,
  ``modulation_lin`` = norm.linear; embedders and ``final_layer_*`` (modulation with scale and
  shift swapped).
- SD3 ``joint_blocks_{i}_x_block_attn_qkv`` = to_q|to_k|to_v, ``context_block_attn_qkv`` =
  add_{q,k,v}_proj, ``x_block_attn_proj`` = to_out.0, ``context_block_attn_proj`` = to_add_out,
  ``x_block_attn2_qkv`` / ``attn2_proj`` (SD3.5 MMDiT-X), ``x_block_mlp_fc1/2``,
  ``context_block_mlp_fc1/2``, ``x_block_adaLN_modulation_1`` = norm1.linear,
  ``context_block_adaLN_modulation_1`` = norm1_context.linear (swapped in the last block, whose
  context stream is AdaLayerNormContinuous).

A fused module from separate LoRAs (rank r each, n parts) is exact: down = [A_1; ...; A_n]
(n r x in), up = block-diagonal(B_1, ..., B_n), alpha = n x alpha (kohya scales by alpha / rank
with rank = n r). Missing parts are zero blocks. diffusers' reader
(``_convert_kohya_flux_lora_to_diffusers``) recognises the block-diagonal ("sparse") form and
splits it back; it hard-codes FLUX.1's sizes (19 double / 38 single blocks, linear1 split
3072/3072/3072/12288), so it reads real FLUX.1 files only. diffusers 0.42 has no reader for
kohya SD3 files at all. :func:`kohya_to_diffusers` here reads both, for any model size.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (diffusers module suffix(es) inside a block, kohya name inside the block, swap scale/shift)
FLUX_DOUBLE = [
    (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_qkv"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_qkv"),
    (("attn.to_out.0",), "img_attn_proj"),
    (("attn.to_add_out",), "txt_attn_proj"),
    (("ff.net.0.proj",), "img_mlp_0"),
    (("ff.net.2",), "img_mlp_2"),
    (("ff_context.net.0.proj",), "txt_mlp_0"),
    (("ff_context.net.2",), "txt_mlp_2"),
    (("norm1.linear",), "img_mod_lin"),
    (("norm1_context.linear",), "txt_mod_lin"),
]
FLUX_SINGLE = [
    (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1"),
    (("proj_out",), "linear2"),
    (("norm.linear",), "modulation_lin"),
]
FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
    "proj_out": "final_layer_linear",
}
SD3_BLOCK = [
    (("attn.to_q", "attn.to_k", "attn.to_v"), "x_block_attn_qkv"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block_attn_qkv"),
    (("attn.to_out.0",), "x_block_attn_proj"),
    (("attn.to_add_out",), "context_block_attn_proj"),
    (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block_attn2_qkv"),
    (("attn2.to_out.0",), "x_block_attn2_proj"),
    (("ff.net.0.proj",), "x_block_mlp_fc1"),
    (("ff.net.2",), "x_block_mlp_fc2"),
    (("ff_context.net.0.proj",), "context_block_mlp_fc1"),
    (("ff_context.net.2",), "context_block_mlp_fc2"),
    (("norm1.linear",), "x_block_adaLN_modulation_1"),
    (("norm1_context.linear",), "context_block_adaLN_modulation_1"),
]
SD3_TOP = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder_mlp_0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder_mlp_2",
    "time_text_embed.text_embedder.linear_1": "y_embedder_mlp_0",
    "time_text_embed.text_embedder.linear_2": "y_embedder_mlp_2",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
    "proj_out": "final_layer_linear",
}
PREFIX = "lora_unet_"

#: ``train.lora_targets`` presets, as suffixes of the transformer's Linear layer names.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
#: FLUX single blocks' output projection (attention and MLP outputs together: kohya's linear2);
#: matched only inside ``single_transformer_blocks`` (the top-level ``proj_out`` stays frozen).
SINGLE_OUT = re.compile(r"^single_transformer_blocks\.\d+\.proj_out$")


def lora_target_names(transformer: Any, targets: str | Sequence[str]) -> list[str]:
    """Full names of the Linear layers a target preset (or suffix list) selects, sorted: passed to
    peft as an explicit list so what is trained never depends on suffix-matching surprises."""
    import torch  # lazy: torch takes 1.1 s to import

    if isinstance(targets, str):
        parts = targets.split("+")
        unknown = [p for p in parts if p not in ("attention", "mlp")]
        if unknown:
            raise ValueError(
                f"train.lora_targets = {targets!r}: use attention, attention+mlp or a list of layer names"
            )
        suffixes = ATTENTION + (MLP if "mlp" in parts else ())
        single_out = "mlp" in parts
    else:
        suffixes, single_out = tuple(targets), False
    # SD3's last block is context_pre_only: its text stream's output is discarded, so the text
    # queries (add_q_proj) reach nothing and a LoRA there never gets a gradient (diffusers' SD3
    # script trains it anyway: B stays 0). Left out.
    dead = {
        f"transformer_blocks.{i}.attn.add_q_proj"
        for i, block in enumerate(getattr(transformer, "transformer_blocks", []))
        if getattr(block, "context_pre_only", False)
    }
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or name in dead:
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes) or (
            single_out and SINGLE_OUT.match(name)
        ):
            names.append(name)
    if not names:
        raise ValueError(f"train.lora_targets = {targets!r} selects no layer of this transformer")
    return sorted(names)


def _swap(w: Any) -> Any:
    """Swap the two halves of a modulation's output rows (diffusers: scale, shift; BFL/SAI: shift,
    scale) -- an involution, so the same function converts both ways."""
    import torch  # lazy: torch takes 1.1 s to import

    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def kohya_modules(transformer: Any, family: str) -> list[tuple[str, list[str], bool]]:
    """Every kohya module of a transformer: (kohya name, the diffusers module names it covers in
    order, whether its output rows are swapped)."""
    cfg = transformer.config
    out: list[tuple[str, list[str], bool]] = []
    if family == "flux":
        for i in range(cfg.num_layers):
            out += [(f"{PREFIX}double_blocks_{i}_{k}", [f"transformer_blocks.{i}.{m}" for m in ms], False)
                    for ms, k in FLUX_DOUBLE]  # fmt: skip
        for i in range(cfg.num_single_layers):
            blk = f"single_transformer_blocks.{i}"
            out += [
                (f"{PREFIX}single_blocks_{i}_{k}", [f"{blk}.{m}" for m in ms], False) for ms, k in FLUX_SINGLE
            ]
        out += [(PREFIX + k, [m], m == "norm_out.linear") for m, k in FLUX_TOP.items()]
    else:
        last = cfg.num_layers - 1
        for i in range(cfg.num_layers):
            for ms, k in SD3_BLOCK:
                swap = i == last and k == "context_block_adaLN_modulation_1"
                out.append(
                    (f"{PREFIX}joint_blocks_{i}_{k}", [f"transformer_blocks.{i}.{m}" for m in ms], swap)
                )
        out += [(PREFIX + k, [m], m == "norm_out.linear") for m, k in SD3_TOP.items()]
    return out


def _linear(transformer: Any, name: str) -> Any | None:
    try:
        module = transformer.get_submodule(name)
    except AttributeError:
        return None
    return getattr(module, "base_layer", module)


def diffusers_to_kohya(state: dict[str, Any], transformer: Any, family: str, alpha: float) -> dict[str, Any]:
    """peft/diffusers LoRA weights of the transformer (keys ``<module>.lora_A.weight``, with or
    without a ``transformer.`` prefix) -> kohya keys. Every LoRA layer must land in a kohya module
    (else ValueError: the file would silently lose it)."""
    import torch  # lazy: torch takes 1.1 s to import

    sd = {k.removeprefix("transformer."): v for k, v in state.items()}
    layers = {k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")}
    out: dict[str, Any] = {}
    used: set[str] = set()
    for kname, parts, swap in kohya_modules(transformer, family):
        present = [p for p in parts if p in layers]
        if not present:
            continue
        rank = sd[f"{present[0]}.lora_A.weight"].shape[0]
        downs, ups = [], []
        for p in parts:
            if p in layers:
                downs.append(sd[f"{p}.lora_A.weight"])
                ups.append(sd[f"{p}.lora_B.weight"])
                used.add(p)
            else:
                lin = _linear(transformer, p)
                if lin is None:
                    raise ValueError(f"{p}: no such layer, cannot fill the fused kohya module {kname}")
                downs.append(
                    torch.zeros(rank, lin.in_features, dtype=downs[0].dtype if downs else torch.float32)
                )
                ups.append(torch.zeros(lin.out_features, rank, dtype=downs[0].dtype))
        up = torch.block_diag(*ups) if len(parts) > 1 else ups[0]
        if swap:
            up = _swap(up)
        out[f"{kname}.lora_down.weight"] = torch.cat(downs, 0).contiguous()
        out[f"{kname}.lora_up.weight"] = up.contiguous()
        out[f"{kname}.alpha"] = torch.tensor(float(alpha) * len(parts))
    missing = layers - used
    if missing:
        raise ValueError(f"LoRA layers without a kohya name: {sorted(missing)[:3]}")
    return out


def kohya_to_diffusers(kohya: dict[str, Any], transformer: Any, family: str) -> dict[str, Any]:
    """kohya keys -> ``transformer.<module>.lora_A/B.weight`` with alpha / rank folded into A
    (diffusers then loads it with alpha = rank). Fused modules are split by the transformer's
    layer sizes; a block-diagonal up matrix gives each part its own rank-r LoRA, a dense one gives
    every part the whole down matrix. All-zero parts are dropped."""
    import torch  # lazy: torch takes 1.1 s to import

    out: dict[str, Any] = {}
    known = set()
    for kname, parts, swap in kohya_modules(transformer, family):
        if f"{kname}.lora_down.weight" not in kohya:
            continue
        known.add(kname)
        down = kohya[f"{kname}.lora_down.weight"].float()
        up = kohya[f"{kname}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(kohya.get(f"{kname}.alpha", torch.tensor(float(rank))))
        if swap:
            up = _swap(up)
        down = down * (alpha / rank)
        if len(parts) == 1:
            out[f"transformer.{parts[0]}.lora_A.weight"] = down.contiguous()
            out[f"transformer.{parts[0]}.lora_B.weight"] = up.contiguous()
            continue
        dims = [_linear(transformer, p).out_features for p in parts]
        ups = torch.split(up, dims, dim=0)
        n = len(parts)
        sparse = rank % n == 0 and all(
            not ups[j][:, c * (rank // n) : (c + 1) * (rank // n)].any()
            for j in range(n)
            for c in range(n)
            if c != j
        )
        for j, p in enumerate(parts):
            if sparse:
                r = rank // n
                a, b = down[j * r : (j + 1) * r], ups[j][:, j * r : (j + 1) * r]
            else:
                a, b = down, ups[j]
            if not a.any() or not b.any():
                continue  # a zero part: kohya had to fill it, the model had no LoRA there
            out[f"transformer.{p}.lora_A.weight"] = a.contiguous()
            out[f"transformer.{p}.lora_B.weight"] = b.contiguous()
    unknown = {k.split(".")[0] for k in kohya if k.startswith(PREFIX)} - known
    if unknown:
        raise ValueError(f"kohya modules this {family} transformer does not have: {sorted(unknown)[:3]}")
    return out


def is_kohya(state: dict[str, Any]) -> bool:
    return any(k.endswith(".lora_down.weight") for k in state)


def save_kohya_flow(state: dict[str, Any], path: Path, family: str, alpha: float, transformer: Any) -> Path:
    """Write the kohya/ComfyUI file atomically, with sd-scripts' metadata keys."""
    from safetensors.torch import save_file  # lazy: pulls in torch (1.1 s)

    kohya = diffusers_to_kohya(state, transformer, family, alpha)
    arch = "flux-1-dev" if family == "flux" else "stable-diffusion-v3"
    meta = {
        "ss_network_module": "networks.lora_flux" if family == "flux" else "networks.lora_sd3",
        "ss_network_alpha": str(alpha),
        "ss_network_dim": str(next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))),
        "modelspec.architecture": f"{arch}/lora",
    }
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file(kohya, tmp, metadata=meta)
    os.replace(tmp, path)
    return Path(path)
