"""Stage 03 on the character truth set: every source's film through stages 01-03 with its
references, scored per kind of character.

For each source of ``test/stages/characters/data/character_truth`` (drawn people, cartoon animals,
3D-rendered creatures; docs/character-truth.md), the film runs through ``extract``, ``quality`` and
``characters`` in a run folder of its own, with ``characters.reference_dir`` set to the source's
reference pictures, and the named appearances of the ``faces`` table are scored
(:func:`diffusion_bunny.demo.character_truth.score_named`): (shot, character) recall and precision
of named appearances, per kind and overall, and stage 03's speed (frames searched per second,
seconds spent fitting the detector), and identity accuracy (of the named appearances that land on
a character, the share named right). ``--without-references`` runs stage 03 a second time with no
reference pictures, in a run folder of its own, and scores how its clusters group the truth's
appearances (:func:`~diffusion_bunny.demo.character_truth.score_clusters`: pairwise F1, an
appearance nothing lands on counting as noise). Sources are reported by split: the ``fit`` sources
were used to choose settings, the ``held_out`` ones never were.

``--per-frame N`` also searches every N-th frame of each source's film with the detector stage 03
fitted in that run (``cache/characters/fitted-*.pt``), at scores 0.3, 0.4 and 0.5: the appearances
found, the sightings on no appearance of the character they name, and the (shot, character) pairs
found, per character. It says how well the fit itself finds the characters, apart from which frames
stage 02 kept for stage 03 to search (docs/characters.md quotes it as "per frame").

``--stills N`` adds, per character, N stills from the film to its references, as a user adds them in
notebook 03 (:func:`~diffusion_bunny.stages.characters.stage.add_still`): the extracted frames in
which the truth's box of that character is largest, one per shot, each its body box. Recall and
precision are then counted on the shots no still was taken from (the scores over every shot are
kept beside them), in run folders of their own (``<source>-stills<N>``). With ``--stills-only``
the stills are the characters' only pictures (``<source>-stills<N>-only``): a film nobody has a
picture of, its characters boxed once each in notebook 03.

    uv run python python_script/eval_characters.py                 # every source
    uv run python python_script/eval_characters.py --split fit     # the fit sources only
    uv run python python_script/eval_characters.py --sources flare --set characters.fitted.steps=400
    uv run python python_script/eval_characters.py --without-references   # clusters too
    uv run python python_script/eval_characters.py --stills 1             # one still per character
    uv run python python_script/eval_characters.py --stills 1 --stills-only   # ... and nothing else
    uv run python python_script/eval_characters.py --split fit --per-frame 8   # the fit, frame by frame

Run folders are kept under ``data/eval_characters/<source>`` (and ``<source>-no-refs``; stages
01-02 are reused on a rerun;
``--force`` redoes stage 03). ``--write`` stores the table in the truth folder
(``eval_results.json``; ``eval_results_stills.json`` with ``--stills``,
``eval_results_stills_only.json`` with ``--stills-only``) for docs/character-truth.md;
it refuses, in one line, a run that would drop sources or the without-references clusters the
stored table holds (:func:`write_refusal`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import av

from diffusion_bunny.config import load_config, parse_override
from diffusion_bunny.demo.character_truth import (
    KINDS,
    identity_accuracy,
    load_character_truth,
    match_appearance,
    pairwise_from_counts,
    score_clusters,
    score_named,
    truth_dir,
)
from diffusion_bunny.models.fitted.detector import FittedDetector
from diffusion_bunny.paths import workspace_root
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.characters.sightings import MOST, likely_sightings
from diffusion_bunny.stages.characters.stage import add_still

#: The scores at which --per-frame counts the fitted detector's sightings.
PER_FRAME_SCORES = (0.3, 0.4, 0.5)


def _stage_03(
    source: dict, run_dir: Path, overrides: dict, force: bool, before: Callable[[Run], None] | None = None
) -> tuple[Run, float]:
    """One source's film through stages 01-03 in ``run_dir`` (``before`` called on the run between
    stage 02 and stage 03); the run and stage 03's seconds."""
    movie = truth_dir() / source["film"]
    run = Run.open(run_dir) if (run_dir / "run.json").is_file() else Run.create(run_dir, movie)
    cfg = load_config(overrides=overrides)
    for stage in ("extract", "quality"):
        run_stage(run, stage, cfg, progress=False)
    if before is not None:
        before(run)
    started = time.perf_counter()
    run_stage(run, "characters", cfg, progress=True, force=force)
    return run, time.perf_counter() - started


