"""Stage 03's face detectors side by side on the face truth set: recall and precision
(IoU >= 0.4), recall by face size, pose and kind of frame, and frames/s at 720p on 2 cores.

Every setting runs stage 03's own detection (:func:`diffusion_bunny.models.faces.detect`) on the
44 frames of ``test/stages/characters/data/face_truth/`` (faces counted and boxed by hand, frames
with no face; ``python_script/make_face_truth.py`` made them). The frames are stored at 640 px,
the width the detectors look at, and stand for 720p frames (``min_face_px`` is halved on them).

Speed: the same frames scaled and padded to 1280x720 JPEGs, read, searched and (second figure)
every face found encoded, on a pool of ``--workers`` processes (default 2) warmed first: the
steady rate of stage 03's per-frame step. Shared 2-core machines drift by 20% and more within
minutes, so one figure per setting, taken minutes after the one beside it, ranked settings by
when they ran (a row once showed more frames/s with encodings than without). The speed is
measured in ``--rounds`` rounds (default 3), each over every setting in turn, and the table
shows each setting's median; ``eval_results.json`` keeps every round. The machine's CPU and
load average are printed beside it.

Targets: recall >= 0.9 on faces >= 32 px, precision >= 0.95, and the step with
encodings >= 30 frames/s. ``--write`` stores the table in ``face_truth/eval_results.json``, which
docs/face-detectors.md and notebook 03 show. ``--fit-boxes`` prints the median box moves that take
MediaPipe's boxes onto the truth's (models/blazeface.py ``BOX_TO_FACE``), fitted on the frames
of the sources that are not held out.

Columns ``xs R>=32`` and ``xs prec``: the same, summed over the frames searched at their own size
and resized by each of ``--scales`` (0.84-1.19): faces then fall between an image pyramid's
levels differently, so a setting that wins only by where the truth's few faces sit against the
pyramid does not win there. MTCNN's defaults were chosen on these columns.

Fit and held-out: recall on faces >= 32 px and precision (at the frames' own size and over the
scales) on the fit part and on the held-out part (``face_truth.HOLD_OUT``: whole sources that
share no clip and no person with the fit part, and the frames made from them) apart, in a
second table; a setting is to be chosen on the fit columns only.

``--speed-for LABELS`` measures frames/s for those settings only (exact labels). ``--keep-speed``
gives the rows whose frames/s this run does not measure those of the stored table (marked ``*``,
with the CPU they were measured on): a change that cannot move them (a new split of the truth
set, a relabelled face) then needs no half hour of speed rounds. A table never mixes frames/s
from two CPUs: keeping them from another CPU beside figures measured here is refused.

    uv run python python_script/eval_faces.py [--only hog,mediapipe] [--speed-repeat 2]
        [--rounds 3] [--workers 2] [--no-speed] [--speed-for centerface,mtcnn] [--keep-speed]
        [--scales 0.84,0.92,1.09,1.19] [--write] [--fit-boxes]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from diffusion_bunny.demo import face_truth as ft
from diffusion_bunny.models.device import cpu_summary
from diffusion_bunny.models.face_detect import FACE_DETECTORS
from diffusion_bunny.models.faces import DetectSettings

TARGET_RECALL, TARGET_PRECISION, TARGET_FPS = 0.9, 0.95, 30.0
BASE = DetectSettings()


def setting(name: str, common: dict | None = None, **own) -> DetectSettings:
    """The default settings with detector ``name`` (``own``: its own settings over its defaults)
    and ``common`` (the settings every detector shares) over the defaults."""
    return replace(BASE, detector=FACE_DETECTORS.settings(name, **own), **(common or {}))


#: The default before the pyramid started at 1.1 x min_face_px and faces were scored mirrored too.
BEFORE = setting("mtcnn", {"min_face_px": 40}, pyramid_start=0.8, mirror_score=False, min_score=0.9)
#: (label, settings): every detector, and the settings of each worth seeing.
SETTINGS = [
    ("hog", setting("hog")),
    ("hog upsample=2", setting("hog", upsample=2)),
    ("cnn upsample=0", setting("cnn", upsample=0)),
    ("mediapipe", setting("mediapipe")),
    ("mediapipe min_score=0.5", setting("mediapipe", min_score=0.5)),
    ("mediapipe min_score=0.75", setting("mediapipe", min_score=0.75)),
    ("centerface", setting("centerface")),
    ("centerface min_score=0.4", setting("centerface", min_score=0.4)),
    ("centerface min_score=0.6", setting("centerface", min_score=0.6)),
    ("centerface min_face_px=34", setting("centerface", {"min_face_px": 34})),
    ("centerface min_face_px=40", setting("centerface", {"min_face_px": 40})),
    ("centerface auto_levels=False", setting("centerface", {"auto_levels": False})),
    ("mtcnn", setting("mtcnn")),
    ("mtcnn min_face_px=40", setting("mtcnn", {"min_face_px": 40})),
    ("mtcnn mirror_score=False", setting("mtcnn", mirror_score=False)),
    ("mtcnn pyramid_start=0.8", setting("mtcnn", pyramid_start=0.8)),
    ("mtcnn auto_levels=False", setting("mtcnn", {"auto_levels": False})),
    ("mtcnn scale_step=0.709", setting("mtcnn", scale_step=0.709)),
    ("mtcnn scale_step=0.8", setting("mtcnn", scale_step=0.8)),
    ("mtcnn min_score=0.8", setting("mtcnn", min_score=0.8)),
    ("mtcnn min_score=0.9", setting("mtcnn", min_score=0.9)),
    ("mtcnn before", BEFORE),
    (
        "mtcnn before, no auto_levels",
        replace(BEFORE, auto_levels=False, detector=BEFORE.detector.model_copy(update={"scale_step": 0.709})),
    ),
]
COLUMNS = [
    ("recall", "recall"),
    ("precision", "prec"),
    (">=32", "R>=32"),
    ("<32", "R<32"),
    ("32-63", "32-63"),
    ("64-127", "64-127"),
    ("128+", "128+"),
    ("frontal", "front"),
    ("three-quarter", "3/4"),
    ("profile", "prof"),
    ("down", "down"),
]
KIND_COLUMNS = [(f"kind:{k}", k) for k in ft.KINDS if k != "noface"]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def meets(row: dict) -> bool:
    fps = row.get("fps_encode")
    return (
        (row[">=32"] or 0) >= TARGET_RECALL
        and (row["precision"] or 0) >= TARGET_PRECISION
        and fps is not None
        and fps >= TARGET_FPS
    )


def fmt(value: object, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.2f}".rjust(width) if value <= 1.0 else f"{value:.1f}".rjust(width)
    return str(value).rjust(width)


#: (key, heading) of each part's columns in the fit / held-out table.
SPLIT_COLUMNS = [
    ("recall", "recall"),
    (">=32", "R>=32"),
    ("precision", "prec"),
    ("scales_>=32", "xs R>=32"),
    ("scales_precision", "xs prec"),
]
PARTS = (("fit", "fit"), ("held_out", "held"))


def split_figures(truth: dict, searches: list[dict], files: set[str]) -> dict:
    """Recall (all faces and faces >= 32 px) and precision on ``files``: at the frames' own size
    (the first of ``searches``) and summed over every search (each scale), with their counts."""
    own = ft.score(truth, searches[0], frames=files)
    found, faces = own.buckets.get(">=32", (0, 0))
    out = {"frames": len(files), "faces>=32": faces, "found>=32": found, "false": own.false}
    out["recall"], out[">=32"], out["precision"] = own.recall, own.bucket_recall(">=32"), own.precision
    if len(searches) > 1:
        many = ft.summed_score(truth, searches, frames=files)
        out["scales_>=32"], out["scales_precision"] = many.bucket_recall(">=32"), many.precision
    return {k: None if isinstance(v, float) and v != v else v for k, v in out.items()}


def _fps(row: dict, key: str, width: int) -> str:
    return fmt(row.get(key), width) + ("*" if row.get("speed_kept") else "")


def table(rows: list[dict]) -> str:
    """The table as eval_faces.py prints it (and docs/face-detectors.md shows)."""
    label_w = max(len(r["setting"]) for r in rows)
    head = ["setting".ljust(label_w), *(h.rjust(6) for _, h in COLUMNS), "false", "fps", "fps+enc"]
    head += ["xs R>=32", "xs prec", "target"]
    lines = ["  ".join(head)]
    for r in rows:
        cells = [r["setting"].ljust(label_w), *(fmt(r[k], 6) for k, _ in COLUMNS)]
        cells += [fmt(r["false"], 5), _fps(r, "fps_detect", 3), _fps(r, "fps_encode", 7)]
        cells += [fmt(r.get("scales_>=32"), 8), fmt(r.get("scales_precision"), 7)]
        cells.append("MEETS" if meets(r) else "-")
        lines.append("  ".join(cells))
    kept = sorted({r.get("speed_cpu", "?") for r in rows if r.get("speed_kept")})
    if kept:
        lines.append(
            f"*: frames/s kept from the table before (measured on {', '.join(kept)}), not in this run"
        )
    lines.append("")
    lines.append("recall by kind of frame:")
    lines.append("  ".join(["setting".ljust(label_w), *(h.rjust(6) for _, h in KIND_COLUMNS)]))
    for r in rows:
        lines.append("  ".join([r["setting"].ljust(label_w), *(fmt(r[k], 6) for k, _ in KIND_COLUMNS)]))
    split = [r for r in rows if r.get("split")]
    if split:
        fit, held = split[0]["split"]["fit"], split[0]["split"]["held_out"]
        lines.append("")
        lines.append(
            f"fit and held-out (held out: {', '.join(ft.HOLD_OUT)} and the frames made from them; "
            f"{fit['frames']} / {held['frames']} frames, "
            f"{fit['faces>=32']} / {held['faces>=32']} faces >= 32 px):"
        )
        heads = [(part, key, f"{name} {h}") for part, name in PARTS for key, h in SPLIT_COLUMNS]
        lines.append("  ".join(["setting".ljust(label_w), *(h for _, _, h in heads)]))
        for r in split:
            cells = [fmt(r["split"][part].get(key), len(h)) for part, key, h in heads]
            lines.append("  ".join([r["setting"].ljust(label_w), *cells]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated setting labels or detector names to run")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the speed figure")
    ap.add_argument("--speed-repeat", type=int, default=2, help="passes over the 44 frames per speed figure")
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds over every setting; median shown")
    ap.add_argument("--no-speed", action="store_true", help="recall and precision only")
    ap.add_argument(
        "--speed-for",
        default="",
        help="comma-separated setting labels (exact) whose frames/s to measure (default: every row run)",
    )
    ap.add_argument(
        "--keep-speed",
        action="store_true",
        help=f"rows whose frames/s are not measured keep those in face_truth/{ft.RESULTS_FILE} (marked *)",
    )
    ap.add_argument(
        "--scales",
        default=",".join(str(x) for x in ft.SCALES),
        help="also score every frame resized by these (columns 'xs'; '' for none; not for cnn)",
    )
    ap.add_argument("--write", action="store_true", help=f"store the table in face_truth/{ft.RESULTS_FILE}")
    ap.add_argument("--fit-boxes", action="store_true", help="print MediaPipe's box moves onto the truth")
    args = ap.parse_args(argv)
    # The in-process half (recall) on one thread, as stage 03's pool workers run: torch's own
    # threads fighting over two shared cores made MTCNN ten times slower here.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(args)
    finally:
        torch.set_num_threads(threads)


def evaluate(args: argparse.Namespace) -> int:
    """Run the settings ``args`` asks for, print the table (and store it with ``--write``)."""
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    settings = [(lbl, s) for lbl, s in SETTINGS if not wanted or lbl in wanted or s.detector_name in wanted]
    if not settings:
        print(
            f"error: --only names no setting; labels: {', '.join(lbl for lbl, _ in SETTINGS)}",
            file=sys.stderr,
        )
        return 2
    speed_for = {w.strip() for w in args.speed_for.split(",") if w.strip()}
    if unknown := speed_for - {lbl for lbl, _ in settings}:
        print(f"error: --speed-for names no setting run: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    timed = set() if args.no_speed else speed_for or {lbl for lbl, _ in settings}
    doc = ft.read_results() if args.keep_speed else None
    run = {lbl for lbl, _ in settings} - timed
    elsewhere = {speed_cpu(r, doc) for r in (doc or {}).get("rows", []) if r["setting"] in run}
    if timed and elsewhere - {cpu_summary()}:
        print(
            f"error: the stored frames/s were measured on {', '.join(sorted(elsewhere))}, this is "
            f"{cpu_summary()}: one table would mix them (measure every row, or none with --no-speed)",
            file=sys.stderr,
        )
        return 2
    truth = ft.load_truth()
    scales = tuple(float(x) for x in args.scales.split(",") if x.strip())
    fit_files, held = ft.held_out_files(truth)
    print(
        f"face truth set: {len(truth['frames'])} frames ({len(held)} held out: {', '.join(ft.HOLD_OUT)} "
        f"and the frames made from them); "
        f"load average at start: {load()} ({os.cpu_count()} cores: {cpu_summary()})"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval_faces_") as tmp:
        paths = ft.write_720p(Path(tmp), truth) if not args.no_speed else []
        for label, s in settings:
            started = time.perf_counter()
            found = ft.detect_truth(s, truth)
            if args.fit_boxes and s.detector_name == "mediapipe":
                print(
                    f"{label}: box moves onto the truth (fit frames): "
                    f"{ft.box_offsets(truth, found, fit_files)}"
                )
            row = {"setting": label, "settings": s.as_json(), **ft.summary_row(ft.score(truth, found))}
            searches = [found]
            if scales and s.detector_name != "cnn":  # dlib's CNN: a second a frame, too slow five times
                searches += [ft.detect_truth(s, truth, scale=x) for x in scales]
                many = ft.summed_score(truth, searches)
                row["scales_>=32"], row["scales_precision"] = many.bucket_recall(">=32"), many.precision
            row["split"] = {
                "fit": split_figures(truth, searches, fit_files),
                "held_out": split_figures(truth, searches, held),
            }
            # What the figures were scored from (at the frames' own size): the tests score it again.
            row["detections"] = {
                file: [[round(v, 2) for v in box[:4]] + [round(box[4], 4)] for box in boxes]
                for file, boxes in found.items()
            }
            rows.append(row)
            print(f"  {label}: {time.perf_counter() - started:.0f} s (load {load()})", flush=True)
        if args.keep_speed:
            keep_speed(rows, timed)
        measured = [(r, st) for r, st in zip(rows, settings, strict=True) if r["setting"] in timed]
        if measured:
            measure_speed([r for r, _ in measured], [st for _, st in measured], paths, args)
    print()
    print(table(rows))
    # Say how frames/s were measured only when this run measured them (--no-speed measures none).
    footer = f"\nload average at end: {load()}"
    if measured:
        footer += (
            f"; fps: frames/s of 1280x720 JPEGs on {args.workers} worker processes, "
            f"median of {args.rounds} rounds"
        )
    elif any(r.get("speed_kept") for r in rows):
        footer += "; fps: kept from the stored table (not measured in this run)"
    print(footer)
    if args.write:
        out = ft.truth_dir() / ft.RESULTS_FILE
        doc = {
            "about": (
                "python_script/eval_faces.py --write: stage 03's detectors on the face truth set. "
                "Each row: its figures over every frame, 'split' (the fit and held-out parts apart), "
                "'detections' (file: [left, top, right, bottom, score] at the frames' own size, what "
                "the figures were scored from), frames/s with the CPU they were measured on."
            ),
            "workers": args.workers,
            "speed_rounds": args.rounds,
            "cpu_count": os.cpu_count(),
            "cpu": cpu_summary(),
            "targets": {"recall>=32": TARGET_RECALL, "precision": TARGET_PRECISION, "fps": TARGET_FPS},
            "rows": rows,
            "table": table(rows),
        }
        out.write_text(dump(doc))
        print(f"written: {out}")
    return 0


def speed_cpu(row: dict, doc: dict | None) -> str:
    """The CPU a stored row's frames/s were measured on."""
    return row.get("speed_cpu") or (doc or {}).get("cpu", "?")


