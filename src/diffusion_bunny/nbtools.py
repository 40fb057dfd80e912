"""Small helpers that keep the stage notebooks thin."""

from __future__ import annotations

from pathlib import Path

from diffusion_bunny.config import Config, output_root
from diffusion_bunny.demo.run import demo_movie
from diffusion_bunny.media.probe import probe_video
from diffusion_bunny.pipeline.run import Run, movie_id


def open_run(run_dir: str | Path | None, movie: str | Path | None, cfg: Config) -> Run:
    """The run a notebook works on.

    With a movie, its run folder is created if needed (``run_dir`` or
    ``<paths.output_dir>/<movie_id>``); with only ``run_dir``, the existing run is opened; with
    neither, the built-in demo movie is built (once) and used, so a notebook opened in
    JupyterLab works straight away. ``~`` stands for the home folder, as in a shell (a notebook's
    parameters are no shell: ``movie = "~/Movies/film.mkv"`` was "no such file").
    """
    run_dir = None if run_dir is None else Path(run_dir).expanduser()
    movie = None if movie is None else Path(movie).expanduser()
    if movie is None and run_dir is not None:
        return Run.open(run_dir)
    if movie is None:
        movie = demo_movie(progress=True).path
        run_dir = run_dir or output_root(cfg) / "demo"
    probe_video(movie)
    return Run.create(run_dir or output_root(cfg) / movie_id(movie), movie)
