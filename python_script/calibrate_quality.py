"""Calibrate and check stage 02's exposure rules and text rules on real pictures.

Two parts, each printing what it measured (run one with ``--part``):

``brightness``: the relative brightness rules (``quality.relative_brightness``, ``reference_
brightness``, ``black_floor``, ``white_ceiling``) on three real sources: frames of the Hamilton
clip, the knn photos (``../shared/testdata``) and the demo movie's frames, each as it is, graded
dark (a "dark film": gain and gamma) and graded bright (a "bright film"). Every film gets black
frames (its own frames faded to 2-4 %) and white flashes (faded to white) that must go, and the
graded content frames must stay. Settings are fitted on Hamilton and knn; the demo movie is held
out.

``text``: the text rules (``max_text_share``, ``max_text_area``, ``subtitle_band``) on the same
real pictures with text drawn by :mod:`diffusion_bunny.demo.overlays` (title cards on black and on
colour, credits lists, burned-in white and yellow subtitles with an outline, signs in the scene)
and on the text-free originals for false positives. Fonts, sizes and positions vary; two fonts
(STIX and Pillow's own) and the demo movie are held out. It prints precision and recall of each
rule, and the detector's time per frame at 720p and 1080p at ``--text-width``.

    uv run python python_script/calibrate_quality.py --part brightness
    uv run python python_script/calibrate_quality.py --part text [--text-width 480]
    uv run python python_script/calibrate_quality.py --part night [--seeds 0,1,2,3] [--minutes 3]

``night``: the sharpness and exposure rules on night-graded real footage: the looped Hamilton
movies of :mod:`diffusion_bunny.demo.realclips` (640x360, ``--minutes`` long, one per seed), each
as graded and night-graded (:func:`~diffusion_bunny.demo.realclips.night_grade`: mean luma ~24, a
third of the contrast, noise, a blue tint). Stage 01 runs on each as a user runs it (its run
folder is kept under ``--work`` and reused); stage 02's scores are computed once per movie and
the rules applied with the relative rules off and with the defaults. Printed per movie: the share
of its true shots (``.cuts.json``) with a kept frame, and the frames dropped per reason. Every
repeat of a loop is the same four shots graded anew, so a rule that loses a kind of shot loses it
on every seed; the last seed is held out (not looked at while choosing the settings).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from diffusion_bunny.stages.quality.rules import apply_quality_rules
from diffusion_bunny.stages.quality.scores import score_gray
from diffusion_bunny.stages.quality.settings import QualitySettings

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata" / "face_recognition_examples"


# ------------------------------------------------------------------------------ real pictures


def hamilton_frames(step: int = 3) -> list[np.ndarray]:
    """Every ``step``-th frame of the Hamilton clip (640x360 BGR)."""
    cap = cv2.VideoCapture(str(TESTDATA / "short_hamilton_clip.mp4"))
    out, i = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % step == 0:
            out.append(frame)
        i += 1
    cap.release()
    return out


def knn_photos() -> list[np.ndarray]:
    """Every photo of the face_recognition examples, brought to at most 1280 px wide (BGR)."""
    out = []
    for path in sorted(TESTDATA.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        img = cv2.imread(str(path))
        if img is None:
            continue
        if img.shape[1] > 1280:
            img = cv2.resize(
                img, (1280, round(img.shape[0] * 1280 / img.shape[1])), interpolation=cv2.INTER_AREA
            )
        out.append(img)
    return out


def demo_frames(per_shot: int = 4) -> tuple[list[np.ndarray], list[bool]]:
    """``per_shot`` frames of every shot of the demo movie (BGR), and whether each comes from a
    shot made bad on purpose (the dark and the blurred shot)."""
    from diffusion_bunny.demo.movie import RECIPE, render_shot

    frames, bad = [], []
    for shot_id, spec in enumerate(RECIPE):
        picks = set(np.linspace(0, spec.n_frames - 1, per_shot).round().astype(int).tolist())
        for i, rgb in enumerate(render_shot(spec, shot_id)):
            if i in picks:
                frames.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                bad.append(spec.dark or spec.blurred)
    return frames, bad


def grade(img: np.ndarray, gain: float, gamma: float) -> np.ndarray:
    """A film graded darker (gain < 1, gamma > 1) or brighter (gain > 1, gamma < 1)."""
    lut = np.clip(255.0 * gain * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


def jpeg(img: np.ndarray, quality: int = 95) -> np.ndarray:
    """The picture as stage 01 saves it (a quality-95 JPEG), decoded again."""
    _ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


# --------------------------------------------------------------------------------- brightness

GRADES = {"as shot": (1.0, 1.0), "dark film": (0.42, 1.35), "bright film": (1.0, 0.45)}


def _film_scores(content: list[np.ndarray], rng: np.random.Generator) -> tuple[pl.DataFrame, list[str]]:
    """Scores of a film: its content frames, plus black frames and white flashes made from every
    fifth of them (fades to 2-4 % of the picture; truth ``black`` / ``white``)."""
    pictures, truth = [], []
    for i, img in enumerate(content):
        pictures.append(img)
        truth.append("content")
        if i % 5 == 0:
            fade = rng.uniform(0.02, 0.04)
            pictures.append(cv2.convertScaleAbs(img, alpha=fade))
            truth.append("black")
            pictures.append(255 - cv2.convertScaleAbs(255 - img, alpha=fade))
            truth.append("white")
    rows = []
    for i, img in enumerate(pictures):
        gray = cv2.cvtColor(jpeg(img), cv2.COLOR_BGR2GRAY)
        rows.append({"frame_id": f"f{i:05d}", "readable": True, **score_gray(gray), "nearest_distance": None})
    table = pl.DataFrame(rows).with_columns(pl.col("phash").cast(pl.UInt64))
    return table, truth


def _judge(table: pl.DataFrame, truth: list[str], cfg: QualitySettings) -> dict[str, float]:
    frames = table.select("frame_id", pl.int_range(pl.len()).alias("frame_index"), pl.lit(0).alias("shot_id"))
    # Only the exposure rules are judged here: blur and duplicates are other rules' business.
    loose = cfg.model_copy(update={"min_sharpness": 0.0, "dup_distance": 0})
    out = apply_quality_rules(table, frames, loose)
    reason = out["reject_reason"].to_list()
    exposure = {"too_dark", "too_bright", "clipped"}
    t = np.array(truth)
    dropped = np.array([r in exposure for r in reason])
    return {
        "content kept": float((~dropped[t == "content"]).mean()),
        "black dropped": float(dropped[t == "black"].mean()),
        "white dropped": float(dropped[t == "white"].mean()),
        "median": float(np.median(table["brightness"].to_numpy()[t == "content"])),
    }


def part_brightness() -> None:
    rng = np.random.default_rng(0)
    demo, demo_bad = demo_frames()
    sources = {
        "hamilton": hamilton_frames(3),
        "knn photos": knn_photos(),
        "demo (held out)": [f for f, b in zip(demo, demo_bad, strict=True) if not b],
    }
    films = {}
    for (name, frames), (grade_name, (gain, gamma)) in itertools.product(sources.items(), GRADES.items()):
        content = [grade(f, gain, gamma) for f in frames]
        films[(name, grade_name)] = _film_scores(content, rng)
    print(f"{'source':18s} {'grade':12s} {'median':>6s}  content frames' brightness p5-p50-p95")
    for (name, grade_name), (table, truth) in films.items():
        b = table["brightness"].to_numpy()[np.array(truth) == "content"]
        c = table["clipped"].to_numpy()[np.array(truth) == "content"]
        print(
            f"{name:18s} {grade_name:12s} {np.median(b):6.1f}  "
            f"{np.percentile(b, 5):5.1f} {np.percentile(b, 50):5.1f} {np.percentile(b, 95):5.1f}"
            f"   clipped p50 {np.median(c):.2f} p95 {np.percentile(c, 95):.2f} max {c.max():.2f}"
        )

    def score(cfg: QualitySettings, names: list[str]) -> tuple[float, dict]:
        per = {k: _judge(*films[k], cfg) for k in films if k[0] in names}
        worst = min(min(v["content kept"], v["black dropped"], v["white dropped"]) for v in per.values())
        mean = np.mean(
            [(v["content kept"] + v["black dropped"] + v["white dropped"]) / 3 for v in per.values()]
        )
        return worst + mean, per

    fit = ["hamilton", "knn photos"]
    candidates = [
        QualitySettings(
            relative_brightness=rel, reference_brightness=ref, black_floor=floor, white_ceiling=ceil
        )
        for rel in (True,)
        for ref in (80.0, 90.0, 100.0, 110.0, 120.0)
        for floor in (8.0, 10.0, 12.0, 15.0)
        for ceil in (240.0, 245.0, 250.0)
    ]
    ranked = sorted(candidates, key=lambda c: -score(c, fit)[0])
    best = ranked[0]
    print(
        f"\nbest on {', '.join(fit)}: reference_brightness {best.reference_brightness}, black_floor "
        f"{best.black_floor}, white_ceiling {best.white_ceiling}"
    )
    chosen = QualitySettings()
    for label, cfg in (
        ("absolute (relative_brightness: false)", QualitySettings(relative_brightness=False)),
        ("best fitted", best),
        ("defaults (config/main.yaml)", chosen),
    ):
        _, per = score(cfg, list(sources))
        print(f"\n{label}")
        head = f"{'content kept':>12s} {'black dropped':>13s} {'white dropped':>13s}"
        print(f"  {'source':18s} {'grade':12s} {head}")
        for (name, grade_name), v in per.items():
            print(
                f"  {name:18s} {grade_name:12s} {v['content kept']:12.3f} {v['black dropped']:13.3f} "
                f"{v['white dropped']:13.3f}"
            )


# -------------------------------------------------------------------------------------- night


def night_runs(seeds: list[int], minutes: float, work: Path) -> list[tuple[str, Path, Path]]:
    """``(label, movie, run folder)`` for each seed's loop, graded and night-graded, with stage 01
    done (reused when its run folder exists)."""
    from diffusion_bunny.config import load_config
    from diffusion_bunny.demo import realclips
    from diffusion_bunny.pipeline.run import Run
    from diffusion_bunny.stages import run_stage

    cfg = load_config(None, {}, use_local=False)
    out = []
    for seed in seeds:
        role = "held out" if seed == seeds[-1] else "fit"
        for night in (False, True):
            params = realclips.Params(minutes=minutes, width=640, height=360, seed=seed, night=night)
            movie = realclips.make_movie(params, work)
            folder = work / "runs" / movie.stem / "run"
            if not (folder / "tables" / "frames.parquet").is_file():
                print(f"stage 01 on {movie.name} ...", flush=True)
                run = Run.create(folder, movie) if not folder.exists() else Run.open(folder)
                run_stage(run, "extract", cfg, progress=False)
            label = f"seed {seed} ({role}) {'night' if night else 'graded'}"
            out.append((label, movie, folder))
    return out


def night_scores(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The run's frames table and stage 02's scores of them (computed once, kept beside them)."""
    from diffusion_bunny.stages.quality.scores import score_frames

    frames = pl.read_parquet(folder / "tables" / "frames.parquet", glob=False)
    cached = folder / "night_scores.parquet"
    if cached.is_file():
        return frames, pl.read_parquet(cached, glob=False)
    scores = score_frames(folder, frames, progress=False)
    scores.write_parquet(cached)
    return frames, scores