def dump(doc: dict) -> str:
    """``doc`` as indented JSON with every list of numbers, and every list of such lists (a
    frame's boxes), on one line: one line per frame's detections instead of one per number."""
    text = json.dumps(doc, indent=1)
    numbers = r"\[\s*([-\d.e+]+(?:,\s*[-\d.e+]+)*)\s*\]"
    text = re.sub(numbers, lambda m: f"[{', '.join(x.strip() for x in m[1].split(','))}]", text)
    lists = r"\[\s*(\[[^\[\]]*\](?:,\s*\[[^\[\]]*\])*)\s*\]"
    text = re.sub(lists, lambda m: f"[{' '.join(m[1].split())}]", text)
    return text + "\n"


def keep_speed(rows: list[dict], measured: set[str]) -> None:
    """The rows not in ``measured`` take their frames/s (rounds, and the CPU they were measured
    on) from the stored table, where it holds the same setting with the same settings; they are
    marked ``speed_kept``."""
    doc = ft.read_results()
    stored = {r["setting"]: r for r in (doc or {}).get("rows", [])}
    for row in rows:
        old = stored.get(row["setting"])
        same = old is not None and old.get("settings") == json.loads(json.dumps(row["settings"]))
        if row["setting"] in measured or not same or old.get("fps_encode") is None:
            continue
        for key in ("fps_rounds", "fps_detect", "fps_encode"):
            row[key] = old[key]
        row["speed_cpu"], row["speed_kept"] = speed_cpu(old, doc), True


