"""Every `dinoscale ... --help` shows its help text as written: the rich formatter reads `[word]` as
markup and drops it (`pip install 'dinoscale[wsi]'` printed as `pip install 'dinoscale'`), so a
bracket meant literally must reach the screen."""

import re

import click
import typer
from typer.testing import CliRunner

from dinoscale.cli import app


def _commands(group: click.Command, path=()):
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*path, name))


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def test_every_help_text_keeps_its_square_brackets():
    root = typer.main.get_command(app)
    checked = 0
    for path, cmd in _commands(root):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        wanted = [m.replace("\\[", "[") for t in texts for m in re.findall(r"\\?\[[^\]\s]*\]", t)]
        if not wanted:
            continue
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        for token in wanted:
            assert token in _flat(res.output), f"`dinoscale {' '.join(path)} --help` lost {token!r}"
            checked += 1
    assert checked >= 1  # tile-slides names its [wsi] extra


def test_tile_slides_help_names_the_wsi_extra():
    res = CliRunner().invoke(app, ["tile-slides", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "pip install 'dinoscale[wsi]'" in _flat(res.output)
