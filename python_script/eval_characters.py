"""Stage 03 on the character truth set: every source's film through stages 01-03 with its
references, scored per kind of character.

For each source of ``test/stages/characters/data/character_truth`` (drawn people, cartoon animals,
3D-rendered creatures; docs/character-truth.md), the film runs through ``extract``, ``quality`` and
``characters`` in a run folder of its own, with ``characters.reference_dir`` set to the source's
reference pictures, and the named appearances of the ``faces`` table are scored
(:func:`diffusion_bunny.demo.character_truth.score_named`): (shot, character) recall and precision
of named appearances, per kind and overall, and stage 03's speed (frames searched per second,
seconds spent fitting the detector). Sources are reported by split: the ``fit`` sources were
used to choose settings, the ``held_out`` ones never were.

    uv run python python_script/eval_characters.py                 # every source
    uv run python python_script/eval_characters.py --split fit     # the fit sources only
    uv run python python_script/eval_characters.py --sources flare --set characters.fitted.steps=400

Run folders are kept under ``data/eval_characters/<source>`` (stages 01-02 are reused on a rerun;
``--force`` redoes stage 03). ``--write`` stores the table in the truth folder
(``eval_results.json``) for docs/character-truth.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusion_bunny.config import load_config, parse_override
from diffusion_bunny.demo.character_truth import KINDS, load_character_truth, score_named, truth_dir
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage


def run_source(source: dict, folder: Path, overrides: dict, force: bool) -> dict:
    """One source through stages 01-03; its scores and stage 03's speed."""
    root = truth_dir()
    movie = root / source["film"]
    run_dir = workspace_root() / "data" / "eval_characters" / source["name"]
    run = Run.open(run_dir) if (run_dir / "run.json").is_file() else Run.create(run_dir, movie)
    cfg = load_config(
        overrides={**overrides, "characters.reference_dir": str(folder / "refs" / source["name"])}
    )
    for stage in ("extract", "quality"):
        run_stage(run, stage, cfg, progress=False)
    started = time.perf_counter()
    run_stage(run, "characters", cfg, progress=True, force=force)
    seconds = time.perf_counter() - started
    faces = run.read_table("faces")
    predictions = [
        {
            "frame": r["frame_index"],
            "character": r["character"],
            "box": (r["left"], r["top"], r["right"], r["bottom"]),
        }
        for r in faces.iter_rows(named=True)
    ]
    scores = score_named(predictions, source)
    facts = run.read_manifest("characters")["facts"]
    return {
        "source": source["name"],
        "split": source["split"],
        "kind": source["kind"],
        "scores": scores,
        "frames_searched": run.read_manifest("characters")["counts"]["frames_scanned"],
        "stage_seconds": round(seconds, 1),
        "fit_seconds": (facts.get("fitted") or {}).get("seconds"),
        "frames_per_second": facts.get("frames_per_second"),
    }


def pooled(results: list[dict], kind: str) -> dict:
    """Pairs and named appearances summed over sources (``overall`` or one kind)."""
    total = {"pairs": 0, "pairs_found": 0, "named": 0, "named_correct": 0}
    for r in results:
        part = r["scores"].get(kind)
        if part:
            for key in total:
                total[key] += part[key]
    total["recall"] = round(total["pairs_found"] / total["pairs"], 3) if total["pairs"] else None
    total["precision"] = round(total["named_correct"] / total["named"], 3) if total["named"] else None
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", help="comma-separated source names (default: every source)")
    parser.add_argument("--split", choices=("fit", "held_out"), help="only the sources of this split")
    parser.add_argument("--set", action="append", default=[], help="section.key=value, as bunny run's --set")
    parser.add_argument("--force", action="store_true", help="redo stage 03 (stages 01-02 are reused)")
    parser.add_argument(
        "--write", action="store_true", help="store the table as the truth folder's eval_results.json"
    )
    args = parser.parse_args()
    truth = load_character_truth()
    folder = truth_dir()
    overrides = dict(parse_override(text) for text in args.set)
    wanted = set(args.sources.split(",")) if args.sources else None
    results = []
    for source in truth["sources"]:
        if (wanted and source["name"] not in wanted) or (args.split and source["split"] != args.split):
            continue
        result = run_source(source, folder, overrides, args.force)
        results.append(result)
        o = result["scores"]["overall"]
        print(
            f"{source['name']:16} {source['split']:8} {source['kind']:15} recall {o['recall']} "
            f"({o['pairs_found']}/{o['pairs']}) precision {o['precision']} "
            f"({o['named_correct']}/{o['named']}) "
            f"stage {result['stage_seconds']} s (fit {result['fit_seconds']} s, "
            f"{result['frames_searched']} frames at {result['frames_per_second']} frames/s)",
            flush=True,
        )
    print()
    table = {}
    for split in ("fit", "held_out"):
        part = [r for r in results if r["split"] == split]
        if not part:
            continue
        table[split] = {kind: pooled(part, kind) for kind in ("overall", *KINDS)}
        for kind, p in table[split].items():
            if p["pairs"]:
                print(
                    f"{split:8} {kind:15} recall {p['recall']} ({p['pairs_found']}/{p['pairs']}) "
                    f"precision {p['precision']} ({p['named_correct']}/{p['named']})"
                )
    if args.write:
        out = folder / "eval_results.json"
        out.write_text(
            json.dumps({"settings": overrides, "sources": results, "pooled": table}, indent=1) + "\n"
        )
        print(f"written {out}")


if __name__ == "__main__":
    main()
