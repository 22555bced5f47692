"""Every command the README and docs/ show is one the real argument parsers accept: a renamed or removed
flag fails here, not in a reader's terminal."""

import re
import shlex

import pytest

from mnist_dist import config, evaluate, predict, sweep
from mnist_dist.sweep_spec import read_spec

from .helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = {"train", "evaluate", "predict", "launch", "sweep", "doctor"}
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}


def snippets(text: str) -> list[str]:
    """The shell text of a page: each line of its fenced code blocks (continuations joined) and each
    inline code span elsewhere."""
    found, fenced = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            found.append(line.removeprefix("$ "))
        else:
            found.extend(re.findall(r"`([^`]+)`", line))
    return found


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, its arguments) for each `-m mnist_dist.MODULE ...`, `slurm/train.sh ...` and `slurm/sweep.sh ...`
    in `text`."""
    found = []
    for snippet in snippets(text):
        try:
            words = shlex.split(snippet, comments=True)
        except ValueError:  # not shell (an unbalanced quote in prose)
            continue
        for i, word in enumerate(words):
            named = re.fullmatch(r"mnist_dist\.(\w+)", word) if i and words[i - 1] == "-m" else None
            scripts = {"slurm/train.sh": "train", "slurm/sweep.sh": "sweep"}
            module = named[1] if named else scripts.get(word)
            if module:
                rest = words[i + 1:]
                if module == "train" and rest[:1] == ["--doctor"]:  # slurm/train.sh --doctor FLAGS
                    module, rest = "doctor", rest[1:]
                cut = next((j for j, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
                found.append((module, rest[:cut]))
    return found


def parse(module: str, argv: list[str]) -> None:
    """Parse `argv` as `python -m mnist_dist.MODULE` would (argparse exits 2 on a flag it refuses). A name
    without arguments (prose naming `python -m mnist_dist.launch`) must name an entry point."""
    if not argv and module in ENTRY_POINTS and module != "train":
        return
    if module in ("train", "doctor"):  # the doctor takes the run's flags
        config.parse_args(argv)  # the values checked too (TrainConfig.validate)
    elif module == "evaluate":
        evaluate.build_parser().parse_args(argv)
    elif module == "predict":
        predict.build_parser().parse_args(argv)
    elif module == "sweep":  # and the SPEC, where it is one in the repository
        spec = REPO / sweep.build_parser().parse_args(argv).spec
        if spec.is_file():
            read_spec(spec)
    elif module == "launch":
        from accelerate.commands.launch import launch_command_parser

        launch_command_parser().parse_args(argv)
    else:
        pytest.fail(f"no such entry point: mnist_dist.{module}")


ALL = [(page.relative_to(REPO), module, argv) for page in PAGES for module, argv in commands(page.read_text())]


def test_the_pages_show_commands_of_every_entry_point():
    assert {module for _, module, argv in ALL if argv} == ENTRY_POINTS
    assert len(ALL) >= 20, [" ".join(argv) for _, _, argv in ALL]


@pytest.mark.parametrize("page, module, argv", ALL, ids=[f"{p}:{m}:{' '.join(a)[:60]}" for p, m, a in ALL])
def test_each_command_in_the_readme_and_docs_parses(page, module, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checks of paths (--profile, --output-dir) see no earlier run's files
    try:
        parse(module, argv)
    except SystemExit as exit:
        if exit.code == 0:  # --help
            return
        pytest.fail(f"{page}: `python -m mnist_dist.{module} {shlex.join(argv)}` is refused ({exit.code}): "
                    f"{capsys.readouterr().err.strip()}")


def test_a_renamed_flag_is_found():
    page = "```bash\npython -m mnist_dist.train --dataset mnist-5k --hidden-units 64\n```\n"
    (module, argv), = commands(page)
    with pytest.raises(SystemExit):
        parse(module, argv)


def test_the_resume_roles_table_lists_each_flag_as_its_field_declares():
    text = (REPO / "docs" / "resume.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in text.splitlines() if line.startswith("| must")
            or line.startswith("| never")}
    named = lambda row: set(re.findall(r"`--([\w-]+)`", row))  # noqa: E731
    assert named(rows["must match the checkpoint"]) == {n.replace("_", "-") for n in config.flags_where(resume="match")}
    assert named(rows["must match under a schedule (not `constant`)"]) == {
        n.replace("_", "-") for n in config.flags_where(resume="match_scheduled")}
    assert named(rows["never taken from the checkpoint"]) == {
        n.replace("_", "-") for n in config.flags_where(resume="not_inherited")}