def _speed(run: Run, seconds: float) -> dict:
    """Stage 03's frames searched, seconds, fitting seconds and frames/s, from its manifest."""
    manifest = run.read_manifest("characters")
    facts = manifest["facts"]
    return {
        "frames_searched": manifest["counts"]["frames_scanned"],
        "stage_seconds": round(seconds, 1),
        "fit_seconds": (facts.get("fitted") or {}).get("seconds"),
        "frames_per_second": facts.get("frames_per_second"),
    }


def _predictions(run: Run) -> list[dict]:
    """Stage 03's appearances as the scoring's rows; ``cluster`` is the name, or the cluster of
    an unnamed one."""
    return [
        {
            "frame": r["frame_index"],
            "character": r["character"],
            "cluster": r["character"] if r["character"] is not None else r["cluster"],
            "box": (r["left"], r["top"], r["right"], r["bottom"]),
        }
        for r in run.read_table("faces").iter_rows(named=True)
    ]


def run_source(source: dict, folder: Path, overrides: dict, force: bool, without_references: bool) -> dict:
    """One source through stages 01-03 with its references (and, when asked, without); its
    scores and stage 03's speed."""
    base = workspace_root() / "data" / "eval_characters"
    refs = {"characters.reference_dir": str(folder / "refs" / source["name"])}
    run, seconds = _stage_03(source, base / source["name"], {**overrides, **refs}, force)
    predictions = _predictions(run)
    result = {
        "source": source["name"],
        "split": source["split"],
        "kind": source["kind"],
        "scores": score_named(predictions, source),
        "identity": identity_accuracy(predictions, source),
        **_speed(run, seconds),
    }
    if without_references:
        bare, _ = _stage_03(source, base / f"{source['name']}-no-refs", overrides, force)
        searched = bare.read_table("frames").join(bare.read_table("face_frames"), on="frame_id", how="semi")
        result["clusters"] = score_clusters(_predictions(bare), source, searched["frame_index"].to_list())
    return result


def _shot_of(source: dict) -> dict[int, int]:
    return {f: s["shot_id"] for s in source["shots"] for f in range(s["start_frame"], s["end_frame"])}


def _without_shots(source: dict, shots: set[int]) -> dict:
    """``source`` without the shots ``shots`` and their appearances."""
    shot_of = _shot_of(source)
    return {
        **source,
        "shots": [s for s in source["shots"] if s["shot_id"] not in shots],
        "appearances": [a for a in source["appearances"] if shot_of.get(a["frame"]) not in shots],
    }


def add_stills(run: Run, source: dict, refs: Path, n: int) -> set[int]:
    """``n`` stills per character added to ``refs`` with :func:`add_still`, as a user adds them:
    the run's extracted frames in which the truth's box of the character is largest, one per
    shot; returns the shots they come from."""
    shot_of = _shot_of(source)
    frame_ids = dict(run.read_table("frames").select("frame_index", "frame_id").iter_rows())
    characters = load_config(overrides={"characters.reference_dir": str(refs)}).characters
    used: set[int] = set()
    for char in source["characters"]:
        seen = [
            a for a in source["appearances"] if a["character"] == char["name"] and a["frame"] in frame_ids
        ]
        seen.sort(key=lambda a: -(a["body"][2] - a["body"][0]) * (a["body"][3] - a["body"][1]))
        shots: set[int] = set()
        for a in seen:
            shot = shot_of.get(a["frame"])
            if len(shots) >= n:
                break
            if shot is None or shot in shots:
                continue
            add_still(run.run_dir, frame_ids[a["frame"]], tuple(a["body"]), char["name"], characters)
            shots.add(shot)
        used |= shots
    return used


