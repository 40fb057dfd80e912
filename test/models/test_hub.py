"""A Hugging Face id that is not in the local cache is downloaded with a progress bar
when the hub can be reached (only the files the loader reads), taken from the cache the next time,
and is one line naming the id when it cannot be had (``HF_HUB_OFFLINE=1``, a hub out of reach).

No test touches the network: ``huggingface_hub.snapshot_download``, the boundary every download
goes through, is replaced by a fake hub that serves a tiny model folder built in code (with the
real tqdm class it is given, so the bar is the one a user sees). What a download leaves is checked
on a real cache: written on disk with huggingface_hub's own functions, the way its download writes
it (tree listing, blobs, snapshot symlinks, refs), and read by the real ``snapshot_download``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

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
            {
                "repo_id": repo_id,
                "allow_patterns": allow_patterns,
                "ignore_patterns": kw.get("ignore_patterns"),
                "tqdm_class": tqdm_class,
            }
        )
        if not self.reachable:
            raise ConnectionError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure)")
        files = sorted(p for p in self.repos[repo_id].rglob("*") if p.is_file())
        bar = tqdm_class(total=len(files), desc=f"Fetching {len(files)} files")
        shutil.copytree(self.repos[repo_id], folder, dirs_exist_ok=True)
        bar.update(len(files))
        bar.close()
        return str(folder)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


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
    # The safety checker's weights (1.2 GB for SD 1.5; never read) are not fetched, as
    # huggingface_hub applies the patterns.
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "text_encoder/model.safetensors",
    ]
    fetched = filter_repo_objects(
        repo, allow_patterns=download["allow_patterns"], ignore_patterns=download["ignore_patterns"]
    )
    assert "safety_checker/model.safetensors" not in set(fetched)
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} <= set(
        filter_repo_objects(repo, allow_patterns=hub.DIFFUSERS_FILES, ignore_patterns=hub.IGNORED_FILES)
    )
    err = capsys.readouterr().err
    assert (
        "train.base_model = 'someone/tiny-sd' is not in the local Hugging Face cache: downloading it" in err
    )
    assert "Fetching" in err and "100%" in err  # the progress bar
    # The next time it comes from the cache: nothing is downloaded.
    assert resolve_base_model("someone/tiny-sd").path == ref.path
    assert len(fake.downloads) == 1


def test_a_snapshot_without_its_weights_is_downloaded_again(tmp_path, monkeypatch, online):
    """huggingface_hub tells a snapshot cut short only from its tree listing, which a file
    fetched on its own (``hf download ID model_index.json``) or an older cache lacks: a folder
    of configs was taken as the model, never downloaded again, and failed to load every run."""
    import huggingface_hub

    from diffusion_bunny.models.diffusion import resolve_base_model

    tiny = resolve_base_model("tiny").path
    fake = FakeHub({"someone/tiny-sd": tiny}, tmp_path)
    partial = fake.root / "someone--tiny-sd"
    partial.mkdir(parents=True)
    shutil.copy(tiny / "model_index.json", partial)  # the index alone
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert not hub.weights_complete(partial)
    ref = resolve_base_model("someone/tiny-sd")
    assert len(fake.downloads) == 1 and hub.weights_complete(ref.path)
    # A part's weights gone (its config there): incomplete too; the unread safety checker is not needed.
    weights = next((ref.path / "unet").glob("*.safetensors"))
    (ref.path / "safety_checker").mkdir()
    (ref.path / "safety_checker" / "config.json").write_text("{}")
    assert hub.weights_complete(ref.path)
    # A folder the index does not name (SDXL's ONNX exports: a config and a model.onnx) is none
    # of the pipeline's parts.
    (ref.path / "vae_decoder").mkdir()
    (ref.path / "vae_decoder" / "config.json").write_text("{}")
    (ref.path / "vae_decoder" / "model.onnx").write_bytes(b"onnx")
    assert hub.weights_complete(ref.path)
    weights.unlink()
    assert not hub.weights_complete(ref.path)


def test_offline_or_unreachable_is_one_line_naming_the_id(tmp_path, monkeypatch, online):
    import huggingface_hub

    from diffusion_bunny.models.diffusion import resolve_base_model

    fake = FakeHub({}, tmp_path, reachable=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelError) as err:
        resolve_base_model("someone/not-there", setting="generate.base_model")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("generate.base_model = 'someone/not-there' is not in the local Hugging Face")
    assert "could not be downloaded (ConnectionError: Failed to resolve 'huggingface.co'" in message
    assert len(fake.downloads) == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match=r"'someone/not-there' is not in .* HF_HUB_OFFLINE=1 forbids downloading"
    ):
        resolve_base_model("someone/not-there")
    assert len(fake.downloads) == 1  # offline: the hub was not asked
    # transformers' own variable says the same to huggingface_hub: named, not "check the network".
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(
        ModelError, match=r"TRANSFORMERS_OFFLINE=1 forbids downloading it; unset TRANSFORMERS_OFFLINE"
    ):
        resolve_base_model("someone/not-there")
    assert len(fake.downloads) == 1


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
    # A hub id whose cached snapshot does not load: said so, not "not a hub id".
    cached = fake.root / "someone--tiny-clip"
    next(cached.glob("*.safetensors")).write_bytes(b"damaged")
    with pytest.raises(
        ModelError, match=r"'someone/tiny-clip' from its cached snapshot .*someone--tiny-clip: "
    ):
        ClipEmbedder("someone/tiny-clip", device="cpu")


# ---------------------------------------------------------------------------------------------
# A real Hugging Face cache on disk (no fake of snapshot_download)


def lay_out_hub_cache(
    cache: Path, repo_id: str, repo: Path, extra: dict[str, bytes], patterns: list[str]
) -> Path:
    """Write ``repo_id`` into the hub cache at ``cache`` exactly as ``snapshot_download(...,
    allow_patterns=patterns)`` leaves it, with huggingface_hub's own functions: the repository's
    tree listing (every file of ``repo`` and ``extra``: the fp16 variants and single-file
    checkpoints a real repository also holds) in ``trees/<commit>.json``, the matching files as
    blobs named by their hash with symlinks under ``snapshots/<commit>/``, and ``refs/main``.
    Returns the snapshot folder."""
    import hashlib

    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _chmod_and_move,
        _create_symlink,
        _get_pointer_path,
        repo_folder_name,
    )
    from huggingface_hub.utils import filter_repo_objects

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    files = {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}
    files.update(extra)

    def git_sha(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    entries = {}
    for name, data in files.items():
        lfs = name.endswith((".safetensors", ".ckpt", ".bin"))
        sha256 = hashlib.sha256(data).hexdigest()
        entries[name] = TreeCacheEntry(
            size=len(data),
            blob_id=git_sha(data),
            lfs_sha256=sha256 if lfs else None,
            lfs_size=len(data) if lfs else None,
        )
    (storage / "trees").mkdir(parents=True)
    write_tree_cache(str(storage), commit, entries)
    for name in filter_repo_objects(items=list(files), allow_patterns=patterns):
        entry = entries[name]
        blob = storage / "blobs" / (entry.lfs_sha256 or entry.blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        incomplete = blob.with_name(blob.name + ".incomplete")
        incomplete.write_bytes(files[name])
        _chmod_and_move(incomplete, blob)
        pointer = Path(_get_pointer_path(str(storage), commit, name))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=True)
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return storage / "snapshots" / commit


def test_a_model_downloaded_with_allow_patterns_loads_offline_from_a_real_cache(tmp_path, monkeypatch):
    """Issue: the cache check asked for the whole snapshot, and huggingface_hub's tree listing
    (written by every download) then called a download made with allow_patterns incomplete, so
    under HF_HUB_OFFLINE=1 a model bunny had downloaded was refused. The cache here is written
    by huggingface_hub's own functions, as its download writes it."""
    import huggingface_hub

    from diffusion_bunny.models.diffusion import load_pipeline, resolve_base_model

    tiny = resolve_base_model("tiny").path
    cache = tmp_path / "hf"
    variants = {
        "unet/diffusion_pytorch_model.fp16.safetensors": b"\0" * 64,
        "v1-5-pruned-emaonly.ckpt": b"\0" * 128,
        "README.md": b"# a model card\n",
    }
    snapshot = lay_out_hub_cache(cache, "someone/tiny-sd", tiny, variants, hub.DIFFUSERS_FILES)
    assert not (snapshot / "v1-5-pruned-emaonly.ckpt").exists()  # what allow_patterns left out
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # huggingface_hub itself calls the snapshot incomplete when asked for all of it.
    from huggingface_hub.errors import IncompleteSnapshotError

    with pytest.raises(IncompleteSnapshotError):
        huggingface_hub.snapshot_download("someone/tiny-sd", local_files_only=True)
    ref = resolve_base_model("someone/tiny-sd")
    assert ref.source == "hub" and ref.path == snapshot
    pipe = load_pipeline(ref, device="cpu")
    assert pipe.unet is not None

    # A download that was cut short (a file the patterns ask for is missing) is not taken.
    (snapshot / "unet" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"'someone/tiny-sd' is not in the local Hugging Face cache"):
        resolve_base_model("someone/tiny-sd")


