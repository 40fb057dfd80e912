"""Stage 05's figures: caption lengths and the most frequent words."""

from __future__ import annotations

import plotnine as p9
import polars as pl

from diffusion_bunny.media.figures import categorical, histogram, minimal_theme
from diffusion_bunny.stages.captions.tables import caption_lengths


def caption_length_plot(captions: pl.DataFrame, by: str = "provider") -> p9.ggplot:
    """Words per caption of a ``captions`` table, coloured by ``provider`` (notebook 05) or
    ``status`` (the report: written vs edited); the title counts the failed ones. Long captions
    get cut at the text encoder's 77 tokens, very short ones teach little."""
    lengths = caption_lengths(captions)
    failed = captions.height - lengths.height
    median = float(lengths["words"].median() or 0)
    return histogram(
        lengths.to_pandas(),
        "words",
        by=by,
        lines=[(50, "#E45756")],
        labels={
            "x": "words per caption",
            "y": "captions",
            "fill": "",
            "title": f"{lengths.height} of {captions.height} frames captioned ({failed} failed), median "
            f"{median:.0f} words (dashed: about CLIP's 77-token limit)",
        },
        binwidth=1,
    )


def word_frequency_plot(freq: pl.DataFrame) -> p9.ggplot:
    """The most frequent caption words (``captions.word_frequencies``), most frequent on top."""
    order = freq["word"].to_list()[::-1]
    data = freq.to_pandas()
    data["word"] = categorical(data["word"], order)
    return (
        p9.ggplot(data, p9.aes("word", "count"))
        + p9.geom_col(fill="#4C78A8")
        + p9.coord_flip()
        + p9.labs(x="", y="captions containing it", title="most frequent words")
        + minimal_theme(6, max(2.5, 0.22 * len(order)), names=order)
    )
