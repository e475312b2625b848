"""The decoder: blocks of grouped-query attention and a gated MLP (SwiGLU, GeGLU), with RoPE and
tied embeddings, for every family in config.FAMILIES.

Layout choices: q/k/v are one fused projection and gate/up another (fewer, larger matmuls;
checkpoint.py slices HF's separate tensors into them). Norms come from the registry by name, at
every site (pre, post, q/k, final). What a family does differently is a ModelConfig field; the
optional parts it switches are None when unused, so Llama's path stays as short as it was.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .errors import GenerationError
from .kv_cache import KVCache
from .linear import Linear, ordinary_tensors, unpack_model
from .loss import linear_cross_entropy, reference_cross_entropy
from .norms import build_norm
from .rope import RotaryEmbedding, apply_rope

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _out_of_range(values: torch.Tensor, end: int) -> int | None:
    """The smallest or largest value when it falls outside [0, end), else None (one host read)."""
    lo, hi = torch.stack(values.aminmax()).tolist()
    return int(lo) if lo < 0 else int(hi) if hi >= end else None


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "input_ids") -> None:
    """GenerationError unless every id is in [0, vocab_size).

    An out-of-range id would raise an IndexError in the embedding on CPU and a device-side assert
    on CUDA, which poisons the CUDA context for the rest of the process: check before the lookup.
    """
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GenerationError(f"{what}: token ids must be integers, got {ids.dtype}")
    bad = _out_of_range(ids, vocab_size) if ids.numel() else None
    if bad is not None:
        raise GenerationError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def _norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """One norm site of `cfg`'s model: the registry's norm with the family's gain."""
    return build_norm(cfg.norm, dim, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_fp32_gain)


class Attention(nn.Module):
    """Multi-head attention with n_kv <= n_heads key/value heads (MHA, GQA, MQA).

    Optional parts, switched by the config: biases (q/k/v, o), q/k RMSNorm over each head or the
    whole projection, partial or no RoPE (the caller passes cos/sin or None), a score scale and a
    tanh soft-cap on the scores.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_dim, self.qk_dim = q_dim, q_dim + kv_dim
        self.wqkv = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:  # "head": over each head's head_dim; "proj": over the whole projection
            per_head = cfg.qk_norm == "head"
            self.q_norm = _norm(cfg, self.head_dim if per_head else q_dim)
            self.k_norm = _norm(cfg, self.head_dim if per_head else kv_dim)
        self.scale = cfg.attn_scale  # None: SDPA's head_dim ** -0.5
        self.softcap = cfg.attn_softcap
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
        mask: torch.Tensor | None, input_pos: torch.Tensor | None, kv_len: int, causal: bool,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        qkv = self.wqkv(x)
        if self.q_norm is None:
            # q and k heads side by side take one rotation (half the small ops of an eager decode step).
            qk = qkv[..., :self.qk_dim].view(bsz, seqlen, self.n_heads + self.n_kv, self.head_dim)
            if cos is not None:
                qk = apply_rope(qk, cos, sin)
            q, k = qk.split((self.n_heads, self.n_kv), dim=2)
        else:
            q, k = qkv[..., :self.q_dim], qkv[..., self.q_dim:self.qk_dim]
            if self.qk_norm == "proj":  # OLMo 2: before the split into heads
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.reshape(bsz, seqlen, self.n_heads, self.head_dim)
            k = k.reshape(bsz, seqlen, self.n_kv, self.head_dim)
            if self.qk_norm == "head":  # Qwen3, Gemma 3: rows of head_dim
                q, k = self.q_norm(q), self.k_norm(k)
            if cos is not None:  # again one rotation for both (a copy is cheaper than a second rotation)
                q, k = apply_rope(torch.cat((q, k), dim=2), cos, sin).split((self.n_heads, self.n_kv), dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = qkv[..., self.qk_dim:].view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, kv_len, rows)
        if seqlen == 1 and torch.compiler.is_compiling():
            y = self._one_query(q, k, v, mask)
        elif self.softcap is not None:
            y = self._softcapped(q, k, v, mask, causal)
        else:
            # causal (given, with no mask): SDPA's causal mask, aligned to the first key.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
            )
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of one query per row as plain matmuls and a softmax (fp32), for a compiled
        decode step: Inductor fuses them, where the CPU's SDPA kernel spends ~150 us per layer on
        one query over a masked static cache (profiled: a quarter of an int8 SmolLM2 step)."""
        bsz, _, _, hd = q.shape
        qg = q.view(bsz, self.n_kv, self.n_heads // self.n_kv, hd).float()  # query heads grouped by kv head
        scores = qg @ k.float().transpose(-1, -2) * (self.scale if self.scale is not None else hd**-0.5)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask [batch|1, 1, 1, keys] broadcasts
        y = torch.softmax(scores, dim=-1) @ v.float()
        return y.view(bsz, self.n_heads, 1, hd).to(q.dtype)

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    causal: bool) -> torch.Tensor:
        """Attention with tanh-capped scores (Gemma 2), which SDPA cannot do: scores in the model
        dtype, capped, masked, a softmax in fp32 rounded back, as transformers' eager attention."""
        if self.n_kv != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) * (self.scale if self.scale is not None else self.head_dim**-0.5)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None and causal:  # aligned to the first key, as SDPA's is_causal
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), with gate and up as one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACT_FNS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(self.act(gate) * up)


