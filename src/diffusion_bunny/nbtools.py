"""Small helpers that keep the stage notebooks thin."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_bunny.config import (
    Config,
    current_name,
    load_config,
    output_root,
    settings_group,
    text_setting,
)
from diffusion_bunny.demo.run import demo_movie, demo_overrides
from diffusion_bunny.errors import ConfigError, StageWarning
from diffusion_bunny.media.figures import chart_png, jpeg_bytes, png_bytes
from diffusion_bunny.media.probe import probe_video
from diffusion_bunny.pipeline.contract import flat_settings
from diffusion_bunny.pipeline.run import Run, run_folder_in
from diffusion_bunny.pipeline.settings import dotted_overrides


def open_run(run_dir: str | Path | None, movie: str | Path | None, cfg: Config) -> Run:
    """The run a notebook works on.

    With a movie, its run folder is created if needed (``run_dir`` or
    ``<paths.output_dir>/<movie_id>``); with only ``run_dir``, the existing run is opened; with
    neither, the built-in demo movie is built (once) and used, so a notebook opened in
    JupyterLab works straight away. ``~`` stands for the home folder, as in a shell (a notebook's
    parameters are no shell: ``movie = "~/Movies/film.mkv"`` was "no such file"). In a notebook
    it also has pictures shown as JPEG (:func:`show_pictures_as_jpeg`), and leaves out the
    :class:`~diffusion_bunny.errors.StageWarning` copy of a stage's warnings: the stage cells
    print them from the manifest (also when the stage is up to date), so each was said twice.
    """
    if show_pictures_as_jpeg():  # a notebook: each stage cell prints its manifest's warnings
        warnings.filterwarnings("ignore", category=StageWarning)
    run_dir = None if run_dir is None else Path(run_dir).expanduser()
    movie = None if movie is None else Path(movie).expanduser()
    if movie is None and run_dir is not None:
        return Run.open(run_dir)
    if movie is None:
        movie = demo_movie(progress=True).path
        run_dir = run_dir or output_root(cfg) / "demo"
    probe_video(movie)
    # The run folder bunny run and bunny status name (a renamed movie's earlier one)
    return Run.create(run_dir or run_folder_in(output_root(cfg), movie), movie)


def notebook_overrides(
    run_dir: str | Path | None, movie: str | Path | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """A notebook's ``overrides``, and where it works on the demo (no ``run_dir``, no ``movie``:
    :func:`open_run`) the settings ``bunny demo`` ran it with under them
    (:func:`~diffusion_bunny.demo.run.demo_overrides`), so the demo's stages stay up to date."""
    overrides = _as_settings(overrides)
    if run_dir is None and movie is None:
        return demo_overrides(demo_movie(progress=True), overrides)
    return overrides


def _as_settings(overrides: Any) -> dict[str, Any]:
    """A notebook's ``overrides`` as ``{dotted key: value}``, whatever form they came in
    (:func:`~diffusion_bunny.pipeline.settings.dotted_overrides`), with the configuration's
    knowledge of which settings take text and which are groups."""
    return dotted_overrides(overrides, text_setting, settings_group)


