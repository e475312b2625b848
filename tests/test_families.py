"""Every family in config.FAMILIES against transformers, on tiny random models built by its own
classes with the options that bite switched on: logits (fp32 and bf16), greedy generation through
the static cache, ragged batches, saving back, and the errors of bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import minillama
from minillama import CheckpointError, ConfigError
from minillama.config import from_hf_config, load_config, to_hf_config
from minillama.generate import generate
from minillama.kernels import torch_path

# Special-token ids inside the tiny vocabulary (Phi-3's and SmolLM3's defaults lie outside it).
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.7, 2.2], long_factor=[2.0, 3.0, 4.5, 6.0])
# Each family with what sets it apart made to bite: windows shorter than the prompt on some layers
# only, soft-caps small enough to saturate, query_pre_attn_scalar != head_dim, partial rotary,
# longrope past its original length, layers without RoPE, multipliers far from 1.
FAMILIES = {
    "qwen2": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(num_key_value_heads=2, head_dim=24),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=5),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24,
                        sliding_window=5, sliding_window_pattern=2, rope_theta=1e4, rope_local_base_freq=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=5.0),
    "phi3": dict(num_key_value_heads=2, partial_rotary_factor=0.5, original_max_position_embeddings=16,
                 rope_scaling=LONGROPE, sliding_window=12),
    "olmo2": dict(num_key_value_heads=2),
    "smollm3": dict(num_key_value_heads=2, num_hidden_layers=3, no_rope_layer_interval=2),
    "granite": dict(num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.05, logits_scaling=8.0),
}
# What our config must say for each (the translation is what the logits test then proves right).
SAYS = {
    "qwen2": dict(qkv_bias=True, o_bias=False, layer_types=["full", "sliding"], sliding_window=5),
    "qwen3": dict(qk_norm="head", head_dim=24),
    "gemma": dict(norm_offset=1.0, norm_fp32_gain=True, embed_scale_in_dtype=True, hidden_act="gelu_pytorch_tanh",
                  tie_word_embeddings=True),
    "gemma2": dict(norm_placement="sandwich", attn_softcap=2.0, final_softcap=3.0, attn_scale=24**-0.5,
                   layer_types=["sliding", "full", "sliding"]),
    "gemma3_text": dict(norm_placement="sandwich", qk_norm="head", attn_softcap=None, final_softcap=5.0,
                        layer_types=["sliding", "full", "sliding"]),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=12, layer_types=None),
    "olmo2": dict(norm_placement="post", qk_norm="proj", norm_fp32_gain=True),
    "smollm3": dict(nope_layers=[1]),
    "granite": dict(embed_scale=12.0, residual_scale=0.22, attn_scale=0.05, logits_divisor=8.0),
}
NAMES = sorted(FAMILIES)


def _ids(batch: int = 3, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def family(make_hf, request):
    """(transformers model, saved dir) of the family named by the test's parameter."""
    return make_hf(request.param, **TOKENS, **FAMILIES[request.param])


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within `rel` of the logits' scale (their largest magnitude)."""
    torch.testing.assert_close(got, ref, rtol=0, atol=rel * float(ref.abs().max()))


@pytest.mark.parametrize("family", NAMES, indirect=True)
def test_config_says_what_the_family_does(family):
    _, path = family
    cfg = load_config(path)
    name = cfg.model_type
    for field, value in SAYS[name].items():
        assert getattr(cfg, field) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, field) == value, field
    # ... and writes back to itself
    assert from_hf_config(to_hf_config(cfg)) == cfg


@pytest.mark.parametrize("family", NAMES, indirect=True)
def test_fp32_logits_match_transformers(family):
    ref_model, path = family
    ours = minillama.from_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        _close(ours(ids), ref_model(ids).logits)


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_longrope_short_factors_within_the_original_length(family):
    ref_model, path = family
    ours = minillama.from_pretrained(path)
    ids = _ids(seq=12)  # below original_max_position_embeddings (16): the short factors
    with torch.no_grad():
        _close(ours(ids), ref_model(ids).logits)
        long = ours(_ids(seq=24))[:, :12]
    assert not torch.allclose(long, ours(ids).detach(), atol=1e-3)  # past it the long ones change every position


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "olmo2", "qwen3"], indirect=True)
def test_bf16_error_at_most_twice_transformers(family):
    """Both cast orders of the gain matter here: bf16 logits no further from the fp32 reference than
    twice transformers' own bf16 logits are."""
    ref_model, path = family
    ids = _ids()
    with torch.no_grad():
        exact = ref_model(ids).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                   attn_implementation="eager")(ids).logits.float()
        ours = minillama.from_pretrained(path, dtype=torch.bfloat16)(ids).float()
    their_err, our_err = (theirs - exact).abs().max(), (ours - exact).abs().max()
    assert 0 < our_err <= 2 * their_err, (float(our_err), float(their_err))


def _hf_greedy(ref: transformers.PreTrainedModel, ids: torch.Tensor, n: int) -> torch.Tensor:
    return ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)


