"""Install layout: kernels/ is minillama.kernels, never a top-level `kernels` module."""

from __future__ import annotations

import subprocess
import sys


def test_kernels_live_under_minillama(tmp_path):
    code = ("import importlib.util, minillama.kernels; "
            "print(minillama.kernels.__name__, importlib.util.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["minillama.kernels", "True"]


def test_public_api():
    import minillama

    for name in ("from_pretrained", "save_pretrained", "load_tokenizer", "ModelConfig", "Transformer"):
        assert hasattr(minillama, name)


def test_plain_checkout_on_pythonpath_finds_the_kernels(tmp_path):
    """A GPU machine without a package index runs the checkout from PYTHONPATH, uninstalled: -S skips
    site-packages' .pth files (the editable install), so only PYTHONPATH can provide minillama."""
    import site
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import minillama.kernels, torch; from minillama.kernels import rms_norm; "
            "print(minillama.kernels.__file__, tuple(rms_norm(torch.ones(2, 4), torch.ones(4)).shape))")
    env = {"PYTHONPATH": f"{root}:{':'.join(site.getsitepackages())}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.split() == [str(root / "kernels" / "__init__.py"), "(2,", "4)"]
