"""Weights resident once (minillama/linear.py): a prepacked projection releases its dense weight,
loading streams tensor by tensor, and everything that asks for the dense weight still gets it.

The memory checks load a model of a real width (SmolLM2's: 576 wide, 49k vocabulary, untied, 4
layers) in a fresh process and compare its peak resident memory (the kernel's high-water mark)
with the weight bytes.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import minillama
from minillama import generate
from minillama.linear import Linear, can_prepack, prepack_model, resident_bytes

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="oneDNN prepacking unavailable here")

WIDE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=False)
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3]]

# Imports and one-time set-up (oneDNN, OpenMP, the norm kernels) happen on a tiny model first:
# the figure is what loading the real one adds.
_MEASURE = textwrap.dedent("""
    import json, sys
    import torch, minillama
    from minillama.linear import resident_bytes
    from minillama.quant import weight_bytes
    tiny, path, dtype, quantize = sys.argv[1:5]
    kwargs = dict(dtype=dtype, quantize=quantize or None)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        minillama.from_pretrained(tiny, **kwargs)(ids)
    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    # The peak is the kernel's high-water mark (what getrusage's ru_maxrss reports), reset first:
    # a child keeps the mark of the process it was forked from (pytest's, with its models) across exec.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    model = minillama.from_pretrained(path, **kwargs)
    peak = status("VmHWM")
    print(json.dumps({"added": peak - before, "weights": weight_bytes(model),
                      "resident": resident_bytes(model)["total"]}))
""")


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wide model saved in fp32 and in bf16, and a tiny one for the warm-up."""
    import transformers
    from conftest import hf_config, randomize

    root = tmp_path_factory.mktemp("wide")
    dirs = {}
    for name, overrides in (("tiny", dict(tie_word_embeddings=False)), ("float32", WIDE)):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config("llama", **overrides))
        randomize(model, 0)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    bf16 = minillama.from_pretrained(dirs["float32"], dtype="bfloat16", prepack=False)
    dirs["bfloat16"] = minillama.save_pretrained(bf16, root / "bfloat16")
    return dirs


def _measure(dirs: dict[str, Path], file_dtype: str, dtype: str, quantize: str = "") -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(dirs["tiny"]), str(dirs[file_dtype]), dtype, quantize],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("file_dtype,dtype,quantize,limit", [
    ("float32", "float32", "", 1.15),
    ("bfloat16", "bfloat16", "", 1.15),
    ("bfloat16", "bfloat16", "int8", 1.2),  # of the int8 size: the bf16 model is never held
])
def test_load_peak_is_one_copy_of_the_weights(wide_dirs, file_dtype, dtype, quantize, limit):
    got = _measure(wide_dirs, file_dtype, dtype, quantize)
    assert got["resident"] <= 1.01 * got["weights"], got  # packed copies replaced the dense weights
    assert got["added"] <= limit * got["weights"], f"peak {got['added'] / got['weights']:.2f}x the weights: {got}"


def test_a_converting_load_holds_at_most_one_source_tensor_more(wide_dirs):
    got = _measure(wide_dirs, "float32", "bfloat16")
    largest = 49152 * 576 * 4  # the fp32 embedding, read before its bf16 copy is made
    assert got["added"] <= 1.1 * got["resident"] + largest, got


def _pair(path, **kwargs):
    return minillama.from_pretrained(path, **kwargs), minillama.from_pretrained(path, prepack=False, **kwargs)


def _released(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Linear) and m.released]


def test_every_untied_projection_is_released_and_reads_restore_it(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    packed, plain = _pair(path)
    projections = [n for n, m in packed.named_modules() if isinstance(m, Linear)]
    assert _released(packed) == projections and resident_bytes(packed)["dense"] < resident_bytes(plain)["dense"]
    # state_dict unpacks temporary copies, bit for bit, and leaves the layers released
    sd, ref = packed.state_dict(), plain.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref) and _released(packed) == projections
    # deepcopy: the copy gets dense weights, the original stays released
    clone = copy.deepcopy(packed)
    assert not _released(clone) and _released(packed) == projections
    # any read through parameters() restores first: real numbers, never freed memory
    assert torch.equal(torch.stack([p.double().sum() for p in packed.parameters()]),
                       torch.stack([p.double().sum() for p in plain.parameters()]))
    assert not _released(packed)
    assert torch.equal(generate(packed, PROMPTS, 12, eos_token_id=[]), generate(plain, PROMPTS, 12, eos_token_id=[]))
    assert torch.equal(generate(clone, PROMPTS, 12, eos_token_id=[]), generate(plain, PROMPTS, 12, eos_token_id=[]))


