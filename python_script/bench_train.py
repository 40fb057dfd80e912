"""Benchmark stage 07's LoRA training against diffusers' own example script.

Targets: at least 1.0x the throughput (optimizer steps per second) of diffusers'
``examples/text_to_image/train_text_to_image_lora.py``, and at least 1.3x with cached latents, on
the same configuration and data, measured in the same run.

The reference script is not part of this repository: pass its path (``--diffusers-script``),
taken from the diffusers repository at a version whose ``check_min_version`` the installed
diffusers passes. It needs ``datasets`` and ``torchvision``, which this project does not depend
on, so run the benchmark with them layered on for that one command:

    uv run --with torchvision --with datasets python python_script/bench_train.py \\
        --diffusers-script /path/to/train_text_to_image_lora.py [--steps 60] [--resolution 128]
        [--batch-size 4] [--images 16] [--repeats 2] [--base-model tiny]

What runs, each in its own process, ``--repeats`` times interleaved (best of each kept):

1. diffusers' script on an imagefolder (``metadata.jsonl`` with ``file_name`` and ``text``, read
   with ``--caption_column text``), square ``--resolution`` with ``--center_crop``, no flip;
2. ours (``lora_train.train_lora``) on the same folder laid out as stage 06 writes it, with
   ``train.buckets: false`` (the same square crop) and ``cache_latents: false``: like the
   script, the VAE and the text encoder run on every step;
3. ours with ``cache_latents: true`` (latents on disk, text-encoder outputs in memory).

Both use the same base model folder (``--base-model``, default the ``tiny`` preset, saved as an
ordinary diffusers pipeline), resolution, batch size, rank and alpha (= rank, as the script sets
it), learning rate, constant schedule, seed, fp32 (no mixed precision), no validation, no
checkpoint before the end, no dataloader workers.

Steps/s is read off each tool's own tqdm bar (``TQDM_MININTERVAL=0``, so every step is printed),
timestamped by this process: from the end of step ``--warmup`` (after the first epoch, so model
loading, the first step's set-up and our latent caching are excluded) to the last step. The
child's CPU time (user + system, from ``/proc``) over the same steps gives steps per CPU-second,
which other work on a shared machine disturbs far less than wall time; the best run of each tool
is kept for both. The total wall time of each process (including loading and caching) is printed
as well. Peak memory is the child's ``ru_maxrss``. Each process runs torch on ``--threads`` CPU
threads (default 1): with two threads on a 2-core machine that other processes share, OpenMP's
spinning threads wait on each other and both wall and CPU time swing by 2x and more run to run.

FLUX.1: with ``--base-model tiny-flux`` (or any FLUX.1 folder) the reference is
diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` (pass it as ``--diffusers-script``),
run on the same imagefolder with ``--dataset_name <folder> --caption_column text`` (a caption per
image, so it runs CLIP and T5 on every step), ``--guidance_scale 1.0 --weighting_scheme none``,
T5 length ``--max-sequence-length``, rank = alpha; ours runs ``FlowLoraTrainer`` with
``weighting_scheme: uniform``, ``flux_guidance: 1.0`` and the same T5 length. Row 2 ("same work")
runs the VAE and both text encoders every step (``cache_latents: false``); row 3 caches latents
and text embeddings and drops the text encoders. A fourth row runs the script with its own
``--cache_latents`` (latents only) for reference.

    uv run --with torchvision --with datasets python python_script/bench_train.py \
        --diffusers-script /path/to/train_dreambooth_lora_flux.py --base-model tiny-flux

Exit status 0 even when a target is missed (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TARGET_PLAIN = 1.0
TARGET_CACHED = 1.3

#: Wraps a training entry point: runs it, then prints the process's peak resident memory.
WRAPPER = """
import resource, runpy, sys
target = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(target, run_name="__main__")
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"BENCH_MAXRSS_KB={peak}", file=sys.stderr, flush=True)
"""

#: Our side: train_lora on the dataset folder with the settings passed as JSON (the trainer of
#: the base model's family: LoraTrainer for SD 1.x/SDXL, FlowLoraTrainer for FLUX.1/SD3.5).
OURS = """
import json, sys
from pathlib import Path
import polars as pl
from diffusion_bunny.stages.train.settings import TrainSettings
from diffusion_bunny.stages.train.data import read_dataset
from diffusion_bunny.stages.train.flow import trainer_class_for
from diffusion_bunny.stages.train.lora import train_lora

