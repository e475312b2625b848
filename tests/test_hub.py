"""Models by Hugging Face id: resolved through a Hugging Face cache the test lays out (the hub's
cache layout), offline; a local directory of the same spelling wins; an unknown id is one error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import minillama
from minillama.errors import CheckpointError
from minillama.hub import is_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """models--org--name/{refs/main, snapshots/<commit>/...}: what snapshot_download leaves behind."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    populate_cache(cache, "tiny-org/tiny-chat", tiny_chat_dir)
    # Set after huggingface_hub was imported (it reads them on import): still honoured.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local directory named like the id
    return cache


def test_an_id_in_the_cache_loads_like_its_directory(hub_cache: Path, tiny_chat_dir: Path) -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    by_id = minillama.from_pretrained("tiny-org/tiny-chat", dtype="float32")
    by_dir = minillama.from_pretrained(tiny_chat_dir, dtype="float32")
    assert torch.equal(by_id(ids), by_dir(ids))
    tok = minillama.load_tokenizer("tiny-org/tiny-chat")
    assert tok("hello").input_ids == minillama.load_tokenizer(tiny_chat_dir)("hello").input_ids


def test_a_local_directory_wins_over_an_id(hub_cache: Path, make_hf) -> None:
    _, other = make_hf("llama", seed=3)
    local = Path("tiny-org/tiny-chat")
    shutil.copytree(other, local)
    model = minillama.from_pretrained("tiny-org/tiny-chat", dtype="float32")
    assert model.config.vocab_size == 128  # make_hf's, not the cached byte-tokenizer model's 259


def test_an_unknown_id_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nobody/nothing: no such local directory, and not in the "
                                              r"Hugging Face cache .*offline"):
        minillama.from_pretrained("nobody/nothing")
    with pytest.raises(CheckpointError, match="nobody/nothing"):
        minillama.load_tokenizer("nobody/nothing")


def test_what_counts_as_an_id() -> None:
    assert is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_repo_id("gpt2")
    assert not any(map(is_repo_id, ["/abs/dir", "./rel", "a/b/c", "../up", "~/model", "a/", ""]))


def test_cli_takes_an_id(hub_cache: Path, tiny_chat_dir: Path, capsys) -> None:
    from minillama.cli import main

    argv = ["generate", "-p", "hi", "-n", "4", "--model"]
    assert main(argv + ["tiny-org/tiny-chat"]) == 0
    by_id = capsys.readouterr().out
    assert main(argv + [str(tiny_chat_dir)]) == 0
    assert by_id == capsys.readouterr().out and by_id.strip()  # the same model answers the same
    assert main(argv + ["nobody/nothing"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("minillama: error: nobody/nothing: no such local"), err


def test_online_ids_download_checkpoint_files_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online, the id goes to snapshot_download with the files a checkpoint needs (not the .bin,
    .gguf or original-format duplicates); a repository that does not exist is one clear error."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "nobody/nothing":
            raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    from minillama.hub import resolve_model

    assert resolve_model("some-org/some-model") == tmp_path
    kwargs = calls[0][1]
    assert "*.safetensors" in kwargs["allow_patterns"] and "*.bin" not in kwargs["allow_patterns"]
    assert "consolidated*" in kwargs["ignore_patterns"]
    with pytest.raises(CheckpointError, match="nobody/nothing: no such local directory, and no model with that id"):
        resolve_model("nobody/nothing")