def test_a_weight_edited_in_place_after_load_is_used_as_edited(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    packed, plain = _pair(path)
    assert packed.layers[0].mlp.w_down.released
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        before = packed(ids)
        for model in (packed, plain):
            model.layers[0].mlp.w_down.weight.mul_(2)
        after, want = packed(ids), plain(ids)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_train_then_eval_generates_what_a_fresh_load_does(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model, fresh = minillama.from_pretrained(path), minillama.from_pretrained(path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # made before train(): the same Parameters
    model.train()
    assert not _released(model) and resident_bytes(model)["packed"] == 0
    model(torch.tensor([PROMPTS[0]])).sum().backward()
    optimizer.step()
    model.eval()
    assert torch.equal(generate(model, PROMPTS, 12, eos_token_id=[]), generate(fresh, PROMPTS, 12, eos_token_id=[]))
    assert prepack_model(model) == 0  # the optimizer holds the weights: freeing them is not ours to do
    del optimizer
    assert prepack_model(model) and len(_released(model)) == 9  # packed again on request
    assert torch.equal(generate(model, PROMPTS, 12, eos_token_id=[]), generate(fresh, PROMPTS, 12, eos_token_id=[]))


def test_a_weight_held_elsewhere_is_never_freed(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2)
    model = minillama.from_pretrained(path, prepack=False)
    held = model.layers[0].attn.wo.weight
    view = model.layers[1].attn.wo.weight[:4]
    prepack_model(model)
    assert not model.layers[0].attn.wo.released and not model.layers[1].attn.wo.released
    assert model.layers[0].mlp.w_down.released
    assert torch.isfinite(held.sum()) and torch.isfinite(view.sum())


def test_a_tied_fp32_output_projection_stays_plain(make_hf):
    _, path = make_hf("llama", num_key_value_heads=2, tie_word_embeddings=True)
    model = minillama.from_pretrained(path)
    assert model.lm_head.weight is model.embed.weight and model.lm_head._packed is None
    assert resident_bytes(model)["total"] == minillama.quant.weight_bytes(model)


def test_save_and_reload_from_a_released_model(make_hf, tmp_path):
    _, path = make_hf("llama", num_key_value_heads=2)
    packed, plain = _pair(path)
    minillama.save_pretrained(packed, tmp_path / "saved")
    assert _released(packed)  # saving read temporary copies
    again = minillama.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), plain(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not can_prepack(torch.bfloat16), reason="no packed bf16 on this CPU")
def test_a_tied_bf16_head_is_packed_and_its_embedding_read_from_the_file(make_hf, tmp_path):
    _, path = make_hf("llama", num_key_value_heads=2, tie_word_embeddings=True)
    saved = minillama.save_pretrained(minillama.from_pretrained(path, dtype="bfloat16", prepack=False), tmp_path / "bf16")
    model, plain = _pair(saved)
    assert model.lm_head._packed is not None and not model.lm_head.released  # the embedding holds it
    assert not model.embed.weight.untyped_storage().resizable()  # a map of the file, not a copy
    held = resident_bytes(model)
    assert held["mapped"] == 128 * 64 * 2 and held["total"] == minillama.quant.weight_bytes(model)
    want = generate(plain, PROMPTS, 12, eos_token_id=[])
    assert torch.equal(generate(model, PROMPTS, 12, eos_token_id=[]), want)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())
    # an edit of the mapped embedding (copy on write: the file is untouched) is used, by the head too
    with torch.no_grad():
        for m in (model, plain):
            m.embed.weight[5].mul_(3)
    assert torch.equal(generate(model, PROMPTS, 12, eos_token_id=[]), generate(plain, PROMPTS, 12, eos_token_id=[]))
    again = minillama.from_pretrained(saved, prepack=False)
    assert torch.equal(generate(again, PROMPTS, 12, eos_token_id=[]), want)
