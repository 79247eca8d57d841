"""The command line teaches: --help shows every default, tolerances read as written, the
comm table names its groups, a text run shows a sample and states its chance level."""
import argparse

import numpy as np
import pytest

from minipar.data import ReverseTask, TextTask
from minipar.engine import Engine
from minipar.nn import GPTConfig
from minipar.report import GROUPS, comm_table
from minipar.args import build_parser
from minipar.train import chance, sample

pytestmark = pytest.mark.core


def test_help_shows_every_default():
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{flag} has no help text"
        if action.default is None or action.default is False:
            assert "default" in action.help, f"{flag}: say what the default is"
        else:
            shown = f"(default: {action.default})" in text or "default" in action.help
            assert shown, f"{flag}: --help does not show its default {action.default!r}"


def test_the_comm_table_names_every_group_it_shows():
    comm = [{"dp": {"all_reduce": {"bytes": 2 ** 20, "calls": 3}}, "mp": {"all_reduce": {"bytes": 16, "calls": 3}},
             "embed": {"all_reduce": {"bytes": 8, "calls": 1}}, "world": {"object": {"bytes": 1, "calls": 1}}}]
    lines = comm_table(comm)
    assert lines[1] == "   0  dp.all_reduce 1.00 MiB/3x; embed.all_reduce 0.00 MiB/1x; mp.all_reduce 0.00 MiB/3x"
    legend = lines[lines.index("groups:") + 1:]
    assert [line.split()[0] for line in legend] == ["dp", "embed", "mp"]     # world moved objects only
    assert all(GROUPS[g] in line for g, line in zip(["dp", "embed", "mp"], legend))


def test_chance_levels_say_how_they_are_computed(tmp_path):
    assert chance(ReverseTask(4)) == "chance: 1/10 = 0.100, a uniform guess among the 10 digits"
    path = tmp_path / "t.txt"
    path.write_text("aab " * 200)
    line = chance(TextTask(str(path), 8))
    assert line.startswith("chance: uniform 1/3 = 0.333; unigram baseline (always 'a',")
    assert abs(float(line.split()[-1]) - 0.5) < 0.02   # every other held-out character is an 'a'


def test_a_text_run_can_show_a_sample(tmp_path, device):
    path = tmp_path / "t.txt"
    path.write_text("hello world. " * 40)
    task = TextTask(str(path), 8)
    cfg = GPTConfig(vocab_size=8, seq_len=8, n_layer=1, n_head=2, d_model=8)
    prompt, text = sample(Engine(cfg, device=device), task, n=12)
    assert len(prompt) == 8 and len(text) == 12 and set(text) <= set(task.itos)
