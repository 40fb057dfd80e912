"""Issue 31.8: a Hugging Face id that is not in the local cache is downloaded with a progress bar
when the hub can be reached (only the files the loader reads), taken from the cache the next time,
and is one line naming the id when it cannot be had (``HF_HUB_OFFLINE=1``, a hub out of reach).

No test touches the network: ``huggingface_hub.snapshot_download``, the boundary every download
goes through, is replaced by a fake hub that serves a tiny model folder built in code (with the
real tqdm class it is given, so the bar is the one a user sees)."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from diffusion_bunny.errors import ModelError
from diffusion_bunny.models import hub


class FakeHub:
    """``snapshot_download`` of a hub holding ``repos`` (id -> a folder to serve)."""

    def __init__(self, repos, tmp_path, reachable=True):
        self.repos, self.root, self.reachable = repos, tmp_path / "hub_cache", reachable
        self.downloads: list[dict] = []

    def __call__(self, repo_id, *, local_files_only=False, allow_patterns=None, tqdm_class=None, **kw):
        folder = self.root / repo_id.replace("/", "--")
        if local_files_only:
            if folder.is_dir():
                return str(folder)
            raise LocalEntryNotFoundError(f"{repo_id} is not cached")
        self.downloads.append(
            {"repo_id": repo_id, "allow_patterns": allow_patterns, "tqdm_class": tqdm_class}
        )
        if not self.reachable:
            raise ConnectionError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure)")
        files = sorted(p for p in self.repos[repo_id].rglob("*") if p.is_file())
        bar = tqdm_class(total=len(files), desc=f"Fetching {len(files)} files")
        shutil.copytree(self.repos[repo_id], folder)
        bar.update(len(files))
        bar.close()
        return str(folder)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_a_pipeline_not_in_the_cache_is_downloaded_with_a_bar_then_read_from_the_cache(
    tmp_path, monkeypatch, capsys, online
):
    import huggingface_hub

    from diffusion_bunny.models.diffusion import resolve_base_model

    tiny = resolve_base_model("tiny").path
    fake = FakeHub({"someone/tiny-sd": tiny}, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ref = resolve_base_model("someone/tiny-sd")
    assert (ref.family, ref.source) == ("sd1", "hub")
    assert (ref.path / "model_index.json").is_file()
    [download] = fake.downloads
    assert download["allow_patterns"] == hub.DIFFUSERS_FILES and download["tqdm_class"] is not None
    err = capsys.readouterr().err
    assert (
        "training.base_model = 'someone/tiny-sd' is not in the local Hugging Face cache: downloading it"
        in err
    )
    assert "Fetching" in err and "100%" in err  # the progress bar
    # The next time it comes from the cache: nothing is downloaded.
    assert resolve_base_model("someone/tiny-sd").path == ref.path
    assert len(fake.downloads) == 1


def test_offline_or_unreachable_is_one_line_naming_the_id(tmp_path, monkeypatch, online):
    import huggingface_hub

    from diffusion_bunny.models.diffusion import resolve_base_model

    fake = FakeHub({}, tmp_path, reachable=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelError) as err:
        resolve_base_model("someone/not-there", setting="generation.base_model")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("generation.base_model = 'someone/not-there' is not in the local Hugging Face")
    assert "could not be downloaded (ConnectionError: Failed to resolve 'huggingface.co'" in message
    assert len(fake.downloads) == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match=r"'someone/not-there' is not in .* HF_HUB_OFFLINE=1 forbids downloading"
    ):
        resolve_base_model("someone/not-there")
    assert len(fake.downloads) == 1  # offline: the hub was not asked


def test_a_clip_model_not_in_the_cache_is_downloaded(tmp_path, monkeypatch, online):
    import huggingface_hub
    from tiny_models import write_tiny_clip

    from diffusion_bunny.models.clip import ClipEmbedder

    fake = FakeHub({"someone/tiny-clip": write_tiny_clip(tmp_path / "tiny_clip")}, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    embedder = ClipEmbedder("someone/tiny-clip", device="cpu")
    assert embedder.dim > 0 and embedder.model_id == "someone/tiny-clip"
    assert fake.downloads[0]["allow_patterns"] == hub.TRANSFORMERS_FILES
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"scenes\.clip_model = 'someone/other' is not in the local"):
        ClipEmbedder("someone/other", device="cpu")
