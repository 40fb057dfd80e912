"""Issue 31.5: tables a person made (cluster moves in ``feedback`` and ``clusters``, typed captions
in ``caption_edits``) keep a backup of their last good version; a damaged one is restored from it
with a warning, and without a readable backup one line names the file and how to recover."""

from __future__ import annotations

import polars as pl
import pytest

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.userwork import backup_path, read_kept, write_kept


def _damage(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn file: no parquet footer


def test_damaged_table_is_restored_from_its_backup_or_named_in_one_line(tmp_path):
    path = tmp_path / "tables" / "feedback.parquet"
    path.parent.mkdir()
    first = pl.DataFrame({"event_id": ["a"], "label": [1]})
    write_kept(path, first)
    latest = pl.concat([first, pl.DataFrame({"event_id": ["b"], "label": [0]})])
    write_kept(path, latest)
    assert pl.read_parquet(backup_path(path)).equals(latest)  # the last good version, not the one before

    _damage(path)
    with pytest.warns(UserWarning, match=r"feedback.parquet was damaged .* restored from its backup"):
        assert read_kept(path).equals(latest)
    assert pl.read_parquet(path).equals(latest)
    assert len(list(backup_path(path).parent.glob("feedback.damaged-*.parquet"))) == 1  # kept to look at

    _damage(path)
    _damage(backup_path(path))
    with pytest.raises(StageError) as err:
        read_kept(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "no readable backup" in message and "move it aside to start the corrections over" in message


# The stages' side (04 and 05 on a damaged table) is in test/stages/captions/test_caption_reliability.py,
# beside the other tests on the demo run through stage 04 (one session fixture per xdist worker).
