"""RowStop: one row's stopping rules (EOS, stop strings, a grammar's end, the token limit), the ones the
serving engine and generate()'s stop strings share."""

from __future__ import annotations

from pathlib import Path

import torch

import minillama
from minillama.stopping import RowStop, StopStrings


class _Done:  # a grammar state whose document is complete after `at` tokens
    def __init__(self, at: int) -> None:
        self.at, self.n = at, 0

    @property
    def stopped(self) -> bool:
        return self.n >= self.at


def test_rules_in_order(tiny_chat_dir: Path) -> None:
    tok = minillama.load_tokenizer(tiny_chat_dir)
    ids = tok("hello world, and more", add_special_tokens=False).input_ids
    eos = tok.eos_token_id
    # the limit: the last allowed token ends the row with "length", its text included and flushed
    row = RowStop(tok, eos=[eos], max_tokens=2)
    assert [row.push(t)[1:] for t in ids[:2]] == [(None, True), ("length", True)]
    # EOS ends the row without joining the output; ignore_eos runs past it, except under a grammar
    assert RowStop(tok, eos=[eos], max_tokens=9).push(eos) == ("", "stop", False)
    assert RowStop(tok, eos=[eos], max_tokens=9, ignore_eos=True).push(eos)[1:] == (None, True)
    assert RowStop(tok, eos=[eos], max_tokens=9, grammar=_Done(99), ignore_eos=True).push(eos)[1] == "stop"
    # a stop string: the text before it, then "stop"; nothing of the string itself is shown
    row, shown, finish = RowStop(tok, stops=["world"], eos=[eos], max_tokens=99), "", None
    for t in ids:
        piece, finish, _ = row.push(t)
        shown += piece
        if finish:
            break
    assert finish == "stop" and shown == "hello " and row.kept <= len(ids)
    # a grammar whose document is complete
    grammar = _Done(1)
    row = RowStop(tok, eos=[eos], max_tokens=99, grammar=grammar)
    grammar.n = 1
    assert row.push(ids[0])[1:] == ("stop", True)


def test_stop_strings_callback_holds_a_stopped_row(tiny_chat_dir: Path) -> None:
    tok = minillama.load_tokenizer(tiny_chat_dir)
    ids = tok("ab cd ab", add_special_tokens=False).input_ids
    stops = StopStrings(tok, ["cd"], batch=2)
    flags = [stops(torch.tensor([t, t])).tolist() for t in ids]
    assert flags[-1] == [True, True] and flags[0] == [False, False]
    assert all(f == [True, True] for f in flags[flags.index([True, True]):])  # stays stopped
