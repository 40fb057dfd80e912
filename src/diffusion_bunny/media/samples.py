"""Still pictures that ship inside installed wheels (scikit-image's sample data, matplotlib's
``grace_hopper.jpg``), for footage made here rather than downloaded: the demo movie
(:mod:`diffusion_bunny.demo.movie`) and the synthetic transition clips stage 01's TransNetV2 is
calibrated and judged on (:mod:`diffusion_bunny.stages.extract.detectors.synthclips`) film them.
In ``media/`` because both the demo and a stage use them, and a stage may not import the demo.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import skimage.data
from PIL import Image


@cache
def load_source(name: str) -> np.ndarray:
    """Return source image ``name`` as an RGB ``uint8`` array, read from an installed package.

    Only images bundled inside the scikit-image and matplotlib wheels are used (several other
    ``skimage.data`` images are fetched over the network on first use, which would make the
    demo fail offline).  Cached because several shots film the same image.
    """
    if name == "grace_hopper":
        from matplotlib import cbook  # lazy: matplotlib takes 0.15 s to import

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    else:
        loaders = {
            "astronaut": skimage.data.astronaut,
            "coffee": skimage.data.coffee,
            "chelsea": skimage.data.chelsea,
            "rocket": skimage.data.rocket,
            # Left view of the stereo pair; the other two arrays are not needed.
            "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
            "immunohistochemistry": skimage.data.immunohistochemistry,
        }
        if name not in loaders:
            raise KeyError(f"unknown demo source {name!r}")
        rgb = loaders[name]()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"source {name!r} is not 8-bit RGB: {rgb.shape} {rgb.dtype}")
    rgb = np.ascontiguousarray(rgb)
    rgb.setflags(write=False)  # shared by the cache: nobody may modify it
    return rgb