@pytest.mark.parametrize("family", NAMES, indirect=True)
def test_greedy_32_tokens_equal_transformers_generate(family):
    ref, path = family
    model = minillama.from_pretrained(path)
    ids = torch.tensor([[9, 8, 7, 6, 5, 4, 3]])  # 39 tokens in all: past every window and phi3's 16
    got = generate(model, ids, 32, eos_token_id=[])
    assert torch.equal(got, _hf_greedy(ref, ids, 32))


PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2", "qwen2", "smollm3"], indirect=True)
def test_ragged_batch_equals_one_by_one(family):
    _, path = family
    model = minillama.from_pretrained(path)
    batched = generate(model, PROMPTS, 10, eos_token_id=[], pad_token_id=0)
    width = max(map(len, PROMPTS))
    for row, prompt in zip(batched, PROMPTS, strict=True):
        alone = generate(model, torch.tensor([prompt]), 10, eos_token_id=[])[0]
        assert torch.equal(row[width - len(prompt):], alone)


@pytest.mark.parametrize("family", NAMES, indirect=True)
def test_saved_checkpoint_loads_in_transformers_as_the_same_family(family, tmp_path):
    ref_model, path = family
    ours = minillama.from_pretrained(path)
    out = minillama.save_pretrained(ours, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back) is type(ref_model)
    ids = _ids()
    with torch.no_grad():
        _close(back(ids).logits, ref_model(ids).logits)


# ---------------------------------------------------------------- bad inputs: one line, nothing loaded

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("hf,message", [
    (dict(model_type="mamba"), "field 'model_type' is 'mamba'"),
    (dict(model_type="qwen2_moe"), "field 'model_type' is 'qwen2_moe'"),
    (dict(model_type="qwen3", num_experts=8), "'num_experts' = 8: mixture-of-experts layers is not supported"),
    (dict(model_type="gemma3_text", vision_config={"hidden_size": 8}), "'vision_config'"),
    (dict(model_type="qwen3", layer_types=["full_attention", "linear_attention"]), "'linear_attention'"),
    (dict(model_type="gemma2", hidden_size=None), "'hidden_size' must be a positive integer, got None"),
    (dict(model_type="phi3", partial_rotary_factor=0.1), "partial_rotary_factor"),
    (dict(model_type="gemma2", architectures=["GemmaForCausalLM"]), "field 'architectures'"),
])
def test_bad_configs_are_one_line_naming_the_field(hf, message):
    with pytest.raises(ConfigError) as err:
        from_hf_config({**BASE, **hf}, "d/config.json")
    assert str(err.value).startswith("d/config.json: ") and "\n" not in str(err.value)
    assert message in str(err.value)


def test_required_field_of_a_family_missing():
    hf = {**BASE, "model_type": "gemma3_text", "head_dim": 16}
    del hf["num_attention_heads"]
    with pytest.raises(ConfigError, match="required field 'num_attention_heads' is missing"):
        from_hf_config(hf)


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_missing_qk_norm_tensors_are_named(family):
    _, path = family
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1: model\.layers\.1\.self_attn\.k_norm\.weight"):
        minillama.from_pretrained(path)


def test_cli_refuses_an_unknown_family_in_one_line(tmp_path, capsys):
    from minillama.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "rwkv"}))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'rwkv'" in err


# ---------------------------------------------------------------- each family's norm, bit for bit

# model_type -> transformers' RMSNorm class of that family (imported in the test: importing
# modeling modules at collection time upsets torch.library's schema checks in the kernel tests).
HF_NORMS = {"llama": "llama.modeling_llama.LlamaRMSNorm", "qwen3": "qwen3.modeling_qwen3.Qwen3RMSNorm",
            "gemma": "gemma.modeling_gemma.GemmaRMSNorm", "gemma2": "gemma2.modeling_gemma2.Gemma2RMSNorm",
            "gemma3_text": "gemma3.modeling_gemma3.Gemma3RMSNorm", "olmo2": "olmo2.modeling_olmo2.Olmo2RMSNorm"}


@pytest.mark.parametrize("norm", ["rmsnorm", "rmsnorm-torch"])
@pytest.mark.parametrize("model_type", sorted(HF_NORMS))
def test_each_family_norm_equals_transformers_bit_for_bit_in_bf16(model_type, norm):
    """The gain's offset and cast order (Gemma: fp32 (1 + w), cast after; OLMo 2: fp32 w; Llama:
    cast, then w) decide bf16 outputs; a row of head_dim (q/k norm) and of the hidden size."""
    import importlib

    from minillama.norms import build_norm

    module, _, name = HF_NORMS[model_type].rpartition(".")
    hf_norm = getattr(importlib.import_module(f"transformers.models.{module}"), name)
    cfg = from_hf_config({**BASE, **TOKENS, "model_type": model_type, "head_dim": 16, "num_key_value_heads": 2})
    gen = torch.Generator().manual_seed(0)
    for dim in (16, 64):
        ref = hf_norm(dim, eps=1e-6)
        ours = build_norm(norm, dim, 1e-6, cfg.norm_offset, cfg.norm_fp32_gain)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(dim, generator=gen) * 0.5)
            ours.weight.copy_(ref.weight)
        ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        x = (torch.randn(5, 7, dim, generator=gen) * 3).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x)), (model_type, dim)  # the C++ kernels (rmsnorm)
            with torch_path():
                assert torch.equal(ours(x), ref(x)), (model_type, dim)  # the torch code