def measure_speed(rows: list[dict], settings: list, paths: list[Path], args: argparse.Namespace) -> None:
    """``fps_detect`` and ``fps_encode`` of every row: the median over ``args.rounds`` rounds, each
    of which measures every setting in turn (so a slow minute of a shared machine lowers one
    round of every setting, not every round of one), with each round's figures and load kept."""
    for row in rows:
        row["fps_rounds"] = []
    rounds = max(1, args.rounds)
    for r in range(rounds):
        for row, (_, s) in zip(rows, settings, strict=True):
            # dlib's CNN takes about a second a frame on one core: fewer frames for it.
            sample = paths[:12] if s.detector_name == "cnn" else paths
            repeat = 1 if s.detector_name == "cnn" else args.speed_repeat
            detect = ft.frames_per_second(s, sample, workers=args.workers, encode=False, repeat=repeat)
            encode = ft.frames_per_second(s, sample, workers=args.workers, repeat=repeat)
            row["fps_rounds"].append({"fps": round(detect, 1), "fps+enc": round(encode, 1), "load": load()})
        print(f"  speed round {r + 1} of {rounds} (load {load()})", flush=True)
    for row in rows:
        row["speed_cpu"] = cpu_summary()
        row["fps_detect"] = round(statistics.median(x["fps"] for x in row["fps_rounds"]), 1)
        row["fps_encode"] = round(statistics.median(x["fps+enc"] for x in row["fps_rounds"]), 1)


if __name__ == "__main__":
    sys.exit(main())