def notebook_config(
    run_dir: str | Path | None,
    movie: str | Path | None,
    config_path: str | None,
    overrides: dict[str, Any] | None,
) -> Config:
    """The config a stage notebook works with: its own ``config_path`` and ``overrides`` over
    what the last ``bunny run`` of its run folder was given (``settings.json``:
    :meth:`~diffusion_bunny.pipeline.run.Run.layers`), or over the demo's settings on the demo
    (:func:`notebook_overrides`). A movie's run folder is found as ``bunny run`` finds it under
    ``paths.output_dir``; a run made with ``--out`` is opened by its ``run_dir``.

    Why: a notebook opened in JupyterLab on a run made by ``bunny run MOVIE --characters DIR``
    loaded the defaults, found stage 03 stale and ran it again with no reference pictures: every
    name was lost, and a cluster named there went to the run's own ``references/``, which the next
    ``bunny run --characters DIR`` did not read. Under ``bunny run`` the notebook is handed the
    same settings it recorded, so nothing changes there. One line says what was taken, and one
    what of the record could not be (its settings file gone, a setting no longer known)."""
    given = notebook_overrides(run_dir, movie, overrides)
    if run_dir is None and movie is None:
        return load_config(config_path, given)
    if run_dir is not None:
        folder = Path(run_dir).expanduser()
    else:
        movie = Path(movie).expanduser()
        probe_video(movie)  # a mistyped path is its one line, not an OSError of the lookup below
        folder = run_folder_in(output_root(load_config(config_path, given)), movie)
    if not folder.is_dir():
        return load_config(config_path, given)
    run = Run(folder)
    path, merged, gone = run.layers(config_path, given, current_name)
    earlier = _recorded_by_stages(run, load_config(path, merged)) if _made_before_settings(run) else {}
    if earlier and config_path is not None:  # the notebook's own settings file wins, as its overrides do
        own = flat_settings(load_config(config_path).model_dump(mode="json"))
        plain = flat_settings(load_config(None).model_dump(mode="json"))
        earlier = {k: v for k, v in earlier.items() if own.get(k) == plain.get(k)}
    named = {current_name(key) for key in merged}  # the notebook's own under any spelling win
    earlier = {k: v for k, v in earlier.items() if k not in named}
    recorded_by_run = {**earlier, **((run.settings() or {}).get("overrides") or {})}
    merged, retuned = _without_other_detectors(path, {**earlier, **merged}, given, recorded_by_run)
    dropped: list[str] = []
    try:  # as a whole first: some settings are valid only together (a floor under its threshold)
        cfg = load_config(path, merged)
    except ConfigError:
        merged = _without_clashes(path, merged, set(earlier), folder.name)
        dropped = [key for key in merged if key not in given and not _known_setting(key, merged[key])]
        for key in dropped:
            del merged[key]
        cfg = load_config(path, merged)
    taken = [f"--config {path}"] if path and not config_path else []
    taken += [f"{k}={v!r}" for k, v in merged.items() if k not in given and k not in earlier]
    recorded = [f"{k}={v!r}" for k, v in merged.items() if k in earlier and k not in given]
    if recorded:
        print(
            f"{folder.name} has no readable settings.json (a run folder of an earlier version): the "
            f"settings its stages recorded are taken: {'; '.join(recorded)}"
        )
    if taken:
        print(f"settings of the last bunny run of {folder.name}: {'; '.join(taken)}")
    if gone and not config_path:
        print(f"the last bunny run of {folder.name} was given --config {gone}, which is gone: not used")
    if dropped:
        print(f"left out of the last bunny run's settings (not accepted now): {', '.join(dropped)}")
    if retuned:
        print(f"left out, as the notebook chooses another detector: {', '.join(retuned)}")
    return cfg