def add_confirmed(
    base: Run, run: Run, source: dict, refs: Path, step_limit: int = MOST
) -> tuple[set[int], dict[str, int | None]]:
    """One still per character from its likely sightings in ``base`` (the references-only run), as
    a person confirms one in notebook 03: the sightings are looked at surest first, and the first
    that lies on the character (the truth's box of it) becomes the still. Returns the shots the
    stills come from and, per character, how many sightings were looked at to find it (None: none
    of them was the character)."""
    shot_of = _shot_of(source)
    index_of = dict(base.read_table("frames").select("frame_id", "frame_index").iter_rows())
    characters = load_config(overrides={"characters.reference_dir": str(refs)}).characters
    used: set[int] = set()
    looked: dict[str, int | None] = {}
    for char in source["characters"]:
        looked[char["name"]] = None
        offered = likely_sightings(base, char["name"], characters, step_limit)
        for number, row in enumerate(offered.iter_rows(named=True), 1):
            box = (row["left"], row["top"], row["right"], row["bottom"])
            frame = index_of[row["frame_id"]]
            if any(
                a["character"] == char["name"]
                and a["frame"] == frame
                and match_appearance(box, a["body"], a["head"])
                for a in source["appearances"]
            ):
                add_still(run.run_dir, row["frame_id"], box, char["name"], characters)
                used.add(shot_of[frame])
                looked[char["name"]] = number
                break
    return used, looked


def run_source_confirmed(source: dict, folder: Path, overrides: dict, force: bool) -> dict:
    """One source with its references and one confirmed likely sighting per character as a still
    (:func:`add_confirmed`); scored on the shots no still was taken from."""
    base_dir = workspace_root() / "data" / "eval_characters" / source["name"]
    refs_given = {"characters.reference_dir": str(folder / "refs" / source["name"])}
    base, _ = _stage_03(source, base_dir, {**overrides, **refs_given}, False)
    run_dir = base_dir.parent / f"{source['name']}-confirmed"
    refs = run_dir.parent / f"{run_dir.name}-refs"
    shutil.rmtree(refs, ignore_errors=True)
    shutil.copytree(folder / "refs" / source["name"], refs)
    used: set[int] = set()
    looked: dict = {}

    def confirm(run: Run) -> None:
        shots, seen = add_confirmed(base, run, source, refs)
        used.update(shots)
        looked.update(seen)

    run, seconds = _stage_03(
        source, run_dir, {**overrides, "characters.reference_dir": str(refs)}, force, before=confirm
    )
    predictions = _predictions(run)
    shot_of = _shot_of(source)
    others = [p for p in predictions if shot_of.get(p["frame"]) not in used]
    rest = _without_shots(source, used)
    base_others = [p for p in _predictions(base) if shot_of.get(p["frame"]) not in used]
    return {
        "source": source["name"],
        "split": source["split"],
        "kind": source["kind"],
        "confirmed": looked,
        "still_shots": sorted(used),
        "scores": score_named(others, rest),
        "identity": identity_accuracy(others, rest),
        "references_only_same_shots": score_named(base_others, rest),
        "scores_all_shots": score_named(predictions, source),
        **_speed(run, seconds),
    }


def stills_run_name(source: dict, n: int, only: bool) -> str:
    """The run folder's name of a source with ``n`` stills per character (``only``: and nothing else)."""
    return f"{source['name']}-stills{n}" + ("-only" if only else "")


