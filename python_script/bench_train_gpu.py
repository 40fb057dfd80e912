"""Stage 07's FLUX.1 / SD3.5 LoRA step at full model size on a GPU, against diffusers' reference
scripts (the GPU part).

What is measured: LoRA training steps per second and peak GPU memory of

* **ours**: :class:`~diffusion_bunny.stages.train.flow.FlowLoraTrainer` built on the model folder
  (our loading code, ``train.quantize_base: none | nf4``), its ``step()`` called on random
  latents of the right shape; the caption is encoded once by the pipeline's own text encoders
  and cached, then the encoders are dropped (``cache_latents: true``, as a user trains);
* **reference**: diffusers' ``train_dreambooth_lora_flux.py`` / ``train_dreambooth_lora_sd3.py``
  (pass it as ``--reference-script``; not part of this repository; it needs torchvision) on
  four images of the resolution with ``--instance_prompt``, and ``--cache_latents`` for FLUX.1
  (the SD3 script's latent cache fails under bf16: its VAE stays fp32 while the pixels are cast to
  bf16, so it runs without and encodes with the VAE every step). bf16 only: the scripts have no
  quantised base (diffusers' nf4 example, ``research_projects/flux_lora_quantization``, reads a
  hub dataset and precomputed embeddings, so it is not run).

Both: batch 1, LoRA rank = alpha = ``--rank`` on the reference script's default layers (FLUX.1:
attention + feed-forward of the double blocks and the single blocks' attention; SD3: attention),
AdamW lr 1e-4, constant schedule, bf16 mixed precision, gradient checkpointing, T5 length 512
(FLUX.1) / 256 (SD3.5), FLUX.1-dev guidance 3.5, timesteps uniform (FLUX.1) or logit-normal (SD3.5:
its script has no uniform choice), unweighted loss.

The model: the transformer is built from the real FLUX.1-dev (19 double + 38 single blocks,
hidden 3072) or SD3.5-medium (24 blocks, hidden 1536, 13 dual-attention blocks) config with
random weights; CLIP-L (+ CLIP-G for SD3), T5-XXL and the VAE from their real configs with
random weights too, and small tokenizers written in code (``models.tiny_clip``/``tiny_t5``: only
token ids change, not shapes). The folder is written once (``--work``) and read by both tools
with ``from_pretrained``. Random weights and random latents do the same arithmetic as trained
ones, so speed and memory are those of real training; the losses mean nothing. Nothing is
downloaded.

Steps/s: read off each tool's tqdm bar from the end of step ``--warmup`` to the last step, as
``bench_train.py`` does (both synchronise the GPU every step when they read the loss). Peak
memory: ``torch.cuda.max_memory_allocated`` in the training process, two figures: over steps 2..N
(reset after the first optimizer step; what training needs) and up to the end of step 1 (loading,
text encoding, latent caching). The FLUX.1 script keeps its text encoders on the GPU and runs
them every step (``compute_text_embeddings`` in its loop: ``del text_encoder_one`` leaves them in
the ``text_encoders`` list), so its step figure includes T5-XXL; ours drops them after caching.
``--no-cudnn-attention`` turns cuDNN attention off in both tools' processes (with torch
2.11+cu130 on an H100 its backward failed on FLUX.1-dev's bf16 shapes in both).

    python python_script/bench_train_gpu.py --model flux-dev \\
        --reference-script /path/to/train_dreambooth_lora_flux.py --work /tmp/bench_gpu
    python python_script/bench_train_gpu.py --model sd35-medium \\
        --reference-script /path/to/train_dreambooth_lora_sd3.py --work /tmp/bench_gpu

``--model flux-small`` / ``sd3-small`` build the same layouts at toy size, for checking the
harness on a CPU (``--device cpu --threads 1``); ``flux-shallow`` has FLUX.1-dev's layer shapes at
depth 1 + 1. Exit status 0 even when a run fails (it is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import run_measured

CAPTION = "bunnystyle person, close-up portrait"

FLUX_DEV: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip

#: Real configs (the hub repos' transformer/config.json), and toy ones of the same layout.
TRANSFORMERS: dict[str, dict[str, Any]] = {
    "flux-dev": FLUX_DEV,
    "sd35-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    # FLUX.1-dev's layer shapes at depth 1 + 1 (for chasing a failure without the 12B build)
    "flux-shallow": {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1},
    "flux-small": dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ),
    "sd3-small": dict(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=96,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    ),
}  # fmt: skip

#: Text encoders: (hidden, intermediate, layers, heads, activation) of CLIP-L and CLIP-G, and
#: (d_model, d_kv, d_ff, layers, heads) of T5-XXL (v1.1), real and toy.
CLIP_L = (768, 3072, 12, 12, "quick_gelu")
CLIP_G = (1280, 5120, 32, 20, "gelu")
T5_XXL = (4096, 64, 10240, 24, 64)
SMALL_CLIP_L, SMALL_CLIP_G, SMALL_T5 = (32, 64, 1, 2, "quick_gelu"), (32, 64, 1, 2, "gelu"), (64, 8, 64, 1, 2)

#: The reference scripts' default LoRA layers (``--lora_layers`` unset), given to ours as a list.
REFERENCE_TARGETS = {
    "flux": (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
    "sd3": (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
        "attn.to_out.0", "attn.to_q", "attn.to_v",
    ),
}  # fmt: skip
SEQUENCE = {"flux": 512, "sd3": 256}
#: Timestep sampling: uniform for FLUX.1 (the flux script's ``none``), logit-normal for SD3 (the sd3
#: script has no uniform choice); the same on both sides.
WEIGHTING = {"flux": ("uniform", "none"), "sd3": ("logit_normal", "logit_normal")}

#: Runs a training program, then prints its CUDA peaks: over steps 2..N (the counter is reset
#: after the first optimizer step; an optimizer post-hook sees every tool's steps) and up to there.
WRAPPER = """
import os, resource, runpy, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
seen = {"steps": 0, "first": 0, "steps_peak": 0}
def after_step(optimizer, args, kwargs):
    if not torch.cuda.is_available():
        return
    seen["steps"] += 1
    if seen["steps"] == 1:
        seen["first"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        seen["steps_peak"] = max(seen["steps_peak"], torch.cuda.max_memory_allocated())
register_optimizer_step_post_hook(after_step)
if os.environ.get("BENCH_NO_CUDNN_SDP"):  # see --no-cudnn-attention
    torch.backends.cuda.enable_cudnn_sdp(False)
target = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(target, run_name="__main__")
finally:
    print(f"BENCH_MAXRSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
    print(f"BENCH_CUDA_STEPS_PEAK_MB={seen['steps_peak'] / 2**20:.0f}", file=sys.stderr)
    print(f"BENCH_CUDA_FIRST_PEAK_MB={seen['first'] / 2**20:.0f}", file=sys.stderr, flush=True)
"""

#: Our side: FlowLoraTrainer on the folder, step() on random latents (argv: settings JSON, steps).
OURS = """
import json, sys
import torch
from tqdm.auto import tqdm
from diffusion_bunny.stages.train.settings import TrainSettings
from diffusion_bunny.stages.train.flow import FlowLoraTrainer

settings, steps, cache, caption = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = TrainSettings(**settings)
trainer = FlowLoraTrainer(cfg, cache_dir=cache)
trainer.prepare_texts([caption])  # encoded once by the pipeline's encoders, cached; encoders dropped
side = trainer.resolution // int(trainer.pipe.vae_scale_factor)
channels = int(trainer.vae.config.latent_channels)
generator = torch.Generator().manual_seed(0)
for _ in tqdm(range(steps), desc="train steps"):
    # what the latent cache hands the step: the VAE's mean and log-variance per image
    mean = torch.randn(cfg.train_batch_size, channels, side, side, generator=generator)
    parameters = torch.cat([mean, torch.full_like(mean, -6.0)], 1)
    trainer.step({"parameters": parameters, "texts": [caption] * cfg.train_batch_size})
"""


def family_of(model: str) -> str:
    return "flux" if model.startswith("flux") else "sd3"


def build_model_folder(folder: Path, model: str, device: str) -> Path:
    """Write a pipeline folder with the ``model`` transformer, CLIP/T5/VAE of the real configs
    (toy ones for the ``-small`` models), random weights, bf16 on a GPU; tokenizers from code."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from diffusion_bunny.models.tiny import FLOW_WORDS, FLUX_DEV_SCHEDULER, SD3_SCHEDULER, VAE_FACTORS
    from diffusion_bunny.models.tiny_clip import DEFAULT_WORDS, write_clip_tokenizer
    from diffusion_bunny.models.tiny_t5 import write_t5_tokenizer

    family, small = family_of(model), model.endswith("-small")
    shallow = model.endswith("-shallow")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    words = (*DEFAULT_WORDS, *FLOW_WORDS)
    vocab = write_clip_tokenizer(tmp / "_tok" / "clip", model_max_length=77, words=words)
    write_t5_tokenizer(tmp / "_tok" / "t5", model_max_length=512, words=words)
    clip_tok = CLIPTokenizer.from_pretrained(tmp / "_tok" / "clip")
    t5_tok = T5TokenizerFast.from_pretrained(tmp / "_tok" / "t5")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]

    def clip(dims: tuple, projection: bool) -> Any:
        hidden, inter, layers, heads, act = dims
        config = CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    def t5(dims: tuple) -> Any:
        d_model, d_kv, d_ff, layers, heads = dims
        config = T5Config(
            vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0,
        )  # fmt: skip
        return T5EncoderModel(config)

    scaling, shift = VAE_FACTORS[family]
    vae_blocks = ((8, 16, 32, 32), 1, 8) if small else ((128, 256, 512, 512), 2, 32)
    before = torch.get_default_dtype()
    if device.startswith("cuda"):
        torch.set_default_dtype(torch.bfloat16)  # built where it is used, in the dtype it is used in
    try:
        with torch.device(device):
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=vae_blocks[0],
                layers_per_block=vae_blocks[1], latent_channels=16, norm_num_groups=vae_blocks[2],
                sample_size=1024, scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
                use_post_quant_conv=False,
            )  # fmt: skip
            text_t5 = t5(SMALL_T5 if small else (*T5_XXL[:3], 1, T5_XXL[4]) if shallow else T5_XXL)
            if family == "flux":
                from diffusers import FluxPipeline, FluxTransformer2DModel

                pipe = FluxPipeline(
                    scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
                    vae=vae,
                    text_encoder=clip(SMALL_CLIP_L if small else CLIP_L, False),
                    tokenizer=clip_tok,
                    text_encoder_2=text_t5,
                    tokenizer_2=t5_tok,
                    transformer=FluxTransformer2DModel(**TRANSFORMERS[model]),
                )
            else:
                from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

                pipe = StableDiffusion3Pipeline(
                    scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                    vae=vae,
                    text_encoder=clip(SMALL_CLIP_L if small else CLIP_L, True),
                    tokenizer=clip_tok,
                    text_encoder_2=clip(SMALL_CLIP_G if small else CLIP_G, True),
                    tokenizer_2=clip_tok,
                    text_encoder_3=text_t5,
                    tokenizer_3=t5_tok,
                    transformer=SD3Transformer2DModel(**TRANSFORMERS[model]),
                )
    finally:
        torch.set_default_dtype(before)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
    shutil.rmtree(tmp / "_tok", ignore_errors=True)
    (tmp / "bench.json").write_text(json.dumps({"model": model, "transformer_params": params}))
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def write_images(folder: Path, size: int, n: int = 4) -> Path:
    """``n`` pictures of ``size`` px for the reference script's ``--instance_data_dir``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        image = ramp[None, :, None] * rng.random(3)[None, None, :] + ramp[:, None, None] * 0.3
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


def ours_cmd(wrapper: Path, program: Path, folder: Path, model: str, res: int, quant: str, args, out: Path):
    family = family_of(model)
    settings = {
        "base_model": str(folder),
        "device": args.device,
        "resolution": res,
        "rank": args.rank,
        "alpha": float(args.rank),
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "max_train_steps": args.steps,
        "train_batch_size": 1,
        "mixed_precision": "bf16" if args.device == "cuda" else "no",
        "gradient_checkpointing": True,
        "cache_latents": True,
        "buckets": False,
        "checkpoint_every": 10 * args.steps,
        "validation_every": 0,
        "seed": 0,
        "lora_targets": list(REFERENCE_TARGETS[family]),
        "weighting_scheme": WEIGHTING[family][0],
        "flux_guidance": 3.5,
        "max_sequence_length": SEQUENCE[family],
        "quantize_base": quant,
    }
    return [
        sys.executable, str(wrapper), str(program), json.dumps(settings), str(args.steps), str(out), CAPTION,
    ]  # fmt: skip


def reference_cmd(
    wrapper: Path, script: Path, folder: Path, model: str, res: int, images: Path, args, out: Path
):
    family = family_of(model)
    cmd = [
        sys.executable, str(wrapper), str(script),
        "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(images),
        "--instance_prompt", CAPTION, "--resolution", str(res), "--center_crop",
        "--train_batch_size", "1", "--max_train_steps", str(args.steps), "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", str(args.rank), "--seed", "0",
        "--mixed_precision", "bf16" if args.device == "cuda" else "no", "--gradient_checkpointing",
        "--dataloader_num_workers", "0", "--checkpointing_steps", str(10 * args.steps),
        "--report_to", "all", "--weighting_scheme", WEIGHTING[family][1],
        "--max_sequence_length", str(SEQUENCE[family]), "--output_dir", str(out),
    ]  # fmt: skip
    if family == "flux":
        cmd += ["--lora_alpha", str(args.rank), "--guidance_scale", "3.5", "--cache_latents"]
    # SD3: no --cache_latents, it fails under bf16 (the VAE is kept in fp32 but the pixels are cast
    # to bf16 for caching); the script then runs the VAE on every step.
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(TRANSFORMERS))
    parser.add_argument("--reference-script", type=Path, default=None)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4"])
    parser.add_argument("--tools", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps/s from the end of this step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--threads", type=int, default=8, help="CPU threads per training process")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train_gpu"))
    parser.add_argument("--results", type=Path, default=None, help="append each result here (JSON lines)")
    parser.add_argument("--drop-model", action="store_true", help="delete the model folder at the end")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="both tools' processes turn cuDNN attention off (torch.backends.cuda.enable_cudnn_sdp): with "
        "torch 2.11+cu130 on an H100 its backward failed on FLUX.1-dev's bf16 shapes in both tools",
    )
    args = parser.parse_args(argv)
    # Both checks come before the model folder is built (minutes and gigabytes at full size), so a
    # typo or a CPU-only machine costs one line, not a traceback after the build.
    script = args.reference_script
    if script is not None and "reference" in args.tools and not script.is_file():
        print(
            f"error: --reference-script {script} not found (give diffusers' train_dreambooth_lora_*.py)",
            file=sys.stderr,
        )
        return 2
    if args.no_cudnn_attention:
        os.environ["BENCH_NO_CUDNN_SDP"] = "1"

    import diffusers
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda, but torch {torch.__version__} sees no CUDA GPU here "
            "(run on a GPU machine, or use --device cpu with --model flux-small or sd3-small)",
            file=sys.stderr,
        )
        return 2
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{args.model}: torch {torch.__version__}, diffusers {diffusers.__version__}, {gpu}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / f"model-{args.model}"
    if not (folder / "bench.json").is_file():
        started = time.perf_counter()
        build_model_folder(folder, args.model, args.device)
        print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    info = json.loads((folder / "bench.json").read_text())
    print(f"transformer: {info['transformer_params'] / 1e9:.2f} B parameters", flush=True)
    wrapper = args.work / "wrapper_gpu.py"
    wrapper.write_text(WRAPPER)
    program = args.work / "ours_gpu.py"
    program.write_text(OURS)

    runs = []
    for res in args.resolutions:
        for tool in args.tools:
            for quant in args.quantize if tool == "ours" else ["none"]:
                runs.append((res, tool, quant))
    results = []
    for res, tool, quant in runs:
        out = args.work / f"out-{args.model}-{res}-{tool}-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "ours":
            cmd = ours_cmd(wrapper, program, folder, args.model, res, quant, args, out)
        else:
            if args.reference_script is None:
                continue
            images = write_images(args.work / f"images-{res}", res)
            cmd = reference_cmd(
                wrapper, args.reference_script.resolve(), folder, args.model, res, images, args, out
            )
        row = {"model": args.model, "px": res, "tool": tool, "quantize": quant, "gpu": gpu}
        try:
            row |= run_measured(
                cmd, args.warmup, args.work / f"log-{args.model}-{res}-{tool}-{quant}.txt", args.threads
            )
        except SystemExit as exc:  # one failed run is reported; the others still run
            row["error"] = str(exc)[-2000:]
        shutil.rmtree(out, ignore_errors=True)
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.results:
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    print(f"\n{'model':<12} {'px':>5} {'tool':<10} {'base':<5} {'steps/s':>8} {'steps peak GiB':>15} "
          f"{'load+step1 GiB':>15} {'total s':>8}")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['model']:<12} {r['px']:>5} {r['tool']:<10} {r['quantize']:<5} FAILED")
            continue
        print(
            f"{r['model']:<12} {r['px']:>5} {r['tool']:<10} {r['quantize']:<5} {r['steps_per_s']:8.3f} "
            f"{r.get('cuda_steps_peak_mb', 0) / 1024:15.2f} {r.get('cuda_first_peak_mb', 0) / 1024:15.2f} "
            f"{r['total_s']:8.0f}"
        )
    if args.drop_model:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