def shots_kept(movie: Path, frames: pl.DataFrame, table: pl.DataFrame) -> tuple[int, int]:
    """``(true shots with a kept frame, true shots)``: the movie's truth (``.cuts.json``), not
    stage 01's shots, so a missed cut does not hide a shot."""
    import bisect
    import json

    cuts = json.loads(movie.with_suffix(".cuts.json").read_text())["cuts"]
    kept = table.filter(pl.col("keep")).join(frames.select("frame_id", "frame_index"), on="frame_id")
    shots = {bisect.bisect_right(cuts, int(i)) for i in kept["frame_index"]}
    return len(shots), len(cuts) + 1


def part_night(seeds: list[int], minutes: float, work: Path) -> None:
    from diffusion_bunny.stages.quality.rules import reason_counts

    settings = {
        "absolute": QualitySettings(text_filter=False, relative_sharpness=False, relative_brightness=False),
        "film brightness only": QualitySettings(text_filter=False, relative_sharpness=False),
        "defaults": QualitySettings(text_filter=False),
    }
    runs = night_runs(seeds, minutes, work)
    for name, cfg in settings.items():
        print(f"\n{name}")
        for label, movie, folder in runs:
            frames, scores = night_scores(folder)
            table = apply_quality_rules(scores, frames, cfg)
            got, total = shots_kept(movie, frames, table)
            counts = {k: v for k, v in reason_counts(table).items() if k != "kept"}
            print(
                f"  {label:28s} shots with a kept frame {got:3d}/{total:3d} ({got / total:.3f}); "
                f"frames {table.height}, kept {int(table['keep'].sum())}, dropped {counts}"
            )