def run_source_stills(
    source: dict, folder: Path, overrides: dict, force: bool, n: int, only: bool = False
) -> dict:
    """One source with its references (``only``: none) and ``n`` stills from the film per
    character; scored on the shots no still was taken from."""
    run_dir = workspace_root() / "data" / "eval_characters" / stills_run_name(source, n, only)
    refs = run_dir.parent / f"{run_dir.name}-refs"
    shutil.rmtree(refs, ignore_errors=True)
    if only:
        refs.mkdir(parents=True)
    else:
        shutil.copytree(folder / "refs" / source["name"], refs)
    overrides = {**overrides, "characters.reference_dir": str(refs)}
    used: set[int] = set()
    run, seconds = _stage_03(
        source, run_dir, overrides, force, before=lambda run: used.update(add_stills(run, source, refs, n))
    )
    predictions = _predictions(run)
    shot_of = _shot_of(source)
    others = [p for p in predictions if shot_of.get(p["frame"]) not in used]
    rest = _without_shots(source, used)
    return {
        "source": source["name"],
        "split": source["split"],
        "kind": source["kind"],
        "stills": n,
        "stills_only": only,
        "still_shots": sorted(used),
        "scores": score_named(others, rest),
        "identity": identity_accuracy(others, rest),
        "scores_all_shots": score_named(predictions, source),
        **_speed(run, seconds),
    }


def _names(name: str, box: tuple, appearance: dict) -> bool:
    """Whether a sighting naming ``name`` at ``box`` is on ``appearance`` of that character."""
    return name == appearance["character"] and match_appearance(box, appearance["body"], appearance["head"])


def per_frame(source: dict, run_dir: Path, step: int) -> dict:
    """The detector fitted in ``run_dir`` on every ``step``-th frame of the source's film: per
    score of :data:`PER_FRAME_SCORES`, the appearances found (a sighting naming the character on
    its box, :func:`match_appearance`), the false sightings (naming a character on none of its
    appearances) and the (shot, character) pairs found, with each character's found and total."""
    fitted = sorted((run_dir / "cache" / "characters").glob("fitted-*.pt"))
    detector = FittedDetector.load(fitted[-1]) if fitted else None
    if detector is None:
        raise SystemExit(f"{run_dir}: no fitted detector (stage 03 fits one when drawn references are given)")
    by_frame: dict[int, list[dict]] = {}
    for a in source["appearances"]:
        by_frame.setdefault(a["frame"], []).append(a)
    shot_of = _shot_of(source)
    counts = {t: {"found": 0, "false": 0, "pairs": set(), "per": {}} for t in PER_FRAME_SCORES}
    total = 0
    with av.open(str(truth_dir() / source["film"])) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % step:
                continue
            appearances = by_frame.get(index, [])
            total += len(appearances)
            hits = detector.detect(frame.to_ndarray(format="rgb24"), min(PER_FRAME_SCORES))
            for score, c in counts.items():
                named = [(detector.names[h.index], h.box) for h in hits if h.score >= score]
                for a in appearances:
                    ok = any(_names(n, b, a) for n, b in named)
                    c["found"] += ok
                    per = c["per"].setdefault(a["character"], [0, 0])
                    per[0] += ok
                    per[1] += 1
                    if ok:
                        c["pairs"].add((shot_of[index], a["character"]))
                c["false"] += sum(not any(_names(n, b, a) for a in appearances) for n, b in named)
    pairs = sum(len(s["characters"]) for s in source["shots"])
    return {
        "step": step,
        "appearances": total,
        "pairs": pairs,
        "scores": {
            str(t): {k: len(v) if k == "pairs" else v for k, v in c.items()} for t, c in counts.items()
        },
    }


