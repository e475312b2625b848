"""Install layout: kernels/ is minillama.kernels, never a top-level `kernels` module."""

from __future__ import annotations

import subprocess
import sys

import torch


def test_kernels_live_under_minillama(tmp_path):
    code = ("import importlib.util, minillama.kernels; "
            "print(minillama.kernels.__name__, importlib.util.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["minillama.kernels", "True"]


def test_public_api():
    """The names the README's API section uses are the library's own objects, with its arguments."""
    import dataclasses
    import inspect

    import minillama
    from minillama import checkpoint, config, model, tokenizer

    assert minillama.Transformer is model.Transformer and issubclass(minillama.Transformer, torch.nn.Module)
    assert minillama.ModelConfig is config.ModelConfig and dataclasses.is_dataclass(minillama.ModelConfig)
    assert minillama.from_pretrained is checkpoint.from_pretrained
    assert minillama.save_pretrained is checkpoint.save_pretrained
    assert minillama.load_tokenizer is tokenizer.load_tokenizer
    documented = {"dtype", "device", "norm", "prepack", "quantize", "tensor_parallel", "device_map", "offload_folder"}
    assert documented <= set(inspect.signature(minillama.from_pretrained).parameters)
    assert {"rmsnorm", "rmsnorm-torch", "layernorm"} <= set(minillama.NORMS)


def test_plain_checkout_through_a_linked_package_finds_the_kernels(tmp_path):
    """A GPU machine without a package index runs the checkout uninstalled, as tools/gpu_check.sh does:
    PYTHONPATH holds a directory with only a link to minillama/ (never the checkout root, where
    kernels/ would also be a top-level `kernels`, Hugging Face's package name). -S skips
    site-packages' .pth files (the editable install), so only that link can provide minillama; the
    checkout's kernels/ is then minillama.kernels and nothing else."""
    import site
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "minillama").symlink_to(root / "minillama")
    code = ("import importlib.util, minillama.kernels, torch; from minillama.kernels import rms_norm, _common; "
            "print(minillama.kernels.__file__, _common.__name__, "
            "tuple(rms_norm(torch.ones(2, 4), torch.ones(4)).shape), "
            "importlib.util.find_spec('kernels') is None, importlib.util.find_spec('minillama.tools') is None)")
    env = {"PYTHONPATH": f"{tmp_path / 'path'}:{':'.join(site.getsitepackages())}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-S", "-P", "-c", code], cwd=root, capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.split() == [str(root / "kernels" / "__init__.py"), "minillama.kernels._common", "(2,", "4)",
                                  "True", "True"]
