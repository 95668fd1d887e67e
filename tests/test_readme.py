"""README.md stays true: every console example is run and its output compared."""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def console_examples():
    for block in re.findall(r"```console\n(.*?)```", README.read_text(), re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            yield command, output


@pytest.mark.parametrize(("command", "output"), list(console_examples()))
def test_console_example(command, output, cli):
    args = shlex.split(command)
    assert args[0] == "symattn"
    result = cli(*args[1:], cwd=README.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == output