def pooled(results: list[dict], kind: str) -> dict:
    """Pairs, named appearances, identities and cluster pairs summed over sources (``overall``
    or one kind)."""
    total = {"pairs": 0, "pairs_found": 0, "named": 0, "named_correct": 0, "landed": 0, "landed_right": 0}
    pairs = {"both": 0, "together": 0, "same": 0}
    clustered = False
    for r in results:
        part = r["scores"].get(kind)
        if part:
            for key in ("pairs", "pairs_found", "named", "named_correct"):
                total[key] += part[key]
        ident = r.get("identity", {}).get(kind)
        if ident:
            total["landed"] += ident["landed"]
            total["landed_right"] += ident["correct"]
        c = r.get("clusters", {}).get(kind)
        if c:
            clustered = True
            for key in pairs:
                pairs[key] += c[f"pairs_{key}"]
    total["recall"] = round(total["pairs_found"] / total["pairs"], 3) if total["pairs"] else None
    total["precision"] = round(total["named_correct"] / total["named"], 3) if total["named"] else None
    total["identity"] = round(total["landed_right"] / total["landed"], 3) if total["landed"] else None
    if clustered:
        scores = pairwise_from_counts(pairs["both"], pairs["together"], pairs["same"])
        total["clusters"] = {k: round(scores[k], 3) for k in ("precision", "recall", "f1")}
    return total


