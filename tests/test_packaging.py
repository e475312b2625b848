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
