"""The README's ``capfilt run`` options table is true: every option it lists exists in ``capfilt run
--help`` with the default it states, and every option of ``--help`` is in the table (issue 14)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from capfilt.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_options() -> set[str]:
    text = README.read_text()
    section = text.split("### `capfilt run` options", 1)[1].split("\n\n", 2)[1]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {opt for cell in first_cells for opt in re.findall(r"`?(--[a-z][a-z-]*|-[a-z])\b", cell)}


def _help_options() -> set[str]:
    r = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", r.output))


def test_every_documented_option_exists_and_every_option_is_documented():
    documented, real = _table_options(), _help_options() - {"--help"}
    assert {"--input-format", "--progress-every", "--no-progress", "--executor"} <= documented
    assert documented - real == set(), f"in the README but not in capfilt run --help: {documented - real}"
    # typer's --no-X of a boolean flag --X needs no row of its own
    undocumented = {o for o in real - documented if not (o.startswith("--no-") and f"--{o[5:]}" in documented)}
    assert undocumented == set(), f"in capfilt run --help but not in the README table: {undocumented}"


def test_documented_defaults_match_the_code():
    import inspect

    from capfilt import cli

    params = inspect.signature(cli.run).parameters
    text = README.read_text()
    assert params["executor"].default == "auto" and "`--executor auto\\|ray\\|local` | default `auto`" in text
    assert params["progress_every"].default == 30.0 and "(default 30; 0: only the last)" in text