class Block(nn.Module):
    """One residual block. Pre-norm (Llama): h = x + attn(norm(x)); out = h + mlp(norm(h)). Post-norm
    (OLMo 2): h = x + norm(attn(x)). Sandwich (Gemma 2/3): both. The add of each sublayer's output
    happens in the next norm (the pre-norm's fused "add, then normalise" kernel) or, without one, here.

    What differs per layer (sliding window, which RoPE) is read from the config once, here.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        pre, post = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("post", "sandwich")
        self.attn_norm = _norm(cfg, cfg.hidden_size) if pre else None
        self.attn = Attention(cfg)
        self.post_attn_norm = _norm(cfg, cfg.hidden_size) if post else None
        self.mlp_norm = _norm(cfg, cfg.hidden_size) if pre else None
        self.mlp = MLP(cfg)
        self.post_mlp_norm = _norm(cfg, cfg.hidden_size) if post else None
        self.residual_scale = cfg.residual_scale  # Granite scales each sublayer's output
        self.window = cfg.layer_window(layer)  # picks this layer's mask in Transformer.forward
        self.rope_kind = cfg.layer_rope(layer)  # "global", "local" or None (no RoPE)

    def _sublayer_out(self, y: torch.Tensor, post_norm: nn.Module | None) -> torch.Tensor:
        if post_norm is not None:
            y = post_norm(y)
        return y if self.residual_scale == 1.0 else y * self.residual_scale

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
        mask: torch.Tensor | None, input_pos: torch.Tensor | None, kv_len: int, causal: bool,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream): the mlp output is added by the next block (or the final norm)."""
        y, h = _add_norm(self.attn_norm, x, residual)
        a = self._sublayer_out(self.attn(y, cos, sin, mask, input_pos, kv_len, causal, rows), self.post_attn_norm)
        y, h = _add_norm(self.mlp_norm, a, h)
        return self._sublayer_out(self.mlp(y), self.post_mlp_norm), h


