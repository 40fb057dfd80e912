# Run by a stage kernel as it starts (IPython's ``exec_files``, in the user namespace, before the
# kernel answers its first request). It imports the modules named in $DIFFUSION_BUNNY_KERNEL_WARM
# (comma-separated): the ones the run's first notebook needs before its stage, so they load while
# the ``bunny run`` process probes the movie, checks the stages and imports papermill on the other
# core instead of after it. The modules in $DIFFUSION_BUNNY_KERNEL_WARM_LATER (the ones only the
# notebook's figures need: plotnine, pandas, matplotlib, ~1.2 s on 2 cores) are imported by a
# background thread, which runs while the stage decodes the movie (stage 01 leaves most of one
# core idle), so the kernel answers, and the stage starts, without waiting for them; the cell that
# imports them later finds them loaded (or waits for the thread's import to finish). Only modules
# end up loaded: the names used here are deleted, and the notebook still imports every name
# itself. A module that fails to import is left for the notebook, whose own import then reports
# the error with its traceback. plotnine imports matplotlib's pyplot (and with it the kernel's
# inline backend) only at its first figure, ~0.5-0.8 s inside the first plot's cell, so pyplot
# is imported too when plotnine is.


def _diffusion_bunny_warm() -> None:
    import contextlib
    import importlib
    import os
    import sys
    import threading

    def load(variable: str) -> None:
        names = [n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()]
        for name in names:
            with contextlib.suppress(Exception):  # reported by the notebook's own import
                importlib.import_module(name)
        if names and "plotnine" in sys.modules:
            with contextlib.suppress(Exception):
                importlib.import_module("matplotlib.pyplot")

    load("DIFFUSION_BUNNY_KERNEL_WARM")
    if os.environ.get("DIFFUSION_BUNNY_KERNEL_WARM_LATER"):
        later = threading.Thread(
            target=load, args=("DIFFUSION_BUNNY_KERNEL_WARM_LATER",), name="bunny-warm", daemon=True
        )
        later.start()


_diffusion_bunny_warm()
del _diffusion_bunny_warm