run_dir, out_dir, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
images, _ = read_dataset(run_dir, pl.read_parquet(run_dir / "tables" / "dataset_items.parquet", glob=False))
cfg = TrainSettings(**settings)
trainer = trainer_class_for(cfg)
train_lora(images, cfg, out_dir, progress=True, cache_dir=out_dir / "cache", trainer_class=trainer)
"""

BAR = re.compile(r"(?:Steps|train steps):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def write_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` pictures (gradient + shapes, 4:3) in ``<root>/dataset/hf/train/`` with ``metadata.jsonl``
    and the ``dataset_items`` table: the layout stage 06 writes, and an imagefolder for diffusers."""
    import polars as pl

    rng = np.random.default_rng(seed)
    folder = root / "dataset" / "hf" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            w, h = 200, 150
            base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
            image = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
                draw.ellipse((x, y, x + 40, y + 30), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            name = f"{i:04d}.jpg"
            image.save(folder / name, quality=95)
            text = f"bunnystyle, a photo of the cat number {i}"
            meta.write(json.dumps({"file_name": name, "text": text}) + "\n")
            rows.append(
                {
                    "frame_id": f"f{i:04d}",
                    "split": "train",
                    "file_name": name,
                    "text": text,
                    "characters": [],
                    "shot_id": i,
                    "crop": "full",
                    "repeats": 1,
                    "width": w,
                    "height": h,
                }
            )
    (root / "tables").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema_overrides={"characters": pl.List(pl.Utf8)}).write_parquet(
        root / "tables" / "dataset_items.parquet"
    )
    return folder.parent