def test_a_clip_model_downloaded_with_allow_patterns_loads_offline(tmp_path, monkeypatch):
    import huggingface_hub
    from tiny_models import write_tiny_clip

    from diffusion_bunny.models.clip import ClipEmbedder

    folder = write_tiny_clip(tmp_path / "tiny_clip")
    extra = {"pytorch_model.bin": b"\0" * 64, "flax_model.msgpack": b"\0" * 32}
    lay_out_hub_cache(tmp_path / "hf", "someone/tiny-clip", folder, extra, hub.TRANSFORMERS_FILES)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = ClipEmbedder("someone/tiny-clip", device="cpu")
    assert embedder.dim > 0
    # A blob cut short (a copy of the cache stopped midway): the message named only the setting,
    # and the same damaged copy failed on every run. It names the repository's folder to delete.
    snapshot = next((tmp_path / "hf" / "models--someone--tiny-clip" / "snapshots").iterdir())
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    repo = tmp_path / "hf" / "models--someone--tiny-clip"
    says = rf"if its cached copy is damaged .*, delete {re.escape(str(repo))} to fetch it again"
    with pytest.raises(ModelError, match=says):
        ClipEmbedder("someone/tiny-clip", device="cpu")
    assert hub.snapshot_hint(tmp_path / "tiny_clip", OSError()) == ""  # a folder of the user's own
    # A model of another kind (the code's own ValueError): downloaded again it is the same.
    assert hub.snapshot_hint(snapshot, ValueError("it holds a 'owlv2' model, not CLIP")) == ""


