"""What stage 08's drawn score says: the detector stage 03 fitted to a source's characters, run on
pictures of them as a LoRA would draw them, on the character truth set.

Stage 08 scores a generated picture of a drawn character with the detector stage 03 fitted to that
character's pictures (:mod:`diffusion_bunny.stages.generate.drawn`). No LoRA trained here draws a
character (the CPU presets have random weights), so the film's own pictures of the characters stand
in for what a LoRA that learned them would draw: every ``--step``-th frame of each source's film, each
truth appearance cut out as a square around its body box (15% margin, the square mostly inside the
frame, 48 px a side or more) and scaled to 512 px, as a "full body" picture is drawn. Per source:

- how many of them the score names as their own character (score >= ``characters.fitted.min_score``)
  and their mean score;
- how often their own character has the highest score of all the source's characters;
- how often another character of the source reaches the score on them;
- random squares of the frames with no appearance on them that reach it for any character.

It reads the detectors ``eval_characters.py`` left in ``data/eval_characters/<source>`` (run that
first); a source without one is named and skipped.

    uv run python python_script/eval_characters.py            # fits the detectors (once)
    uv run python python_script/eval_drawn_score.py          # every source
    uv run python python_script/eval_drawn_score.py --sources flare,supertux --step 4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

from diffusion_bunny.demo.character_truth import truth_dir
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages.generate.drawn import DrawnScorer, load_drawn_scorer, stage03_characters

#: Side of the square pictures scored (a generated picture's size).
SIDE = 512
#: Margin around a body box, and the least side of a square worth scoring.
MARGIN, LEAST = 1.15, 48


def sampled_frames(film: Path, step: int) -> Iterator[tuple[int, np.ndarray]]:
    with av.open(str(film)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % step == 0:
                yield index, frame.to_ndarray(format="rgb24")


def square(image: np.ndarray, box: list[int]) -> np.ndarray | None:
    """The square around ``box`` (with :data:`MARGIN`) at :data:`SIDE` px, or None when it is too
    small or mostly outside the frame."""
    left, top, right, bottom = box
    side = int(max(right - left, bottom - top) * MARGIN)
    if side < LEAST:
        return None
    x0, y0 = max(0, (left + right - side) // 2), max(0, (top + bottom - side) // 2)
    crop = image[y0 : y0 + side, x0 : x0 + side]
    if min(crop.shape[:2]) < 0.6 * side:
        return None
    return cv2.resize(np.ascontiguousarray(crop), (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def _apart(box: list[int], x0: int, y0: int, side: int) -> bool:
    return box[2] < x0 or box[0] > x0 + side or box[3] < y0 or box[1] > y0 + side


def score_source(source: dict, scorer: DrawnScorer, step: int, rng: np.random.Generator) -> dict:
    """The figures of the module docstring for one source."""
    by_frame: dict[int, list[dict]] = {}
    for a in source["appearances"]:
        by_frame.setdefault(a["frame"], []).append(a)
    height, width = source["height"], source["width"]
    threshold = scorer.min_score
    own: list[float] = []
    top = other = other_n = background = background_n = 0
    for index, image in sampled_frames(truth_dir() / source["film"], step):
        for a in by_frame.get(index, []):
            picture = square(image, a["body"])
            if picture is None or a["character"] not in scorer.names:
                continue
            scores = {name: scorer.score(picture, name) or 0.0 for name in scorer.names}
            own.append(scores[a["character"]])
            top += max(scores, key=scores.__getitem__) == a["character"]
            rest = [v for name, v in scores.items() if name != a["character"]]
            other += sum(v >= threshold for v in rest)
            other_n += len(rest)
        for _ in range(2):
            side = int(rng.integers(120, min(height, width)))
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            if all(_apart(a["body"], x0, y0, side) for a in by_frame.get(index, [])):
                piece = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
                picture = cv2.resize(piece, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
                background += sum((scorer.score(picture, name) or 0.0) >= threshold for name in scorer.names)
                background_n += len(scorer.names)
    found = sum(v >= threshold for v in own)
    return {
        "source": source["name"],
        "split": source["split"],
        "kind": source["kind"],
        "pictures": len(own),
        "own_found": found,
        "own_mean_score": round(float(np.mean(own)), 3) if own else None,
        "own_highest": top,
        "other_found": other,
        "other_scored": other_n,
        "background_found": background,
        "background_scored": background_n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", help="comma-separated source names (default: all)")
    parser.add_argument("--step", type=int, default=8, help="score every N-th frame (default 8)")
    args = parser.parse_args()
    truth = json.loads((truth_dir() / "truth.json").read_text())
    names = [source["name"] for source in truth["sources"]]
    wanted = {name for name in args.sources.split(",") if name} if args.sources else None
    if wanted and (unknown := sorted(wanted - set(names))):
        # A mistyped name would otherwise score nothing and exit 0, as if all went well.
        parser.error(f"--sources: no source {', '.join(unknown)} (choose from {', '.join(names)})")
    rng = np.random.default_rng(0)
    for source in truth["sources"]:
        if wanted and source["name"] not in wanted:
            continue
        folder = workspace_root() / "data" / "eval_characters" / source["name"]
        if not (folder / "run.json").is_file():
            print(f"{source['name']}: no run in {folder}; run python_script/eval_characters.py first")
            continue
        run = Run.open(folder)
        names = [c["name"] for c in source["characters"]]
        seen = stage03_characters(run.read_manifest("characters"), folder)
        scorer, warnings = load_drawn_scorer(seen, names)
        if scorer is None:
            print(f"{source['name']}: {'; '.join(warnings) or 'no drawn character'}")
            continue
        r = score_source(source, scorer, args.step, rng)
        n = max(r["pictures"], 1)
        print(
            f"{r['source']:16s} {r['split']:8s} {r['kind']:15s} {r['pictures']} pictures: own found "
            f"{r['own_found']} ({r['own_found'] / n:.2f}), mean score {r['own_mean_score']}, highest of all "
            f"{r['own_highest']} ({r['own_highest'] / n:.2f}); another character found {r['other_found']} of "
            f"{r['other_scored']}; background found {r['background_found']} of {r['background_scored']}"
        )


if __name__ == "__main__":
    main()