def _without_other_detectors(
    path: str | None, merged: dict[str, Any], given: dict[str, Any], recorded: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``merged`` less the recorded settings of a detector the notebook replaces by naming
    another (``characters.detector.name: hog`` over a run that tuned ``centerface``'s
    ``min_score``): they belong to the detector that was, and with them the notebook could not
    open (``unknown key 'characters.detector.min_score'``), nor unset them. ``recorded``: the
    settings the run was given, which say the detector it ran. Also the names left out."""
    chosen: dict[str, Any] = {}
    for key, value in given.items():
        name = current_name(key)
        if name.endswith(".detector.name"):
            chosen[name.removesuffix(".name")] = value
        elif name.endswith(".detector") and isinstance(value, str):
            chosen[name] = value
    if not chosen:
        return merged, []
    today = flat_settings(load_config(path).model_dump(mode="json"))
    out, left = dict(merged), []
    named = {current_name(k): v for k, v in recorded.items()}
    for prefix, new in chosen.items():
        mine = [k for k in merged if k not in given and (current_name(k) + ".").startswith(prefix + ".")]
        was = named.get(f"{prefix}.name", named.get(prefix, today.get(f"{prefix}.name")))
        was = was.get("name", today.get(f"{prefix}.name")) if isinstance(was, dict) else was
        if was != new:
            for key in mine:
                del out[key]
                left.append(key)
    return out, left


def _without_clashes(
    path: str | None, merged: dict[str, Any], recorded: set[str], folder: str
) -> dict[str, Any]:
    """``merged`` less the settings a run folder's stages recorded that keep it from loading: each
    not accepted on its own, then each whose leaving out lets the rest load (one that does not go
    with the notebook's own, a threshold over its floor), said in one line. The others stay: one
    setting out of range took ``characters.reference_dir`` with it, and every name was lost."""
    out = {k: v for k, v in merged.items() if k not in recorded or _known_setting(k, v)}
    for key in [k for k in recorded if k in out]:
        try:
            load_config(path, out)
            break
        except ConfigError:
            trial = {k: v for k, v in out.items() if k != key}
            with contextlib.suppress(ConfigError):
                load_config(path, trial)
                out = trial
    gone = sorted(k for k in recorded if k in merged and k not in out)
    if gone:
        print(f"left out of the settings {folder}'s stages recorded (not accepted now): {', '.join(gone)}")
    return out


def _made_before_settings(run: Run) -> bool:
    """Whether ``bunny run`` made this folder before it kept ``settings.json`` (it writes the file
    as it starts, before any notebook it saves): its saved notebooks are there, the file is not."""
    return run.settings() is None and any(run.notebooks_dir.glob("*.ipynb"))


def _recorded_by_stages(run: Run, today: Config) -> dict[str, Any]:
    """The settings a run folder's stages recorded in their manifests that differ from
    ``today``'s (under today's names; the newest manifest's value where two differ).

    Why: a folder made before ``settings.json`` has no record of its ``--characters`` or
    ``--set``; a notebook opened on it ran stage 03 again with the defaults, and every name from
    the references was lost (a notebook names clusters into the run's own ``references/``, which
    the next ``bunny run --characters DIR`` does not read). Its stages' own records say what it
    ran with."""
    manifests = []
    for path in sorted(run.manifests_dir.glob("*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged manifest is its stage's to report
        if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
            manifests.append(manifest)
    now = flat_settings(today.model_dump(mode="json"))
    recorded: dict[str, Any] = {}
    for manifest in sorted(manifests, key=lambda m: str(m.get("finished") or "")):
        recorded.update({current_name(k): v for k, v in flat_settings(manifest["config"]).items()})
    return {k: v for k, v in recorded.items() if k in now and now[k] != v}


def _known_setting(key: str, value: Any) -> bool:
    """Whether the configuration takes ``key`` set to ``value`` (a key renamed or removed since a
    run recorded it is not, and would stop the notebook from opening)."""
    try:
        load_config(None, {key: value})
    except ConfigError:
        return False
    return True


#: JPEG's largest side; a taller sheet is shown as PNG.
_JPEG_MAX_SIDE = 65_500


def _jpeg_holds(image: Image.Image) -> bool:
    """Whether JPEG can hold ``image``: no transparency or palette, no side over 65,500 px."""
    return image.mode in ("RGB", "L") and max(image.size) <= _JPEG_MAX_SIDE


def _as_jpeg(image: Image.Image) -> bytes | None:
    """A picture as JPEG for the notebook (:func:`~diffusion_bunny.media.figures.jpeg_bytes`), or
    None where JPEG cannot hold it."""
    return jpeg_bytes(image) if _jpeg_holds(image) else None


def _as_png(image: Image.Image) -> bytes | None:
    """A picture as PNG for the notebook, only where JPEG cannot hold it."""
    return None if _jpeg_holds(image) else png_bytes(image)


def show_pictures_as_jpeg(shell: Any = None) -> bool:
    """Make the notebook show a Pillow picture (a contact sheet, a strip of faces) as one JPEG,
    not as a PNG and a JPEG both; True where there is a notebook's shell to tell.

    Why: IPython keeps every format a picture offers, and Pillow offers both. JupyterLab shows
    the PNG, which for a sheet of film frames is 5-8 times the JPEG and slow to make: notebook
    01's contact sheet of a 10-minute film was 5.5 MB of PNG beside 0.8 MB of JPEG in the saved
    notebook, and a cluster sheet took 0.4-0.8 s to encode as PNG against 0.03-0.04 s as JPEG
    (2 cores). Pictures JPEG cannot hold (transparency) stay PNG. ``open_run`` calls it, so every
    stage notebook does, in JupyterLab as under ``bunny run``."""
    if shell is None:
        try:
            from IPython import get_ipython  # lazy: a notebook has IPython loaded; a script may not
        except ImportError:  # pragma: no cover - IPython comes with the workspace's kernel
            return False
        shell = get_ipython()
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/jpeg" not in formatters or "image/png" not in formatters:
        return False
    formatters["image/jpeg"].for_type(Image.Image, _as_jpeg)
    formatters["image/png"].for_type(Image.Image, _as_png)
    # By name: plotnine is imported by the notebooks' figure cells, after their stage.
    bundles = getattr(shell.display_formatter, "mimebundle_formatter", None)
    if bundles is not None:
        bundles.for_type_by_name("plotnine.ggplot", "ggplot", _chart_bundle)
    return True


def _chart_bundle(chart: Any) -> tuple[dict[str, bytes], dict[str, dict[str, int]]]:
    """A plotnine chart as the notebook shows it: a PNG at twice its size (for high-density
    screens, as plotnine's own "retina"), trimmed to what is drawn, as the report saves it.
    plotnine's own display cuts what reaches past the figure's edge: a long title lost its
    start ("3 frames captioned (0 failed)" of "8 of 8 frames captioned"), an axis label its end."""
    png = chart_png(chart, dpi=200, bbox_inches="tight", facecolor="white")
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    return {"image/png": png}, {"image/png": {"width": width // 2, "height": height // 2}}
