"""Fused Triton norm kernels, installed as `minillama.kernels` (never as a top-level `kernels`
module, which would shadow Hugging Face's package of that name).

`rms_norm(x, weight, eps, *, residual=None, offset=0.0)` and
`layer_norm(x, weight, bias, eps, *, residual=None)` run Triton on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1 was set before Python started, and the equivalent torch code
otherwise (the same numbers); in eager CPU inference the C++ kernels of `kernels/cpu.py` (the
same numbers but for the order of one sum). `torch_path()` forces the torch code. The Triton path goes through torch.library custom ops
(`minillama::rms_norm_fwd`, `..._bwd`, `minillama::layer_norm_fwd`, `..._bwd`) with fake
implementations and autograd, so torch.compile(fullgraph=True) sees each as one op.
"""

from ._common import torch_path
from .layer_norm import layer_norm
from .rms_norm import rms_norm

__all__ = ["layer_norm", "rms_norm", "torch_path"]
