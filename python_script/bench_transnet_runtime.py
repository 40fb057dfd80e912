"""What ONNX Runtime offers for TransNetV2 on the CPU, measured in one run.

Stage 01's cascade runs TransNetV2 on runs of frames around doubtful candidates (a lone hard
candidate today: 7 frames predicted plus 16 of context on each side, 39 in all; a lone gradual
one 17 plus 25 on each side, 67; when the options below were chosen it was 17 plus 35, 87, the
default of ``--run-frames``, so the recorded figures in memory_bank/techContext.md are at 87).
This script times the
options ONNX Runtime has for that, each on the same 48x27 frames (the Hamilton clip of
``../shared/testdata`` looped by :mod:`diffusion_bunny.demo.realclips` if it is there, else the
demo's synthetic clips), and compares each option's probabilities with the fp32 network's:

* graph optimisation level: basic, extended, all (the default);
* intra-op threads: 1 and every core of this process;
* precision: the fp32 export, the int8 one stage 01 uses by default (convolutions but the first
  block, static QDQ, :func:`~diffusion_bunny.stages.extract.detectors.transnet.quantize_onnx`),
  and two rejected recipes for the record: every convolution in int8, and dynamic quantisation
  (int8 weights only);
* batching: several 87-frame runs in one call against one call each.

Timings are CPU seconds of this process (``time.process_time``) and wall seconds per frame, best
of ``--repeat``; CPU time is the fairer figure on a shared machine. Accuracy is the largest and
the 99th-percentile absolute difference of the probabilities from fp32 over every window, and
whether any frame crosses the 0.5 threshold one way or the other. Whether the cut lists stay the
same is ``python_script/eval_shots.py --precision int8`` and ``eval_real_cuts.py``'s job.

    uv run python python_script/bench_transnet_runtime.py [--repeat 5] [--windows 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = 87  # frames of input for one lone candidate when the options were chosen: 2 * 35 context + 17


def frames_for_bench(work: Path, count: int, run: int = RUN) -> tuple[np.ndarray, str]:
    """48x27 RGB frames, [N, 27, 48, 3], as stage 01 makes them; and where they came from."""
    from diffusion_bunny.demo import realclips
    from diffusion_bunny.media.video import VideoReader
    from diffusion_bunny.stages.extract.detectors.transnet import calibration_windows, rgb48

    if realclips.HAMILTON.is_file():
        params = realclips.Params(
            minutes=max(0.5, count * run / 29.97 / 60 + 0.1), width=640, height=360, seed=11
        )
        movie = realclips.make_movie(params, work, realclips.HAMILTON)
        reader = VideoReader(movie, 256, detect_width=128)
        return np.stack([rgb48(d.small_bgr) for d in reader.frames()]), f"looped Hamilton ({movie.name})"
    return np.concatenate(calibration_windows()), "synthetic clips (../shared/testdata is absent)"


def session(path: Path, threads: int, level: str = "all"):
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False
    options.graph_optimization_level = levels[level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(sess, windows: list[np.ndarray], batch: int, repeat: int) -> tuple[float, float]:
    """Best CPU and wall milliseconds per frame over ``repeat`` passes over ``windows``."""
    calls = [np.stack(windows[i : i + batch]) for i in range(0, len(windows), batch)]
    sess.run(None, {"frames": calls[0]})  # warm up
    frames = sum(c.shape[0] * c.shape[1] for c in calls)
    best_cpu = best_wall = float("inf")
    for _ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        for c in calls:
            sess.run(None, {"frames": c})
        best_cpu = min(best_cpu, (time.process_time() - cpu) / frames * 1000)
        best_wall = min(best_wall, (time.perf_counter() - wall) / frames * 1000)
    return best_cpu, best_wall


def probabilities(sess, windows: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([sess.run(None, {"frames": w[None]})[0][0] for w in windows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="best of N passes")
    ap.add_argument("--windows", type=int, default=12, help="runs of the network per pass")
    ap.add_argument(
        "--run-frames",
        type=int,
        default=RUN,
        help="frames of input per run (39: a lone hard candidate today)",
    )
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "real")
    args = ap.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from diffusion_bunny.stages.extract.detectors import transnet

    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run_frames
    frames, source = frames_for_bench(args.work, args.windows, run)
    step = max(run, (len(frames) - run) // args.windows)
    windows = [frames[i : i + run] for i in range(0, len(frames) - run + 1, step)][: args.windows]
    cores = len(os.sched_getaffinity(0))
    print(f"frames: {source}; {len(windows)} runs of {run} frames; {cores} cores; best of {args.repeat}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    fp32 = transnet.ensure_onnx_model(precision="fp32")
    int8 = transnet.ensure_onnx_model(precision="int8")
    with tempfile.TemporaryDirectory(prefix="bench-transnet-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        dynamic = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(str(pre), str(dynamic), weight_type=QuantType.QUInt8)
        all_convs = Path(tmp) / "all-convs.onnx"
        transnet.quantize_onnx(fp32, all_convs, keep_fp32=())
        reference = probabilities(session(fp32, cores), windows)
        rows: list[tuple[str, float, float, str]] = []

        def row(label: str, path: Path, threads: int, level: str = "all", batch: int = 1) -> None:
            sess = session(path, threads, level)
            cpu, wall = timed(sess, windows, batch, args.repeat)
            diff = np.abs(probabilities(sess, windows) - reference) if path != fp32 else np.zeros(1)
            probs = probabilities(sess, windows) if path != fp32 else reference
            flips = int(((probs > 0.5) != (reference > 0.5)).sum())
            acc = f"max {diff.max():.4f}  p99 {np.quantile(diff, 0.99):.4f}  flips {flips}"
            rows.append((label, cpu, wall, acc))
            print(f"  {label:<44} {cpu:7.2f} {wall:7.2f}   {acc}", flush=True)

        print(f"\n  {'option':<44} {'cpu ms':>7} {'wall ms':>7}   probabilities vs fp32 (per frame)")
        for level in ("basic", "extended", "all"):
            row(f"fp32, optimisation {level}, {cores} threads", fp32, cores, level)
        row("fp32, 1 thread", fp32, 1)
        for batch in (2, 4):
            row(f"fp32, {batch} runs per call", fp32, cores, batch=batch)
        row(f"int8 (stage 01's default), {cores} threads", int8, cores)
        row("int8 (stage 01's default), 1 thread", int8, 1)
        row("int8, 4 runs per call", int8, cores, batch=4)
        row("int8 every convolution (rejected)", all_convs, cores)
        row("dynamic int8 weights (rejected)", dynamic, cores)
    base = rows[2][1]
    print("\nCPU time per frame relative to fp32 with every optimisation:")
    for label, cpu, _, _ in rows:
        print(f"  {label:<44} {base / cpu:5.2f}x")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