# --------------------------------------------------------------------------------------- text

FIT_FONTS = ("sans", "sans-bold", "serif", "serif-bold", "mono", "sans-oblique")
HELD_FONTS = ("stix", "stix-bold", "pillow", "cm-serif")


def text_cases(picture_rgb: np.ndarray, rng: np.random.Generator, fonts: tuple[str, ...]) -> list[dict]:
    """The text cases drawn on one picture (RGB, 1280x720): each with its truth (``none``,
    ``sign``, ``subtitles``, ``text``), what was drawn, and the subtitle box where there is one."""
    from diffusion_bunny.demo import overlays as ov

    size = (picture_rgb.shape[1], picture_rgb.shape[0])
    h = size[1]
    f = lambda: str(rng.choice(fonts))  # noqa: E731
    cases = [{"truth": "none", "what": "original", "rgb": picture_rgb}]
    for _ in range(2):
        img, _box = ov.sign(
            picture_rgb,
            str(rng.choice(ov.SIGNS)),
            centre=(float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.15, 0.85))),
            height_share=float(rng.uniform(0.04, 0.1)),
            panel=tuple(int(c) for c in rng.integers(0, 160, 3)),
            font_name=f(),
        )
        cases.append({"truth": "sign", "what": "sign", "rgb": img})
    for colour_name, colour in (("white", ov.WHITE), ("yellow", ov.YELLOW)):
        n_lines = int(rng.integers(1, 3))
        lines = [str(x) for x in rng.choice(ov.DIALOGUE, n_lines, replace=False)]
        divisor = float(rng.uniform(18, 30))
        position = "top" if rng.uniform() < 0.2 else "bottom"
        img, box = ov.subtitle(
            picture_rgb, lines, colour=colour, position=position, font_name=f(), font_size=round(h / divisor)
        )
        cases.append(
            {
                "truth": "subtitles",
                "what": f"{colour_name} subtitle 1/{divisor:.0f} {position} x{n_lines}",
                "rgb": img,
                "box": box,
                "position": position,
                "divisor": divisor,
            }
        )
    background = tuple(int(c) for c in rng.integers(0, 200, 3))
    img, _ = ov.title(size, ("THE LONG NIGHT",), font_name=f(), font_size=round(h / rng.uniform(7, 14)))
    cases.append({"truth": "text", "what": "title on black", "rgb": img})
    grad = ov.gradient(size, background, tuple(int(c) for c in rng.integers(0, 200, 3)))
    img, _ = ov.title(
        size,
        ("A FILM BY", "ADA LINDQVIST"),
        background=grad,
        font_name=f(),
        font_size=round(h / rng.uniform(9, 16)),
    )
    cases.append({"truth": "text", "what": "title on colour", "rgb": img})
    bg = ov.BLACK if rng.uniform() < 0.5 else background
    img, _ = ov.credits_list(size, offset=float(rng.uniform(0, 0.6)), background=bg, font_name=f())
    cases.append({"truth": "text", "what": "credits", "rgb": img})
    img, _ = ov.page(size, font_name=f())
    cases.append({"truth": "text", "what": "page", "rgb": img})
    return cases


