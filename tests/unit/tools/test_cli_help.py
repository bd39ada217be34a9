"""`x402 --help` lists the commands by who uses them: operator, agent, developer."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sidecar.tools.cli import main


def sections(text: str) -> dict[str, list[str]]:
    """The help's sections, each with the command names it lists."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = found.setdefault(line[:-1], [])
        elif current is not None and line.startswith("  ") and line.strip():
            current.append(line.split()[0])
    return found


def test_help_groups_the_commands_by_audience() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = sections(result.output)
    assert list(listed)[1:] == ["Operator", "Agent", "Developer"]  # after "Options"
    assert listed["Operator"] == [
        "serve", "keygen", "secret", "envoy-config", "offers", "payer", "settle", "reconcile",
        "evidence", "anchor",
    ]  # fmt: skip
    assert listed["Agent"] == ["keygen", "pay", "topup", "channel"]
    assert listed["Developer"] == ["demo", "load", "facilitator"]
    assert "upstream" not in result.output  # hidden: the tests' demo service


def test_every_visible_command_has_an_audience() -> None:
    visible = {name for name, command in main.commands.items() if not command.hidden}
    listed = sections(CliRunner().invoke(main, ["--help"]).output)
    del listed["Options"]
    assert visible == {name for names in listed.values() for name in names}


def test_a_lane_needs_the_examples_directory_of_a_checkout(tmp_path: Path) -> None:
    """The lanes' harness is not in the wheel: `--lane` says where it looked, in one line."""
    result = CliRunner().invoke(main, ["demo", "--lane", "content", "--examples", str(tmp_path)])
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'lanes.py'} not found" in result.output
    assert "--examples DIR" in result.output