def test_a_sharded_model_cut_short_in_a_shard_is_not_whole(tmp_path):
    """Any one ``*.safetensors`` counted as the weights: a download cut short in its last shard
    was taken as whole, never fetched again, and every run failed on the missing shard."""
    import json

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = {"weight_map": {f"layer.{i}": shard for i, shard in enumerate(shards)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in shards[:2]:
        (folder / shard).write_bytes(b"w")
    assert not hub.weights_complete(folder)
    (folder / shards[2]).write_bytes(b"w")
    assert hub.weights_complete(folder)


def test_a_cache_that_cannot_be_written_names_the_cache_not_the_network(tmp_path, monkeypatch, online):
    import errno

    import huggingface_hub

    def unwritable(*args, **kwargs):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "afile" / "hub"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unwritable)
    with pytest.raises(ModelError) as err:
        hub.download("someone/clip", "scenes.clip_model", hub.TRANSFORMERS_FILES, instead="a folder")
    message = str(err.value)
    assert "the Hugging Face cache" in message and "cannot be written" in message and "HF_HOME" in message
    assert "check the id and the network" not in message


def test_models_that_load_but_cannot_work_are_one_line(tmp_path):
    """An OWLv2 folder as scenes.clip_model loaded as CLIP with random weights; a folder without
    its tokenizer files loaded with an empty tokenizer, and every text embedded alike."""
    from tiny_models import write_tiny_owlv2

    from diffusion_bunny.models.clip import ClipEmbedder
    from diffusion_bunny.models.diffusion import load_pipeline, resolve_base_model
    from diffusion_bunny.models.hub_characters.finder import _load_owlv2

    owl = write_tiny_owlv2(tmp_path / "owl")
    with pytest.raises(ModelError, match=r"it holds a 'owlv2' model, not CLIP"):
        ClipEmbedder(str(owl), device="cpu")
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (owl / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match=r"characters\.hub\.detector .*no usable tokenizer"):
        _load_owlv2(str(owl), "cpu")
    sd = tmp_path / "sd"
    shutil.copytree(resolve_base_model("tiny").path, sd)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (sd / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match=r"train\.base_model = .* has no usable tokenizer"):
        load_pipeline(str(sd), device="cpu")


def test_a_repository_with_pytorch_bin_weights_only_is_fetched_and_loads_offline(
    tmp_path, monkeypatch, online
):
    """An older repository holds ``pytorch_model.bin`` and no safetensors: only safetensors were
    fetched, so it was "downloaded" on every run and never loaded. Its .bin weights are fetched
    when it has no safetensors (a repository with both keeps to the safetensors), and the cached
    snapshot is found offline."""
    import huggingface_hub
    import torch
    from huggingface_hub.utils import filter_repo_objects
    from tiny_models import write_tiny_clip
    from transformers import CLIPModel

    from diffusion_bunny.models.clip import ClipEmbedder

    repo = write_tiny_clip(tmp_path / "tiny_clip")
    torch.save(CLIPModel.from_pretrained(repo).state_dict(), repo / "pytorch_model.bin")
    (repo / "model.safetensors").unlink()
    assert (repo / "pytorch_model.bin").is_file()
    asked: list[list[str]] = []

    def snapshot(repo_id, *, local_files_only=False, allow_patterns=None, **kw):
        folder = tmp_path / "served" / repo_id.replace("/", "--")
        if local_files_only:
            raise LocalEntryNotFoundError(repo_id)
        asked.append(list(allow_patterns))
        files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(items=files, allow_patterns=allow_patterns):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, folder / name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    folder = hub.hub_model("someone/clip-bin", "scenes.clip_model", hub.TRANSFORMERS_FILES, instead="x")
    assert len(asked) == 2 and "pytorch_model.bin" in asked[1] and "pytorch_model.bin" not in asked[0]
    assert (folder / "pytorch_model.bin").is_file() and hub.weights_complete(folder)

    # As the download leaves it in a real cache: found offline, and loads.
    monkeypatch.undo()
    lay_out_hub_cache(tmp_path / "hf", "someone/clip-bin", repo, {}, hub.TRANSFORMERS_FILES + hub.BIN_FILES)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ClipEmbedder("someone/clip-bin", device="cpu").dim > 0


def test_a_librarys_reason_is_one_line_cut_at_a_word():
    """A loader's or a download's reason inside our line, on one line and cut where a word ends
    (it read "...we cannot find the appropriate sna...")."""
    long = OSError("We couldn't connect to 'https://huggingface.co'\n to load the files, and " + "x y " * 60)
    text = hub.short_reason(long, 60)
    assert text == "We couldn't connect to 'https://huggingface.co' to load..."
    assert hub.short_reason(ValueError()) == "ValueError" and hub.short_reason(OSError("short")) == "short"
    assert hub.short_reason(OSError("a" * 300), 50) == "a" * 47 + "..."  # no word to cut at
    assert hub._reason(OSError("")) == "OSError" and hub._reason(OSError("gone")) == "OSError: gone"


def test_the_workspace_cache_expands_a_home_in_xdg_cache_home(monkeypatch):
    """A quoted ``XDG_CACHE_HOME="~/c"`` was a folder named ``~`` in the working folder."""
    from diffusion_bunny.models.cache import cache_dir

    monkeypatch.delenv("DIFFUSION_BUNNY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "~/c")
    assert cache_dir() == Path.home() / "c" / "diffusion-bunny"