def _add_norm(norm: nn.Module | None, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h), h) with h = x + residual; (h, h) where the block has no norm there (post-norm)."""
    if norm is not None:
        return norm.add_norm(x, residual)
    h = x if residual is None else x + residual
    return h, h


class Transformer(nn.Module):
    """A decoder of any family in config.FAMILIES. `model(input_ids)` returns logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.generation_config: dict = {}  # generation_config.json of the checkpoint, kept for saving
        # Training: recompute each block's activations in backward instead of storing them.
        self.gradient_checkpointing = False
        # Given its (uninitialised) weight, nn.Embedding skips its own init: init_weights below does
        # it, and on meta (a model built to load into) torch's normal_ imports torch._dynamo, ~2 s.
        shape = (cfg.vocab_size, cfg.hidden_size)
        self.embed = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg, cfg.hidden_size)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        with torch.device("cpu"):  # frequencies are real numbers even when the model is built on meta
            self.rope = RotaryEmbedding(cfg)
            # Gemma 3's sliding layers turn at their own base: a second set of frequencies.
            self.rope_local = RotaryEmbedding(cfg, cfg.rope_local) if cfg.rope_local is not None else None
        if self.embed.weight.device.type != "meta":
            self._place_rope(self.embed.weight.device)  # built under torch.device("cuda"): there from the start
            self.init_weights()

    def _place_rope(self, device: torch.device | str) -> None:
        for rope in (self.rope, self.rope_local):
            if rope is not None:
                rope.place(device)

    def norm_sites(self) -> list[str]:
        """Where this model's norms sit: each block's ("attn_norm", ..., "q_norm [head_dim 64]") then
        "final"; each runs once per forward (a q/k norm over all heads in one call)."""
        sites = []
        if len(self.layers):
            block = self.layers[0]
            for name in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"):
                if getattr(block, name) is not None:
                    sites.append(name)
            for name in ("q_norm", "k_norm"):
                norm = getattr(block.attn, name)
                if norm is not None:
                    sites.append(f"{name} [{block.attn.qk_norm}: {norm.weight.shape[0]}]")
        return sites + ["final"]

    def train(self, mode: bool = True) -> Transformer:
        """As nn.Module.train; training also drops the prepacked inference copies (minillama/linear.py)."""
        if mode:
            unpack_model(self)
        return super().train(mode)

    def compile_blocks(self, **options: Any) -> None:
        """Regional compilation (for training): torch.compile each decoder block on its own.

        Every block runs the same code on its own parameters, so one compiled graph (per grad
        mode and first-block/other-block signature) serves all of them: compiling takes seconds
        where the whole model would take minutes, and the math is unchanged (tested against the
        eager run). The fused norms' backward runs through their registered ops. Dynamic shapes
        from the first call: a fine-tune's batches differ in length, and torch.compile's default
        would compile each signature twice (static for the first length, then dynamic).
        """
        for block in self.layers:
            block.compile(**{"fullgraph": True, "dynamic": True, **options})

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection when the config says so (unless
        lm_head is quantized: it then holds its own integer copy)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh-model init as transformers does it: N(0, 0.02) matrices, zero biases, norms left as built."""
        std = float(self.config.extra.get("initializer_range", 0.02))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def setup_cache(
        self, max_batch_size: int, max_seq_len: int,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        """Preallocate every layer's KV cache for up to `max_batch_size` x `max_seq_len` tokens
        (on the device that layer runs on, when the model is spread over several: minillama/offload.py)."""
        from .offload import execution_device

        dtype = dtype or self.embed.weight.dtype
        cfg = self.config
        # Ordinary tensors even under torch.inference_mode: the cache is reused by later calls,
        # which may run outside it (an inference tensor cannot be written in place there).
        with ordinary_tensors():
            for layer in self.layers:
                layer.attn.kv_cache = KVCache(
                    max_batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim, dtype,
                    device or execution_device(layer) or self.input_device,
                )
            # The rotary frequencies where the positions will be (normally there since the load):
            # a forward that moved them would make a compiled one guard on the old device.
            self._place_rope(device or self.input_device)

    @property
    def input_device(self) -> torch.device:
        """Where input ids belong: the embedding's device (the device it runs on, when dispatched)."""
        from .offload import execution_device

        return execution_device(self.embed) or self.embed.weight.device

    def clear_cache(self) -> None:
        """Free the KV caches."""
        for layer in self.layers:
            layer.attn.kv_cache = None

    @property
    def kv_cache(self) -> KVCache | None:
        """The first layer's KV cache (every layer's has the same shape), None when none is set up."""
        return self.layers[0].attn.kv_cache if len(self.layers) else None

    @property
    def cache_len(self) -> int:
        """Slots in the KV cache (0 when none is set up)."""
        cache = self.kv_cache
        return cache.max_seq_len if cache is not None else 0

    def _check_slots(self, input_pos: torch.Tensor, rows: torch.Tensor | None, bsz: int, seqlen: int) -> None:
        cache = self.kv_cache
        if cache is None:
            return  # forward() says so
        if input_pos.shape not in ((seqlen,), (bsz, seqlen)):
            raise GenerationError(f"input_pos must hold one slot per token ([{seqlen}] or [{bsz}, {seqlen}]), "
                                  f"got shape {list(input_pos.shape)}")
        if rows is None and bsz > cache.k.shape[0]:
            raise GenerationError(f"batch of {bsz} rows; the KV cache holds {cache.k.shape[0]} (setup_cache)")
        if rows is not None:
            if rows.shape != (bsz,):
                raise GenerationError(f"cache_rows must name one cache row per batch row ({bsz}), got shape "
                                      f"{list(rows.shape)}")
            bad = _out_of_range(rows, cache.k.shape[0])
            if bad is not None:
                raise GenerationError(f"cache_rows: row {bad} is outside the KV cache's {cache.k.shape[0]} rows")
        bad = _out_of_range(input_pos, cache.max_seq_len)
        if bad is not None:
            raise GenerationError(f"input_pos: slot {bad} is outside the KV cache "
                                  f"[0, {cache.max_seq_len}) (setup_cache(max_seq_len=...))")

    def _mask(
        self, q_pos: torch.Tensor, kv_len: int, padding_mask: torch.Tensor | None, window: int | None
    ) -> torch.Tensor:
        """Boolean mask [batch|1, 1, q, kv] for query slots q_pos ([q] or [batch, q]): causal, within
        the sliding window (if any), not padding."""
        q_pos = q_pos[None] if q_pos.dim() == 1 else q_pos
        diff = q_pos[:, None, :, None] - torch.arange(kv_len, device=q_pos.device)
        allowed = diff >= 0
        if window is not None:
            allowed &= diff < window
        if padding_mask is not None:
            # Every query keeps its own key: a padded query would otherwise see nothing and turn into NaN.
            allowed = (allowed & padding_mask[:, None, None, :kv_len].bool()) | (diff == 0)
        return allowed

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
        validate: bool = True,
        cache_rows: torch.Tensor | None = None,
        kv_len: int | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] for `input_ids` [batch, seq].

        input_pos: KV-cache slots [seq] of these tokens (needs `setup_cache`), or [batch, seq] when
            rows sit at different slots (continuous batching); None runs a plain causal forward
            over `input_ids` alone without touching the cache.
        position_ids: RoPE positions [batch, seq] when they differ from the slots (left padding).
        padding_mask: [batch, slots] with 1 for real tokens and 0 for padding.
        last_only: project only the last position to the vocabulary (prefill for generation).
        labels: [batch, seq] next-token ids per position (-100: no loss); returns the summed fp32
            cross-entropy instead of logits, without materialising them (see minillama/loss.py).
        validate: check token ids and cache slots first (GenerationError; one host sync on a GPU).
            Skipped under torch.compile; generation's own decode steps pass False.
        cache_rows: the KV-cache rows [batch] these inputs use (default: the first `batch`).
        kv_len: attend over the first kv_len cache slots, when the caller knows the last slot
            written (a decode loop does): default, that slot read back from input_pos, or on a GPU
            and under torch.compile every slot (reading it back would wait for the device).
        hidden: return the final norm's output [batch, seq, hidden] instead of logits; `logits(h)`
            projects any slice of it, so a caller scoring many positions (lm-eval, prompt logprobs)
            never holds [seq, vocab] whole.
        """
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        bsz, seqlen = input_ids.shape
        if validate and not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.config.vocab_size)
            if input_pos is not None:
                self._check_slots(input_pos, cache_rows, bsz, seqlen)
                if kv_len is not None and not int(input_pos.max()) < kv_len <= self.cache_len:
                    raise GenerationError(f"kv_len {kv_len} must cover the slots written (up to "
                                          f"{int(input_pos.max())}) and fit the cache ({self.cache_len})")
        if input_pos is None:
            q_pos = torch.arange(seqlen, device=input_ids.device)
            kv_len, static = seqlen, False
        else:
            if self.cache_len == 0:
                raise GenerationError("input_pos given but no KV cache: call model.setup_cache(...) first")
            # Tokens attend up to the last slot they write; from slot 0 (prefill) that is plain causal
            # attention, whose kernel skips the masked half. Under torch.compile (a decode step, a
            # speculative verify step) or for one new token on a GPU, tokens attend over every
            # slot instead: static shapes make one graph for every step, and reading the position
            # back would sync with the GPU.
            q_pos = input_pos
            static = kv_len is None and (torch.compiler.is_compiling() or (seqlen == 1 and input_pos.device.type != "cpu"))
            if kv_len is None:
                kv_len = self.cache_len if static else int(input_pos.max()) + 1
        if position_ids is None:
            position_ids = q_pos if q_pos.dim() == 2 else q_pos[None]
        # One mask per distinct window among the layers (full and sliding layers differ). No mask
        # when causal attention says it all: a prompt from slot 0, or one token reading every slot
        # up to its own (rows at different slots always need one).
        masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        for window in {layer.window for layer in self.layers}:
            unmasked = (padding_mask is None and (window is None or kv_len <= window) and q_pos.dim() == 1
                        and (kv_len == seqlen or (seqlen == 1 and not static)))
            # Unmasked, one query sees every key it is given (SDPA's is_causal would align it to the
            # first key); several start from key 0, where both alignments agree. Decided here, where
            # the length is a number (inside a compiled block it may be symbolic) and made a plain
            # bool even where it is symbolic here too (a compiled prefill): SDPA takes no SymBool.
            masks[window] = (None if unmasked else self._mask(q_pos, kv_len, padding_mask, window),
                             True if unmasked and seqlen > 1 else False)

        x = self._embed(input_ids)
        ropes = {None: (None, None)}
        for kind, rope in (("global", self.rope), ("local", self.rope_local)):
            if rope is not None:  # [batch, seq, 1 (heads), rotary dim]
                ropes[kind] = tuple(t.unsqueeze(2) for t in rope(position_ids, x.dtype))
        residual = None
        for layer in self.layers:
            (cos, sin), (mask, causal) = ropes[layer.rope_kind], masks[layer.window]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, residual = checkpoint(layer, x, residual, cos, sin, mask, input_pos, kv_len, causal,
                                          cache_rows, use_reentrant=False)
            else:
                x, residual = layer(x, residual, cos, sin, mask, input_pos, kv_len, causal, cache_rows)
        if last_only:
            x, residual = x[:, -1:], (residual[:, -1:] if residual is not None else None)
        x = self.norm.add_norm(x, residual)[0]
        if hidden:
            return x
        shaped = self.config.logits_divisor != 1.0 or self.config.final_softcap is not None
        if labels is not None:
            if type(self.lm_head) is not Linear or shaped:  # e.g. wrapped by a LoRA adapter: the plain path
                return reference_cross_entropy(self._shape_logits(self.lm_head(x)), labels)
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, labels.flatten())
        return self._shape_logits(self.lm_head(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (`forward(..., hidden=True)`): [..., hidden] -> [..., vocab]."""
        return self._shape_logits(self.lm_head(h))

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, times the family's scale: Gemma's sqrt(hidden) rounded to the model
        dtype first (as transformers keeps it, a buffer cast to the weights' dtype), Granite's
        multiplier as a number."""
        x = self.embed(input_ids)
        scale = self.config.embed_scale
        if scale is None:
            return x
        if self.config.embed_scale_in_dtype:
            scale = torch.tensor(scale, dtype=torch.float32).to(x.dtype).item()
        return x * scale

    def _shape_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Granite's logits divisor and Gemma 2's tanh soft-cap (in that order: no family has both)."""
        cfg = self.config
        if cfg.logits_divisor != 1.0:
            logits = logits / cfg.logits_divisor
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits
