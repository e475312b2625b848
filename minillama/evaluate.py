"""lm-evaluation-harness on minillama: an `lm_eval` model backend, registered as "minillama".

    import minillama.evaluate, lm_eval
    lm_eval.simple_evaluate(model="minillama", model_args="pretrained=DIR,dtype=bfloat16", tasks=["arc_easy"])

or `minillama eval --model DIR --tasks arc_easy` (minillama/cli.py), or lm-eval's own command line
through `minillama lm-eval --model minillama --model_args pretrained=DIR ...`.

Requests are tokenized exactly as lm-eval's `hf` backend does (TemplateLM's context/continuation
split, its BOS handling, its left truncation to `max_length + 1` tokens, its rolling windows), so
scores equal transformers' through lm-eval. What differs is how they are computed:

- Requests that share a context (the choices of a multiple-choice question) share its forward pass:
  each distinct context is prefilled once into a KV-cache row, the row is copied for each of its
  continuations, and all continuations of a batch then run together, each at its own cache slots.
  The `hf` backend runs context + continuation once per choice.
- Only the positions that score a continuation token are projected to the vocabulary, and the
  log-softmax runs in fp32 over chunks of them (`SCORE_CHUNK`), never over [seq, vocab] whole.

lm-eval is an optional dependency (`pip install 'minillama[eval]'`); nothing else in minillama
imports this module.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, _add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text, resolve_max_length)
from tqdm import tqdm

from .errors import ConfigError

SCORE_CHUNK = 256  # positions projected to the vocabulary at a time (fp32 [256, vocab] at most)
DEFAULT_BATCH = 64  # continuations per forward: few, wide forwards (a small one costs a read of every weight)
BATCH_SLOTS = 32768  # at most this many KV-cache slots per batch (rows x longest), so long windows go few at a time
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until when a task names none
# generate_until options a task may set, as transformers' generate names them -> minillama's
GEN_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
               "repetition_penalty": "repetition_penalty", "seed": "seed"}

Request = tuple[Any, list[int], list[int]]  # (request strings or None, context ids, continuation ids)


def _flag(value: Any, name: str) -> bool | None:
    """A model_args boolean: lm-eval hands them over as strings ("True", "false") or bools."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args: {name}={value!r} is not a boolean (true or false)")