# ---------------------------------------------------------------- the features, on the families that stress them

@pytest.mark.parametrize("family", ["gemma3_text"], indirect=True)
def test_norm_swap_reaches_every_site_and_keeps_gemmas_gain(family):
    """--norm swaps pre, post, q/k and final norms alike; a norm without Gemma's (1 + w) takes w + 1."""
    from minillama.norms import LayerNorm, Norm

    hf, path = family
    swapped = minillama.from_pretrained(path, norm="layernorm")
    norms = [m for m in swapped.modules() if isinstance(m, Norm)]
    assert len(norms) == 6 * 3 + 1 and all(type(m) is LayerNorm for m in norms)
    hf_q = hf.model.layers[1].self_attn.q_norm.weight
    torch.testing.assert_close(swapped.layers[1].attn.q_norm.weight, hf_q + 1)
    torch.testing.assert_close(swapped.norm.weight, hf.model.norm.weight + 1)
    # among RMSNorms the swap keeps the family's numbers (its offset and cast order are options of the site)
    ids = _ids()
    with torch.no_grad():
        _close(minillama.from_pretrained(path, norm="rmsnorm-torch")(ids), hf(ids).logits)
        _close(minillama.from_pretrained(path, norm="rmsnorm-native")(ids), hf(ids).logits)


@pytest.mark.parametrize("family", ["gemma3_text"], indirect=True)
def test_info_names_the_family_and_its_norm_sites(family, capsys):
    from minillama.cli import main

    _, path = family
    assert main(["info", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family gemma3_text (Gemma3ForCausalLM): norms sandwich" in out
    assert "attn_norm, post_attn_norm, mlp_norm, post_mlp_norm, q_norm [head: 16], k_norm [head: 16]" in out
    assert "6 x 3 + 1 final = 19 norm calls per forward; gain w + 1 in fp32" in out
    assert "sliding window 5 on 2 of 3 layers" in out


@pytest.mark.parametrize("family,mode", [("qwen2", "int8"), ("gemma3_text", "int4-g32")],
                         indirect=["family"])
def test_quantized_families_stay_close_and_generate(family, mode):
    """Quantized projections keep Qwen2's biases and Gemma 3's norms: the integer kernels give the
    logits of the same model with the dequantized weights as plain matrices (within the bf16 the
    CPU kernels compute in; a mis-mapped tensor is off by the logits' whole scale), and a ragged batch
    equals each prompt alone. (Against the unquantized model the error is the quantization's own:
    Gemma's post-sublayer norms rescale every sublayer's output, its error included, so a tiny
    random Gemma 3 loses ~3x more than a Llama to int4.)"""
    from minillama.quant import dequantize_model

    hf, path = family
    model = minillama.from_pretrained(path, quantize=mode)
    assert (model.layers[0].attn.wqkv.bias is not None) == (hf.config.model_type == "qwen2")
    ids = _ids()
    with torch.no_grad():
        got = model(ids)
        dense = dequantize_model(minillama.from_pretrained(path, quantize=mode))(ids)
        ref = hf(ids).logits
    _close(got, dense, 0.08)  # the CPU integer kernels compute in bf16: ~1e-2 for a Llama, more for Gemma
    assert 0 < (got - ref).abs().max() < (0.2 if mode == "int8" else 1.5) * ref.abs().max()
    batched = generate(model, PROMPTS, 6, eos_token_id=[], pad_token_id=0)
    width = max(map(len, PROMPTS))
    for row, prompt in zip(batched, PROMPTS, strict=True):
        assert torch.equal(row[width - len(prompt):], generate(model, [prompt], 6, eos_token_id=[])[0])


def test_lora_targets_take_each_familys_names(make_hf):
    from minillama.train.lora import lora_targets

    _, path = make_hf("phi3", **TOKENS, **FAMILIES["phi3"])
    model = minillama.from_pretrained(path)
    assert lora_targets(model, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]) == [
        "wqkv", "wo", "w_gate_up", "w_down"]
    assert lora_targets(model, ["q_proj", "v_proj"]) == ["wqkv"]


@pytest.mark.parametrize("family", ["gemma2"], indirect=True)
def test_engine_serves_a_family_as_generate_does(family):
    """The serving engine's rows at different positions, on Gemma 2's soft-caps and alternating windows."""
    from minillama.engine import Engine, Request
    from minillama.generate import SamplingConfig
    from minillama.tokenizer import byte_tokenizer

    _, path = family
    model = minillama.from_pretrained(path)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11]]
    alone = [generate(model, [p], 12, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, byte_tokenizer(), max_batch=2)
    engine.eos = set()
    requests = [Request(p, 12, SamplingConfig()) for p in prompts]
    for r in requests:
        engine.submit(r)
    while engine.running or engine.waiting:
        engine.step()
    assert [r.tokens for r in requests] == alone

# compile=True and "all" on a family: tests/test_generate.py's compiled-step tests run on a Gemma 2.
