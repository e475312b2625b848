"""When a row's output ends, and which of its text may be shown: the stopping rules shared by
generate(), stream(), the speculative loop and the serving engine.

A row ends at an end-of-sequence id, at a stop string (OpenAI's rule: the string itself is not
part of the text), once its grammar's document is complete, or at its token limit. `RowStop` is
those rules for one row, token by token, on the host: the serving engine keeps one per request,
and generate()'s `StopStrings` one per row. The batched decode loop (generate.decode_tokens) checks
EOS and the limit on the device instead, so that a GPU does not wait for a host read every token;
the rules are the same.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import GenerationError


class IncrementalDecoder:
    """Turns one row's token ids into text pieces, never splitting a multi-byte character.

    Decoding the whole continuation each time (not token by token) keeps tokenizers' spacing
    rules right; a trailing U+FFFD means an unfinished UTF-8 sequence, so that text waits.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def check_stop_strings(stops: Sequence[str] | str) -> list[str]:
    """The stop strings as a list; GenerationError for an empty one (it would match before any text)."""
    stops = [stops] if isinstance(stops, str) else list(stops)
    for s in stops:
        if not isinstance(s, str):
            raise GenerationError(f"stop strings must be text, got {s!r}")
        if not s:
            raise GenerationError("empty stop string: it would stop before the first token; drop it")
    return stops


class TextStream:
    """One row's new text, piece by piece, ending at the first stop string.

    As in OpenAI's API the stop string is not part of the text: text that could still be the start
    of one is held back until a later token shows it is not (or `flush` ends the row).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.stops = check_stop_strings(stops)
        self.decoder = IncrementalDecoder(tokenizer)
        self.sent = 0  # characters of decoder.text handed out so far
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """The text that token makes safe to show ("" while a character or a stop string is unfinished)."""
        if self.stopped:
            return ""
        self.decoder.push(token_id)
        text = self.decoder.text
        # Held-back text is never shown, so a stop string cannot begin before `sent`.
        found = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = len(text) - max((k for s in self.stops for k in range(len(s) - 1, 0, -1)
                                   if text.endswith(s[:k])), default=0)
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        return piece

    def flush(self) -> str:
        """The rest of the text, once the row has ended for another reason (EOS, length): an
        unfinished character at the end is now final, and decodes as the tokenizer decodes it."""
        if self.stopped:
            return ""
        text = self.decoder.tokenizer.decode(self.decoder.ids, skip_special_tokens=True)
        piece, self.sent = text[self.sent:], len(text)
        return piece


class RowStop:
    """One row's stopping rules (module docstring), fed one sampled token at a time.

    eos: the ids that end the row (not part of its output); ignore_eos runs on past them (a
    benchmark's fixed length), except under a grammar, whose document the EOS ends. grammar: the
    row's structured.GrammarState, already advanced past each token by the sampler.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), eos: Sequence[int] = (),
                 max_tokens: int | None = None, grammar: Any = None, ignore_eos: bool = False) -> None:
        self.text = TextStream(tokenizer, stops)
        self.eos, self.max_tokens, self.grammar = set(eos), max_tokens, grammar
        self.ends_on_eos = not ignore_eos or grammar is not None
        self.kept = 0  # tokens that joined the output
        self.finish: str | None = None  # why the row ended, once it has

    def push(self, token: int) -> tuple[str, str | None, bool]:
        """(the text this token makes safe to show, why the row ends here: "stop", "length" or None,
        whether the token joins the output: an ending EOS does not)."""
        if token in self.eos and self.ends_on_eos:
            self.finish = "stop"
            return self.text.flush(), self.finish, False
        self.kept += 1
        piece = self.text.push(token)
        if self.text.stopped or (self.grammar is not None and self.grammar.stopped):
            self.finish = "stop"
        elif self.max_tokens is not None and self.kept >= self.max_tokens:
            self.finish = "length"
        return (piece + self.text.flush() if self.finish else piece), self.finish, True


class StopStrings:
    """should_stop callback for the batched loops: a row stops once its new text contains any of
    `stops` (a RowStop per row; EOS and the token limit are the loop's own, on the device)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], batch: int) -> None:
        self.rows = [RowStop(tokenizer, stops) for _ in range(batch)]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, token in zip(self.rows, tokens.tolist()):
            if row.finish is None:
                row.push(token)
        return torch.tensor([row.finish is not None for row in self.rows], device=tokens.device)