@register_model("minillama")
class MinillamaLM(TemplateLM):
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) over a minillama model.

    pretrained: checkpoint directory or Hugging Face id (default: the embedded SmolLM2-135M-Instruct);
    or pass `model` and `tokenizer` already loaded. dtype, norm, quantize: as `from_pretrained`'s.
    compile: compile generate_until's decode step (True, "decode" or "all", as `generate`'s).
    batch_size: continuations scored per forward pass (generation: prompts per batch).
    max_length: context length in tokens (default: the config's, as the `hf` backend resolves it).
    add_bos_token: force the tokenizer's special tokens on (True) or off (False); None: its default.
    """

    def __init__(self, pretrained: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 dtype: str | None = None, norm: str | None = None, quantize: str | None = None,
                 compile: bool | str = False, batch_size: int | str | None = DEFAULT_BATCH,
                 max_batch_size: int | None = None, max_length: int | str | None = None,
                 max_gen_toks: int | str = MAX_GEN_TOKS, add_bos_token: bool | str | None = None,
                 prefix_token_id: int | str | None = None, device: str | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"model_args: unknown argument(s) {', '.join(sorted(unknown))} for minillama "
                              "(pretrained, dtype, norm, quantize, compile, batch_size, max_length, max_gen_toks, "
                              "add_bos_token, prefix_token_id, device)")
        if model is None:
            from .checkpoint import from_pretrained
            from .hub import model_path
            from .tokenizer import load_tokenizer

            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes cuda:0 unless told otherwise; its hf backend falls back too
                warnings.warn(f"device {device!r} is not available here; evaluating on the CPU", stacklevel=2)
                device = None
            path = model_path(pretrained)
            model = from_pretrained(path, dtype=dtype, device=device, norm=norm, quantize=quantize)
            tokenizer = tokenizer or load_tokenizer(path)
            self.pretrained = str(pretrained or path)
        elif tokenizer is None:
            raise ConfigError("MinillamaLM: a model passed in needs its tokenizer too")
        else:
            self.pretrained = str(pretrained or getattr(tokenizer, "name_or_path", "minillama"))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.compile = {"true": True, "false": False}.get(str(compile).lower(), compile)
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = max_batch_size or DEFAULT_BATCH  # no probing: a CPU has no OOM to search for
        self.batch = int(batch_size)
        if self.batch < 1:
            raise ConfigError(f"model_args: batch_size must be >= 1, got {batch_size}")
        self._max_length = int(max_length) if max_length else resolve_max_length(model.config, tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self.custom_prefix_token_id = int(prefix_token_id) if prefix_token_id is not None else None
        self._device = model.input_device

    # ---- what lm-eval asks of a model --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after: BOS, else EOS (as the `hf` backend)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """The `hf` backend's encoding: special tokens per add_bos_token (None: the tokenizer's
        default), none added to a string that already starts with the BOS text."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.pretrained, "model_dtype": str(self.model.embed.weight.dtype),
                "norm": self.model.config.norm, "quantization": str(self.model.config.quantization)}

    # ---- loglikelihood ----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, whether every continuation token is the argmax) per request."""
        # The window the `hf` backend scores: the last max_length + 1 tokens, the last one only a target.
        items = []
        for i, (strings, ctx, cont) in enumerate(requests):
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError(f"request {i}: needs a context, a continuation of 1..{self.max_length} tokens")
            whole = (ctx + cont)[-(self.max_length + 1):]
            items.append((i, strings, whole[:len(whole) - len(cont)], cont))
        # Contexts in first-seen order, longest first (as lm-eval orders them: errors and time estimates early).
        groups: dict[tuple[int, ...], list[tuple[int, Any, list[int]]]] = {}
        for i, strings, ctx, cont in items:
            groups.setdefault(tuple(ctx), []).append((i, strings, cont))
        order = sorted(groups, key=lambda c: -(len(c) + max(len(cont) for _, _, cont in groups[c])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        try:
            for batch in _batches(order, groups, self.batch):
                for (i, strings, _), answer in zip([m for ctx in batch for m in groups[ctx]],
                                                   self._score(batch, groups)):
                    results[i] = answer
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                    bar.update(1)
        finally:
            self.model.clear_cache()  # the scoring cache is sized to these requests: free it
            bar.close()
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score(self, contexts: list[tuple[int, ...]],
               groups: dict[tuple[int, ...], list[tuple[int, Any, list[int]]]]) -> Iterator[tuple[float, bool]]:
        """Score every continuation of these contexts: each context prefilled once into its first
        member's cache row, copied to its other members' rows, then every continuation in one forward."""
        model, dev = self.model, self.device
        members = [(g, cont) for g, ctx in enumerate(contexts) for _, _, cont in groups[ctx]]
        first = [next(m for m, (g2, _) in enumerate(members) if g2 == g) for g in range(len(contexts))]
        ctx_lens = [len(c) for c in contexts]
        rest = max(len(cont) for _, cont in members) - 1  # continuation tokens fed (the last is only scored)
        longest = max(ctx_lens) + rest  # slots any row writes (padding included)
        cache = model.kv_cache
        if cache is None or cache.k.shape[0] < len(members) or cache.max_seq_len < longest:
            model.setup_cache(len(members), longest)
        # 1. The contexts, right-padded (causal attention keeps the padding out of every real token):
        #    the hidden state at each one's last token scores its continuations' first tokens.
        width = max(ctx_lens)
        ids = torch.tensor([list(c) + [0] * (width - len(c)) for c in contexts], device=dev)
        h = model(ids, torch.arange(width, device=dev), cache_rows=torch.tensor(first, device=dev), hidden=True)
        first_h = h[torch.arange(len(contexts)), torch.tensor(ctx_lens) - 1]  # [groups, hidden]
        # 2. Each member's row gets its context's keys and values.
        copies = [(m, first[g]) for m, (g, _) in enumerate(members) if m != first[g]]
        if copies:
            dst, src = (torch.tensor(t, device=dev) for t in zip(*copies))
            for layer in model.layers:
                kv = layer.attn.kv_cache
                kv.k[dst, :, :width] = kv.k[src, :, :width]
                kv.v[dst, :, :width] = kv.v[src, :, :width]
        # 3. Every continuation but its last token, each row at its own slots after its context.
        rest_h = None
        if rest:
            ids = torch.tensor([cont[:-1] + [0] * (rest - len(cont) + 1) for _, cont in members], device=dev)
            pos = torch.tensor([[ctx_lens[g] + j for j in range(rest)] for g, _ in members], device=dev)
            rest_h = model(ids, pos, kv_len=int(pos.max()) + 1, hidden=True)
        # 4. One projection to the vocabulary for every scored position of the batch.
        hs = [first_h[g:g + 1] if len(cont) == 1 else torch.cat([first_h[g:g + 1], rest_h[m, :len(cont) - 1]])
              for m, (g, cont) in enumerate(members)]
        logprobs, greedy = self._logprobs(torch.cat(hs), [t for _, cont in members for t in cont])
        start = 0
        for _, cont in members:
            end = start + len(cont)
            yield float(logprobs[start:end].sum()), bool(greedy[start:end].all())
            start = end

    def _logprobs(self, h: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) under the hidden states h [n, hidden], and whether each target is the argmax;
        an fp32 log-softmax over SCORE_CHUNK positions at a time (never [n, vocab] whole)."""
        target = torch.tensor(targets, device=h.device)
        logprobs, greedy = torch.empty(len(targets)), torch.empty(len(targets), dtype=torch.bool)
        for a in range(0, len(targets), SCORE_CHUNK):
            b = min(a + SCORE_CHUNK, len(targets))
            lp = F.log_softmax(self.model.logits(h[a:b]).float(), dim=-1)
            logprobs[a:b] = lp.gather(-1, target[a:b, None])[:, 0].cpu()
            greedy[a:b] = (lp.argmax(-1) == target[a:b]).cpu()
        return logprobs, greedy

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of max_length tokens (lm-eval's own
        windows: each after one token of context, the first after the prefix token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generate_until ---------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) continuations, cut at the task's stop strings."""
        from .batch import plan_batches, run_batches

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        by_kwargs = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                             group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in by_kwargs.get_batched(n=self.batch):
            contexts, kwargs_list = zip(*chunk)
            kwargs = normalize_gen_kwargs(kwargs_list[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            do_sample = kwargs.pop("do_sample", False)
            options = _gen_options(kwargs, do_sample)
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be less than the context ({self.max_length})")
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            done = run_batches(self.model, self.tokenizer, prompts, plan_batches([0] * len(prompts), len(prompts)),
                               max_new, stop=[s for s in until if s], compile=self.compile, **options)
            texts = dict((i, text) for i, text, _ in done)
            for i, (context, gen_kwargs) in enumerate(chunk):
                text = postprocess_generated_text(texts[i], until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return by_kwargs.get_original(results)


def _gen_options(kwargs: dict[str, Any], do_sample: bool) -> dict[str, Any]:
    """A task's generation kwargs as minillama's generate options; an option it cannot honour is an error."""
    unknown = sorted(set(kwargs) - set(GEN_OPTIONS))
    if unknown:
        raise ValueError(f"generate_until: unsupported generation option(s) {', '.join(unknown)} "
                         f"(minillama takes do_sample, {', '.join(GEN_OPTIONS)})")
    options = {GEN_OPTIONS[k]: v for k, v in kwargs.items() if v is not None}
    if not do_sample:
        options["temperature"] = 0.0  # greedy, whatever temperature says (as transformers' do_sample=False)
    return options


def _batches(order: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[Any]],
             size: int) -> Iterator[list[tuple[int, ...]]]:
    """Contexts in `order` (longest first), cut into batches of at most `size` continuations and
    BATCH_SLOTS cache slots (a context's continuations stay together, so one with more choices than
    that is a batch of its own)."""
    batch: list[tuple[int, ...]] = []
    count = longest = 0
    for ctx in order:
        members = groups[ctx]
        length = len(ctx) + max(len(cont) for _, _, cont in members)
        if batch and (count + len(members) > size or (count + len(members)) * max(longest, length) > BATCH_SLOTS):
            yield batch
            batch, count, longest = [], 0, 0
        batch.append(ctx)
        count, longest = count + len(members), max(longest, length)
    if batch:
        yield batch


def task_manager(tasks: Sequence[str], include_path: str | None = None) -> Any:
    """lm-eval's TaskManager that knows every one of `tasks`; ConfigError naming those it does not."""
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own ~10,000 task files takes ~10 s: skipped when include_path has every task.
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(missing)} (`lm-eval ls tasks` lists them; "
                          "YAML tasks of your own: --include-path DIR)")
    return manager


def evaluate(lm: MinillamaLM, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | None = None, output_path: str | None = None, log_samples: bool = False,
             apply_chat_template: bool = False, seed: int = 1234, manager: Any = None) -> dict[str, Any]:
    """Run lm-eval's tasks (its registry, plus the YAML tasks under include_path) on `lm`; lm-eval's
    results dict, also written under output_path by lm-eval's own tracker (results_*.json, samples)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    manager = manager or task_manager(tasks, include_path)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    results = lm_eval.simple_evaluate(model=lm, model_args={"pretrained": lm.pretrained}, tasks=list(tasks),
                                      num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples or bool(output_path),
                                      evaluation_tracker=tracker, apply_chat_template=apply_chat_template,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    if tracker is not None:
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return results