def _prf(pred: np.ndarray, truth: np.ndarray) -> str:
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return f"precision {precision:.3f} recall {recall:.3f} (tp {tp}, fp {fp}, fn {fn})"


def part_text(text_width: int | None, dump: Path | None = None) -> None:
    from diffusion_bunny.models.text import load_text_detector
    from diffusion_bunny.stages.quality.text import measure_text, text_verdict

    detector = load_text_detector()
    rng = np.random.default_rng(1)
    demo, demo_bad = demo_frames(2)
    sources = {
        "hamilton": hamilton_frames(15),
        "knn photos": knn_photos(),
        "demo": [f for f, b in zip(demo, demo_bad, strict=True) if not b],
    }
    cases = []
    for name, pictures in sources.items():
        for pic in pictures:
            rgb = cv2.cvtColor(cv2.resize(pic, (1280, 720), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
            for held in (False, True):
                fonts = HELD_FONTS if held else FIT_FONTS
                if name == "knn photos" and held:
                    continue  # the photos are few: every one once, with the fitting fonts
                for case in text_cases(rgb, rng, fonts):
                    cases.append({**case, "source": name, "held_font": held})
    print(f"{len(cases)} cases on {sum(len(v) for v in sources.values())} real pictures")
    widths = [text_width] if text_width else [320, 480, 640]
    for width in widths:
        started = time.process_time()
        for case in cases:
            bgr = jpeg(cv2.cvtColor(case["rgb"], cv2.COLOR_RGB2BGR))
            case[f"lines{width}"] = measure_text(bgr, detector, width)["text_lines"]
        cpu = time.process_time() - started
        print(f"text_width {width}: {1000 * cpu / len(cases):.1f} CPU ms per picture (detector + edges)")

    if dump is not None:
        keep = [k for k in cases[0] if k not in ("rgb",)]
        rows = [{k: c.get(k) for k in keep + [f"lines{w}" for w in widths] if k != "box"} for c in cases]
        pl.DataFrame(rows).write_parquet(dump)
        print(f"cases written to {dump}")
    truth = np.array([c["truth"] for c in cases])
    fit = np.array([c["source"] in ("hamilton", "knn photos") and not c["held_font"] for c in cases])

    def verdicts(width: int, cfg: QualitySettings) -> tuple[np.ndarray, np.ndarray, list]:
        out = [text_verdict(c[f"lines{width}"], cfg, 1280 / 720) for c in cases]
        reason = np.array([o[0] or "none" for o in out])
        cropped = np.array([o[0] is None and (o[1] > 0 or o[2] < 1) for o in out])
        return reason, cropped, out

    base = QualitySettings(subtitles="crop")
    for width in widths:
        reason, cropped, _ = verdicts(width, base)
        sub_found = (reason == "subtitles") | cropped
        print(f"\ntext_width {width}, defaults; subtitle recall by size (height / font size):")
        for lo, hi in ((18, 22), (22, 26), (26, 30)):
            sel = np.array([c["truth"] == "subtitles" and lo <= c.get("divisor", 0) < hi for c in cases])
            print(f"  1/{lo}-1/{hi}: {sub_found[sel].mean():.3f} of {int(sel.sum())}")
    width = text_width if text_width else widths[len(widths) // 2]
    grid = [
        base.model_copy(update={"max_text_share": share, "max_text_area": area, "subtitle_band": band})
        for share in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        for area in (0.1, 0.15, 0.2, 0.3)
        for band in (0.2, 0.25, 0.3)
    ]

    def f1(cfg: QualitySettings, mask: np.ndarray) -> float:
        reason, cropped, _ = verdicts(width, cfg)
        score = 0.0
        for pred, pos in (
            (reason == "text", truth == "text"),
            ((reason == "subtitles") | cropped, truth == "subtitles"),
        ):
            tp = (pred & pos & mask).sum()
            score += 2 * tp / max(1, (pred & mask).sum() + (pos & mask).sum())
        return score

    best = max(grid, key=lambda c: f1(c, fit))
    print(
        f"\nbest on the fitting set at text_width {width}: max_text_share {best.max_text_share}, "
        f"max_text_area {best.max_text_area}, subtitle_band {best.subtitle_band}"
    )
    for label, cfg in (("fitted", best), ("defaults (config/main.yaml)", base)):
        reason, cropped, out = verdicts(width, cfg)
        sub_pred = (reason == "subtitles") | cropped
        print(f"\n{label} at text_width {width}:")
        for part, mask in (("fitting set", fit), ("held out (demo movie, other fonts)", ~fit)):
            print(f"  {part}: {int(mask.sum())} cases")
            print(f"    rule text:      {_prf((reason == 'text')[mask], (truth == 'text')[mask])}")
            print(f"    rule subtitles: {_prf(sub_pred[mask], (truth == 'subtitles')[mask])}")
            for kind in ("none", "sign", "subtitles", "text"):
                sel = mask & (truth == kind)
                got = {r: int(((reason == r) & sel).sum()) for r in ("text", "subtitles")}
                got["cropped"] = int((cropped & sel).sum())
                print(f"    truth {kind:9s} {int(sel.sum()):4d}: {got}")
        # A crop must leave the drawn subtitle out and keep most of the picture.
        good = kept = n = 0
        for case, (r, top, bottom) in zip(cases, out, strict=True):
            if case["truth"] != "subtitles" or r is not None or (top == 0 and bottom == 1):
                continue
            n += 1
            box = case["box"]
            if case["position"] == "bottom":
                good += bottom * 720 <= box[1] + 1
            else:
                good += top * 720 >= box[3] - 1
            kept += bottom - top
        if n:
            print(f"  crops: {good}/{n} leave the whole subtitle out; mean height kept {kept / n:.2f}")
        for case, r in zip(cases, reason, strict=True):
            false_text = case["truth"] in ("none", "sign") and r == "text"
            if false_text or (case["truth"] == "text" and r != "text"):
                print(f"    miss: {case['source']} {case['what']} -> {r}")


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("brightness", "text", "night"), required=True)
    parser.add_argument("--seeds", default="0,1,2,3", help="night: one looped movie per seed (last held out)")
    parser.add_argument("--minutes", type=float, default=3.0, help="night: length of the looped movies")
    parser.add_argument(
        "--work", type=Path, default=ROOT / "data" / "real", help="night: movies, run folders"
    )
    parser.add_argument("--text-width", type=int, default=None)
    parser.add_argument("--dump", type=Path, default=None, help="write the text cases' lines to this parquet")
    args = parser.parse_args(argv)
    if not TESTDATA.is_dir():
        print(f"needs the real pictures in {TESTDATA}")
        return 2
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    started = time.perf_counter()
    if args.part == "brightness":
        part_brightness()
    elif args.part == "night":
        part_night([int(x) for x in args.seeds.split(",")], args.minutes, args.work)
    else:
        part_text(args.text_width, args.dump)
    print(f"\n{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
