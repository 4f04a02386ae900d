"""Usage mistakes: every verb given a bad flag value answers one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from neighbourhoods.cli import build_parser


def _typed_flags() -> list[tuple[str, str]]:
    """(verb, flag) for every option of every verb that converts its value (int, float, HxW, ...)."""
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [(verb, action.option_strings[-1]) for verb, sub in verbs.items() for action in sub._actions
            if action.option_strings and action.type is not None]


FLAGS = _typed_flags()


def test_every_verb_has_typed_flags_to_check():
    assert {verb for verb, _ in FLAGS} >= {"ingest", "cluster", "train", "evaluate", "generate", "serve", "demo"}


@pytest.mark.parametrize("verb, flag", FLAGS, ids=[f"{v} {f}" for v, f in FLAGS])
def test_a_bad_flag_value_is_one_line(verb, flag, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([verb, flag, "not-a-value\u00e9"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: neighbourhoods {verb}: argument {flag}"), err


def test_an_unknown_verb_or_flag_is_one_line():
    for argv in (["nosuch"], ["train", "--no-such-flag"], []):
        out = subprocess.run([sys.executable, "-m", "neighbourhoods", *argv], capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
        assert "Traceback" not in out.stderr