def write_refusal(previous: dict | None, results: list[dict], stills: int) -> str | None:
    """Why ``--write`` must not replace ``previous`` (the stored table the docs quote) with this
    run's ``results``, or None. A run of fewer sources, or one without the without-references
    clusters the stored table has, would silently drop what the docs cite: it happened once.
    Its advice can always be taken: main refuses ``--without-references`` with ``--stills`` or
    ``--confirm`` (and ``--confirm`` with ``--write``) before anything runs."""
    if not previous:
        return None
    missing = sorted({r["source"] for r in previous.get("sources", [])} - {r["source"] for r in results})
    if missing:
        return f"this run has no result for {', '.join(missing)} (run every source: no --sources or --split)"
    had = any("clusters" in r for r in previous.get("sources", []))
    if had and not stills and not all("clusters" in r for r in results):
        return "the stored table has the clusters without references; add --without-references"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", help="comma-separated source names (default: every source)")
    parser.add_argument("--split", choices=("fit", "held_out"), help="only the sources of this split")
    parser.add_argument("--set", action="append", default=[], help="section.key=value, as bunny run's --set")
    parser.add_argument("--force", action="store_true", help="redo stage 03 (stages 01-02 are reused)")
    parser.add_argument(
        "--write", action="store_true", help="store the table as the truth folder's eval_results.json"
    )
    parser.add_argument(
        "--without-references",
        action="store_true",
        help="also run stage 03 with no reference pictures and score its clusters (pairwise F1)",
    )
    parser.add_argument(
        "--stills",
        type=int,
        default=0,
        help="add this many stills from the film per character (add_still) and score the other shots",
    )
    parser.add_argument(
        "--stills-only",
        action="store_true",
        help="with --stills: the stills are the characters' only pictures (no reference folder)",
    )
    parser.add_argument(
        "--confirm",
        action="store_true",
        help="add one still per character from its likely sightings, the first that lies on it "
        "(as a person confirms one in notebook 03), and score the other shots",
    )
    parser.add_argument(
        "--per-frame",
        type=int,
        default=0,
        metavar="N",
        help="also search every N-th frame of the film with the run's fitted detector (scores 0.3-0.5)",
    )
    args = parser.parse_args()
    if args.stills_only and not args.stills:
        parser.error("--stills-only needs --stills N (how many stills per character)")
    # Only the plain run (run_source) has a second, reference-less stage 03 to score clusters on;
    # the stills and confirm runs would drop the flag without a word.
    if args.without_references and (args.stills or args.confirm):
        parser.error(
            f"--without-references scores the plain run only: leave it out of "
            f"{'--stills' if args.stills else '--confirm'}, or run it alone"
        )
    if args.confirm and args.stills:
        parser.error("--confirm and --stills are separate runs (--confirm adds a still of its own): give one")
    if args.confirm and args.write:
        # Its table has no file of its own: --write would replace eval_results.json (the
        # references-only table the docs quote) with the confirmed scores.
        parser.error("--confirm has no stored table (docs/characters.md quotes it): leave out --write")
    truth = load_character_truth()
    folder = truth_dir()
    overrides = dict(parse_override(text) for text in args.set)
    names = [source["name"] for source in truth["sources"]]
    wanted = {name for name in args.sources.split(",") if name} if args.sources else None
    if wanted and (unknown := sorted(wanted - set(names))):
        parser.error(f"--sources: no source {', '.join(unknown)} (choose from {', '.join(names)})")
    chosen = [
        source
        for source in truth["sources"]
        if (not wanted or source["name"] in wanted) and (not args.split or source["split"] == args.split)
    ]
    if not chosen:
        parser.error(f"--sources {args.sources}: none of them is in --split {args.split}")
    results = []
    for source in chosen:
        if args.confirm:
            result = run_source_confirmed(source, folder, overrides, args.force)
            b = result["references_only_same_shots"]["overall"]
            print(
                f"{source['name']:16} confirmed (sightings looked at) {result['confirmed']}, stills from "
                f"shots {result['still_shots']}; references only on the other shots: recall "
                f"{b['pairs_found']}/{b['pairs']}, precision {b['named_correct']}/{b['named']}; with them:"
            )
        elif args.stills:
            result = run_source_stills(source, folder, overrides, args.force, args.stills, args.stills_only)
            a = result["scores_all_shots"]["overall"]
            print(
                f"{source['name']:16} {args.stills} still(s) per character from shots "
                f"{result['still_shots']}; every shot: recall {a['pairs_found']}/{a['pairs']}, "
                f"precision {a['named_correct']}/{a['named']}; the other shots:"
            )
        else:
            result = run_source(source, folder, overrides, args.force, args.without_references)
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
        i = result["identity"]["overall"]
        print(f"{'':16} identity accuracy {i['accuracy']} ({i['correct']}/{i['landed']})", end="")
        c = result.get("clusters", {}).get("overall")
        if c:
            print(
                f"; without references: pairwise F1 {c['f1']:.3f} (precision {c['precision']:.3f}, "
                f"recall {c['recall']:.3f}; {c['clustered']} of {c['appearances']} appearances clustered)",
                end="",
            )
        print(flush=True)
        if args.per_frame:
            run_dir = (
                workspace_root()
                / "data"
                / "eval_characters"
                / (stills_run_name(source, args.stills, args.stills_only) if args.stills else source["name"])
            )
            result["per_frame"] = f = per_frame(source, run_dir, args.per_frame)
            for score, c in f["scores"].items():
                per = ", ".join(f"{name} {n}/{of}" for name, (n, of) in sorted(c["per"].items()))
                print(
                    f"{'':16} every {f['step']}th frame at {score}: {c['found']} of {f['appearances']} "
                    f"appearances, {c['false']} false, {c['pairs']}/{f['pairs']} pairs ({per})",
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
                line = (
                    f"{split:8} {kind:15} recall {p['recall']} ({p['pairs_found']}/{p['pairs']}) "
                    f"precision {p['precision']} ({p['named_correct']}/{p['named']}) "
                    f"identity {p['identity']} ({p['landed_right']}/{p['landed']})"
                )
                if "clusters" in p:
                    line += f" clusters F1 {p['clusters']['f1']} (without references)"
                print(line)
    if args.write:
        out = folder / (
            ("eval_results_stills_only.json" if args.stills_only else "eval_results_stills.json")
            if args.stills
            else "eval_results.json"
        )
        previous = json.loads(out.read_text()) if out.is_file() else None
        refusal = write_refusal(previous, results, args.stills)
        if refusal:
            raise SystemExit(f"not written: {refusal}")
        out.write_text(
            json.dumps(
                {"settings": overrides, "stills": args.stills, "sources": results, "pooled": table}, indent=1
            )
            + "\n"
        )
        print(f"written {out}")


if __name__ == "__main__":
    main()
