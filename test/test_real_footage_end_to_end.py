"""Real footage through every stage, as a user runs it: ``bunny run`` on the Hamilton clip with its
two reference portraits, the tiny base models, and training settings under which a batch must hold
one picture more than once (repeats > 1). The demo alone never did that, and stage 07 crashed on
the first real clip that did; this test fails on such a crash anywhere from stage 01 to stage 09.
"""

from __future__ import annotations

import shutil
from collections import Counter

import polars as pl
import pytest
from paths import TESTDATA

from diffusion_bunny.cli import main
from diffusion_bunny.stages.train.data import bucket_step, make_buckets, nearest_bucket

pytestmark = pytest.mark.slow

#: Every training picture appears 3 times an epoch and a batch holds 4: in a bucket of at most 3
#: distinct pictures (the clip gives 3 face crops of one size class), a batch repeats one.
REPEATS, BATCH = 3, 4


def a_batch_repeats_a_picture(items: pl.DataFrame, resolution: int) -> bool:
    """Whether some training batch must hold one picture twice: a bucket whose first batch is
    larger than the number of distinct pictures in it (the batches are chunks of one bucket)."""
    buckets = make_buckets(resolution, bucket_step(resolution, 8))
    train = items.filter(pl.col("split") == "train")
    sizes = zip(train["width"], train["height"], strict=True)
    distinct = Counter(nearest_bucket(w, h, buckets) for w, h in sizes)
    return any(min(BATCH, count * REPEATS) > count for count in distinct.values())


def test_real_clip_trains_and_generates_with_repeated_pictures(hamilton, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_BUNNY_CACHE", str(tmp_path / "cache"))  # the tiny presets
    refs = tmp_path / "refs"
    for name, file in (("lin", "lin-manuel-miranda.png"), ("alex", "alex-lacamoire.png")):
        (refs / name).mkdir(parents=True)
        shutil.copy(TESTDATA / "face_recognition_examples" / file, refs / name)
    out, lora = tmp_path / "run", tmp_path / "lora"
    settings = [
        f"export.base_repeats={REPEATS}",
        f"train.train_batch_size={BATCH}",
        f"train.output_dir={lora}",
        "generate.steps=4",
        # The tiny preset trains at 128 px: crops are judged at that size (none enlarged over 2x).
        "export.crop_resolution=128",
    ]
    args = ["run", str(hamilton), "--out", str(out), "--characters", str(refs), "--quiet"]
    assert main([*args, *(a for s in settings for a in ("--set", s))]) == 0

    tables = out / "tables"
    items = pl.read_parquet(tables / "dataset_items.parquet")
    assert (items.filter(pl.col("split") == "train")["repeats"] == REPEATS).all()
    # The premise: without it this test would not exercise the batch that crashed.
    assert a_batch_repeats_a_picture(items, resolution=128)
    # The performer facing the camera in frames 82-210 is named (and in the opening shot, frames
    # 0-19, where his face is 54 px and searched by CenterFace's fine pass), never the pianist's
    # shot or the audience's; his face crops were exported.
    faces = pl.read_parquet(tables / "faces.parquet")
    named = faces.filter(pl.col("character") == "lin")["frame_index"].to_list()
    assert any(82 <= i < 211 for i in named) and all(i < 20 or 82 <= i < 211 for i in named), named
    assert items.filter((pl.col("crop") == "face") & pl.col("characters").list.contains("lin")).height >= 1
    loras = pl.read_parquet(tables / "loras.parquet")
    current = loras.filter(pl.col("current")).row(0, named=True)
    assert (lora / current["name"] / "pytorch_lora_weights.safetensors").is_file() and current["steps"] == 30
    assert current["name"].startswith("tiny-30steps-")
    generations = pl.read_parquet(tables / "generations.parquet")
    assert generations.height > 0 and all((out / p).is_file() for p in generations["path"])
    assert (out / "report" / "index.html").is_file()

    # The flow-matching trainer reads its batches through the same cache: FLUX.1's tiny preset.
    flux = ["--set", "train.base_model=tiny-flux", "--stages", "train,generate"]
    assert main([*args, *(a for s in settings for a in ("--set", s)), *flux]) == 0
    loras = pl.read_parquet(tables / "loras.parquet")
    trained = loras.filter(pl.col("current")).row(0, named=True)
    assert trained["name"].startswith("tiny-flux-30steps-") and trained["lora_path"] is not None
    assert (lora / trained["name"] / "pytorch_lora_weights.safetensors").is_file() and loras.height == 2
