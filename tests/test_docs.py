"""The examples in README.md and docs/*.md run, and print what the docs show.

Which fenced blocks run:
- ```console: lines starting with "$ " are vae-run commands (run against the shipped bundle,
  in a scratch directory holding photo.png and photo.jpg, a catalog item's picture); the lines
  after each, up to the next "$ ", are its output (stdout and stderr together). A line "..."
  stands for any number of lines, and "..." inside a line for any text: for long or variable
  parts, and for figures that move with the CPU's float32 kernels (the encoder and decoder).
- ```python: run as one script in that directory; when an ```output block follows it
  directly, what the script prints must match it as a console command's output does.
- ```bash and ```sh blocks, which install, train, need a network, a GPU, Ray or a device, are
  not run, and each says why on the line above it: `<!-- not run: REASON -->`. Their vae-run,
  vae-train, vae-export and vae-eval lines are still checked: each names a command and options
  that exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (\S.*\S) -->")
VAE_RUN = Path(sys.executable).parent / "vae-run"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    body: str
    before: str  # the last non-blank line before the fence
    output: str | None = None  # an ```output block right after a ```python one

    def __str__(self):
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start, info = i, lines[i][3:].strip()
        end = next(j for j in range(start + 1, len(lines)) if lines[j].startswith("```"))
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        found.append(Block(path, start + 1, info, "\n".join(lines[start + 1:end]) + "\n",
                           before))
        i = end + 1
    paired = []
    for block, after in zip(found, found[1:] + [None]):
        if block.info == "python" and after is not None and after.info == "output" and \
                after.line == block.line + block.body.count("\n") + 2:
            block = Block(block.path, block.line, block.info, block.body, block.before,
                          after.body)
        paired.append(block)
    return paired


ALL = [block for path in DOCS for block in blocks(path)]
CONSOLE = [block for block in ALL if block.info == "console"]
PYTHON = [block for block in ALL if block.info == "python" and not NOT_RUN.search(block.before)]


def matches(expected: str, actual: str) -> bool:
    """actual against expected, where a line "..." is any lines and "..." in a line any text."""
    pattern = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            parts = (re.escape(part) for part in line.rstrip().split("..."))
            pattern.append("[^\n]*".join(parts) + r"[ \t]*\n")
    text = "\n".join(line.rstrip() for line in actual.rstrip("\n").splitlines()) + "\n"
    return re.fullmatch("".join(pattern), text) is not None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A working directory with photo.png and photo.jpg: catalog item 0's picture, decoded
    from its mu and enlarged, as a photo would come."""
    from PIL import Image

    from vae_edge.runtime import Runtime

    rt = Runtime.load()
    picture = rt.decode(rt.index.mu[0].astype("float32"))[0]
    image = Image.fromarray((picture * 255).round().astype("uint8")).resize((112, 112))
    directory = tmp_path_factory.mktemp("docs")
    image.save(directory / "photo.png")
    image.convert("RGB").save(directory / "photo.jpg", quality=95)
    return directory


def test_the_convention_is_followed():
    assert CONSOLE and PYTHON
    for block in ALL:
        if block.info in ("bash", "sh", "shell"):
            assert NOT_RUN.search(block.before), \
                f"{block}: a {block.info} block says why it is not run (<!-- not run: ... -->)"
        if block.info == "console":
            assert block.body.startswith("$ vae-run "), f"{block}: starts with a vae-run command"


@pytest.mark.parametrize("block", CONSOLE, ids=str)
def test_console_examples_print_what_the_docs_show(block, scratch):
    commands = re.split(r"^\$ ", block.body, flags=re.M)[1:]
    for command in commands:
        line, _, expected = command.partition("\n")
        words = line.split()
        assert words[0] == "vae-run", f"{block}: {line!r} is not a vae-run command"
        done = subprocess.run([str(VAE_RUN), *shlex.split(line)[1:]], cwd=scratch,
                              capture_output=True, text=True, timeout=60)
        shown = expected.lstrip("\n")
        if not shown.startswith("Error:"):
            assert done.returncode == 0, f"{block}: {line}\n{done.stderr}"
        assert matches(shown, done.stdout + done.stderr), \
            f"{block}: {line}\nthe doc shows:\n{shown}\nit prints:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_examples_run(block, scratch):
    done = subprocess.run([sys.executable, "-c", block.body], cwd=scratch, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{block}:\n{done.stderr}"
    if block.output is not None:
        assert matches(block.output, done.stdout), \
            f"{block}: the doc shows:\n{block.output}\nit prints:\n{done.stdout}"


def commands_and_options():
    """{program: {command or "": its option names}} of the CLIs the docs show."""
    from vae_edge.evaluation.cli import main as eval_main
    from vae_edge.export.cli import main as export_main
    from vae_edge.runtime.cli import main as run_main
    from vae_edge.training.cli import main as train_main

    def names(command):
        return {name for param in command.params for name in param.opts + param.secondary_opts}

    known = {program: {"": names(main)} for program, main in
             (("vae-train", train_main), ("vae-export", export_main), ("vae-eval", eval_main))}
    known["vae-run"] = {name: names(command) for name, command in run_main.commands.items()}
    known["vae-run"][""] = {"--help"}
    return known


def test_commands_not_run_name_commands_and_options_that_exist():
    known = commands_and_options()
    shown = 0
    for block in ALL:
        if block.info not in ("bash", "sh", "shell", "console"):
            continue
        text = block.body.replace("\\\n", " ")  # a command continued on the next line
        for line in text.splitlines():
            for part in re.split(r"&&|\||;", line.split(" #")[0]):
                words = part.replace("$(which ", "").replace(")", "").split()
                program = next((word for word in words if word in known), None)
                if program is None:
                    continue
                rest = words[words.index(program) + 1:]
                command = rest[0] if program == "vae-run" and rest and \
                    not rest[0].startswith("-") else ""
                assert command in known[program], f"{block}: {program} has no command {command!r}"
                for word in rest:
                    option = word.split("=")[0]
                    if option.startswith("-") and option != "-":
                        assert option in known[program][command] | {"--help"}, \
                            f"{block}: {program} {command} has no option {option}"
                shown += 1
    assert shown > 20, shown


def test_placeholders_match_only_what_they_stand_for():
    assert matches("a\n...\nz\n", "a\nb\nc\nz\n")
    assert matches("x = ... ms\n", "x = 1.5 ms\n")
    assert not matches("x = 1 ms\n", "x = 2 ms\n")
    assert not matches("a\nz\n", "a\nb\nz\n")
