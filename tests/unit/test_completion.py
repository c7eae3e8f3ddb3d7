"""Shell completion scripts: parsed by bash, zsh and fish, and completing for real in bash
and fish; `vmrun --help` lists every subcommand."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmrun.cli import SUBCOMMANDS, main
from vmrun.cli.completion import SCRIPTS, command_tree

CHECK = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}


def script(tmp_path: Path, shell: str, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["completion", shell]) == 0
    path = tmp_path / f"vmrun.{shell}"
    path.write_text(capsys.readouterr().out)
    return path


def needs(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (scripts/setup installs it)")


@pytest.mark.parametrize("shell", sorted(CHECK))
def test_each_script_parses_in_its_shell(tmp_path: Path, shell: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    needs(shell)
    path = script(tmp_path, shell, capsys)
    checked = subprocess.run([*CHECK[shell], str(path)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "image" in path.read_text() and "snapshot" in path.read_text()


def test_a_broken_script_is_refused_by_the_same_check(tmp_path: Path) -> None:
    # The parse checks above can fail: the same commands refuse a script cut short.
    for shell in CHECK:
        needs(shell)
        text = SCRIPTS[shell](command_tree())
        cut = tmp_path / f"cut.{shell}"
        cut.write_text(text[: text.index("\nend\n" if shell == "fish" else "\n}\n")])
        checked = subprocess.run([*CHECK[shell], str(cut)], capture_output=True, timeout=60)
        assert checked.returncode != 0, shell


def bash_complete(path: Path, line: str) -> list[str]:
    """What the bash completion offers for LINE (its last word is the one completed)."""
    words = line.split(" ")
    array = " ".join(f"'{w}'" for w in words)
    program = (f"source {path}; COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; "
               'COMP_LINE="$*"; _vmrun; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.split()


def test_bash_completes_subcommands_options_and_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    needs("bash")
    path = script(tmp_path, "bash", capsys)
    monkeypatch.chdir(tmp_path)
    assert bash_complete(path, "vmrun ima") == ["image"]
    assert bash_complete(path, "vmrun image b") == ["bake"]
    assert set(bash_complete(path, "vmrun image ")) >= {"pull", "push", "ls", "bake"}
    assert bash_complete(path, "vmrun image bake --user-") == ["--user-data"]
    assert bash_complete(path, "vmrun disk snapshot ") == ["create", "list", "apply", "delete"]
    assert bash_complete(path, "vmrun --share r") == ["rw", "ro"]
    assert bash_complete(path, "vmrun --cpus 2 --shar") == ["--share", "--share-via"]
    assert bash_complete(path, "vmrun completion ") == ["bash", "zsh", "fish"]
    # After "--": the guest's command, then file names.
    assert "true" in bash_complete(path, "vmrun -- tru")
    (tmp_path / "notes.txt").write_text("")
    assert bash_complete(path, "vmrun -- cat note") == ["notes.txt"]
    assert bash_complete(path, "vmrun image import note") == ["notes.txt"]


def test_fish_completes_subcommands_with_their_description(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    needs("fish")
    path = script(tmp_path, "fish", capsys)
    done = subprocess.run(["fish", "--no-config", "-c",
                           f"source {path}; complete -C'vmrun ima'; "
                           f"complete -C'vmrun disk snapshot '; complete -C'vmrun --net '"],
                          capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("image\tpull, push, import"), lines
    assert {"create", "list", "apply", "delete", "user", "none"} <= {
        line.split("\t")[0] for line in lines}


# zsh completes only inside its line editor; the completion builtins the script calls are
# stood in for by functions that print what they were given (zsh filters by prefix itself).
ZSH_STANDINS = """
compdef() { : }
compadd() { while [[ $1 != -- ]]; do shift; done; shift; print -l -- "$@" }
_describe() { print -l -- ${(P)2} }
_files() { print FILES }
_command_names() { print COMMANDS }
"""


def zsh_complete(path: Path, line: str) -> list[str]:
    words = line.split(" ")
    array = " ".join(f"'{w}'" for w in words)
    program = f"{ZSH_STANDINS}source {path}; words=({array}); CURRENT={len(words)}; _vmrun"
    done = subprocess.run(["zsh", "-fc", program], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.splitlines()


def test_zsh_offers_what_each_position_takes(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    needs("zsh")
    path = script(tmp_path, "zsh", capsys)
    assert [c.split(":")[0] for c in zsh_complete(path, "vmrun ima")] == list(SUBCOMMANDS)
    assert zsh_complete(path, "vmrun image ima")[0].startswith("pull:")
    assert zsh_complete(path, "vmrun disk snapshot ") == ["create", "list", "apply", "delete"]
    assert zsh_complete(path, "vmrun --share ") == ["rw", "ro", "none"]
    assert "--share-via" in zsh_complete(path, "vmrun --cpus 2 --sha")
    assert zsh_complete(path, "vmrun -- ") == ["COMMANDS"]
    assert zsh_complete(path, "vmrun -- cat ") == ["FILES"]
    assert zsh_complete(path, "vmrun image bake --user-data ") == ["FILES"]


def test_the_tree_has_every_subcommand() -> None:
    tree = command_tree()
    assert tuple(tree.commands) == SUBCOMMANDS
    image = tree.commands["image"][1]
    assert "bake" in image.commands
    assert {n for o in image.commands["bake"][1].options for n in o.names} >= {
        "--user-data", "--timeout", "--arch"}


def test_help_lists_every_subcommand_on_a_line_of_its_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    block = out.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in block] == list(SUBCOMMANDS)
    assert all(re.fullmatch(r"  \S+ +\S.*", line) for line in block), block