def run_measured(cmd: list[str], warmup: int, log_path: Path, threads: int) -> dict:
    """Run ``cmd``, timestamp every step its tqdm bar prints, return steps/s after ``warmup``,
    total wall time and peak RSS."""
    env = {**os.environ, "TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stamps: dict[int, float] = {}
    cpu: dict[int, float] = {}
    maxrss = [0]
    extra: dict[str, float] = {}  # other BENCH_<KEY>=<number> lines of the child (GPU memory)
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        # utime + stime of the child (all its threads), from /proc: less sensitive than wall time
        # to other work on a shared machine.
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            return float("nan")

    tail: list[str] = []

    def read() -> None:
        buffer = b""
        assert proc.stderr is not None
        with open(log_path, "wb") as log:
            while chunk := proc.stderr.read1(65536):  # type: ignore[attr-defined]
                now = time.perf_counter()
                log.write(chunk)
                buffer += chunk
                *lines, buffer = re.split(rb"[\r\n]", buffer)
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    match = BAR.search(line)
                    if match and int(match.group(1)) not in stamps:
                        stamps[int(match.group(1))] = now
                        cpu[int(match.group(1))] = cpu_seconds()
                    elif line.startswith("BENCH_MAXRSS_KB="):
                        maxrss[0] = int(line.split("=")[1])
                    elif re.match(r"BENCH_[A-Z_]+=[-0-9.e]+$", line.strip()):
                        key, value = line.strip().split("=")
                        extra[key[len("BENCH_") :].lower()] = float(value)
                    elif line.strip():
                        tail[:] = [*tail[-20:], line]

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait()
    reader.join()
    total = time.perf_counter() - started
    if code != 0 or not stamps:
        raise SystemExit(
            f"{cmd[2]} failed (exit {code}); last lines:\n" + "\n".join(tail) + f"\nlog: {log_path}"
        )
    last = max(stamps)
    if warmup not in stamps:
        warmup = min(s for s in stamps if s > 0)
    rate = (last - warmup) / (stamps[last] - stamps[warmup])
    cpu_rate = (last - warmup) / max(1e-9, cpu[last] - cpu[warmup])
    return {
        "steps_per_s": rate,
        "steps_per_cpu_s": cpu_rate,
        "total_s": total,
        "maxrss_mb": maxrss[0] / 1024,
        "steps": last,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers-script", required=True, type=Path, help="train_text_to_image_lora.py")
    parser.add_argument(
        "--base-model", default="tiny", help="tiny, a hub id in the cache or a pipeline folder"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=0, help="0: the first step after one epoch")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads of each training process (OMP_NUM_THREADS)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder here (logs)")
    parser.add_argument(
        "--max-sequence-length", type=int, default=64, help="FLUX.1: T5 tokens per caption (both tools)"
    )
    args = parser.parse_args(argv)

    import diffusers
    import torch

    from diffusion_bunny.models.diffusion import resolve_base_model

    script = args.diffusers_script.resolve()
    if not script.is_file():
        raise SystemExit(f"--diffusers-script {script} is not a file")
    try:
        import datasets  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"diffusers' script needs {exc.name}; run with: "
            "uv run --with torchvision --with datasets python ..."
        ) from None
    ref = resolve_base_model(args.base_model)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_train_"))
    if work.exists() and args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    hf = write_dataset(run_dir, args.images)
    per_epoch = -(-args.images // args.batch_size)
    warmup = args.warmup or per_epoch + 1
    lr = 1e-4
    print(
        f"base model {ref.name} ({ref.family}, {ref.path}); {args.images} images, {args.resolution} px, "
        f"batch {args.batch_size}, rank {args.rank}, {args.steps} steps, steps/s from step {warmup}; "
        f"{args.device}, torch {torch.__version__} ({args.threads} thread(s) per process), diffusers "
        f"{diffusers.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"reference: {script}")

    wrapper = work / "wrapper.py"
    wrapper.write_text(WRAPPER)
    ours = work / "ours.py"
    ours.write_text(OURS)

    flux = ref.family == "flux"

    def flux_cmd(out: Path, cache: bool = False) -> list[str]:
        return [
            sys.executable, str(wrapper), str(script),
            "--pretrained_model_name_or_path", str(ref.path),
            "--dataset_name", str(hf / "train"), "--caption_column", "text", "--image_column", "image",
            "--instance_prompt", "bunnystyle", "--resolution", str(args.resolution), "--center_crop",
            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
            "--learning_rate", str(lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--rank", str(args.rank), "--lora_alpha", str(args.rank), "--seed", "0",
            "--mixed_precision", "no", "--dataloader_num_workers", "0",
            "--checkpointing_steps", str(10 * args.steps), "--report_to", "all",
            "--guidance_scale", "1.0", "--weighting_scheme", "none",
            "--max_sequence_length", str(args.max_sequence_length), "--output_dir", str(out),
        ] + (["--cache_latents"] if cache else [])  # fmt: skip

    def diffusers_cmd(out: Path) -> list[str]:
        if flux:
            return flux_cmd(out)
        return [
            sys.executable, str(wrapper), str(script),
            "--pretrained_model_name_or_path", str(ref.path),
            "--train_data_dir", str(hf),
            "--caption_column", "text",
            "--resolution", str(args.resolution),
            "--center_crop",
            "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(args.steps),
            "--learning_rate", str(lr),
            "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0",
            "--rank", str(args.rank),
            "--seed", "0",
            "--mixed_precision", "no",
            "--dataloader_num_workers", "0",
            "--checkpointing_steps", str(10 * args.steps),
            "--report_to", "all",
            "--output_dir", str(out),
        ]  # fmt: skip

    def ours_cmd(out: Path, cached: bool) -> list[str]:
        settings = {
            "base_model": str(ref.path) if ref.source != "preset" else ref.name,
            "device": args.device,
            "resolution": args.resolution,
            "rank": args.rank,
            "alpha": float(args.rank),
            "learning_rate": lr,
            "lr_scheduler": "constant",
            "max_train_steps": args.steps,
            "train_batch_size": args.batch_size,
            "mixed_precision": "no",
            "cache_latents": cached,
            "buckets": False,
            "checkpoint_every": 10 * args.steps,
            "validation_every": 0,
            "seed": 0,
        }
        if flux:  # the reference's objective: uniform timesteps, guidance 1, the same T5 length
            settings |= {
                "weighting_scheme": "uniform",
                "flux_guidance": 1.0,
                "max_sequence_length": args.max_sequence_length,
            }
        return [sys.executable, str(wrapper), str(ours), str(run_dir), str(out), json.dumps(settings)]

    reference_name = f"diffusers {script.name}"
    plain_name = "ours (VAE + text encoder(s) every step)"
    cached_name = "ours (cached latents + text)" if flux else "ours (cached latents)"
    tools = {
        reference_name: lambda i: diffusers_cmd(work / f"diffusers_{i}"),
        plain_name: lambda i: ours_cmd(work / f"ours_{i}", False),
        cached_name: lambda i: ours_cmd(work / f"ours_cached_{i}", True),
    }
    if flux:
        tools["diffusers --cache_latents (latents only)"] = lambda i: flux_cmd(
            work / f"diffusers_c_{i}", True
        )
    best: dict[str, dict] = {}
    for i in range(args.repeats):
        for name, make in tools.items():
            result = run_measured(
                make(i), warmup, work / f"log_{i}_{name.split()[0]}_{len(best)}.txt", args.threads
            )
            print(
                f"  run {i + 1}: {name:<44} {result['steps_per_s']:6.2f} steps/s  "
                f"{result['steps_per_cpu_s']:6.2f} steps/CPU-s  "
                f"total {result['total_s']:6.1f} s  peak RSS {result['maxrss_mb']:7.0f} MB"
            )
            old = best.get(name)
            best[name] = (
                result
                if old is None
                else {
                    "steps_per_s": max(old["steps_per_s"], result["steps_per_s"]),
                    "steps_per_cpu_s": max(old["steps_per_cpu_s"], result["steps_per_cpu_s"]),
                    "total_s": min(old["total_s"], result["total_s"]),
                    "maxrss_mb": max(old["maxrss_mb"], result["maxrss_mb"]),
                }
            )

    reference = best[reference_name]["steps_per_s"]
    ref_cpu = best[reference_name]["steps_per_cpu_s"]
    print(
        f"\n{'tool':<44} {'steps/s':>8} {'ratio':>6} {'steps/CPU-s':>12} {'ratio':>6} {'total s':>8} "
        f"{'peak RSS MB':>12}"
    )
    for name, result in best.items():
        print(
            f"{name:<44} {result['steps_per_s']:8.2f} {result['steps_per_s'] / reference:5.2f}x "
            f"{result['steps_per_cpu_s']:12.2f} {result['steps_per_cpu_s'] / ref_cpu:5.2f}x "
            f"{result['total_s']:8.1f} {result['maxrss_mb']:12.0f}"
        )
    plain = best[plain_name]["steps_per_s"] / reference
    cached = best[cached_name]["steps_per_s"] / reference
    print(
        "steps/s and steps/CPU-s: best of the runs; total s: shortest; peak RSS: largest. Where the "
        "two ratios disagree, other work on the machine moved the wall-clock figures."
    )
    print(
        f"\ntarget >= {TARGET_PLAIN}x: {plain:.2f}x ({'met' if plain >= TARGET_PLAIN else 'MISSED'}); "
        f"cached latents target >= {TARGET_CACHED}x: {cached:.2f}x "
        f"({'met' if cached >= TARGET_CACHED else 'MISSED'})"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and outputs kept in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
