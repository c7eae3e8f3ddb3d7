"""`vmrun completion bash|zsh|fish`: completion scripts made from the argparse parsers."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from vmrun.cli.common import COMMANDS, Parser

SHELLS = ("bash", "zsh", "fish")
_WORD = re.compile(r"[A-Za-z0-9_.:+/=,@%-]+")


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]
    takes_value: bool
    choices: tuple[str, ...]
    help: str


@dataclass(frozen=True)
class Node:
    """What may follow one command path: its options, subcommands and positional words."""

    path: tuple[str, ...]
    options: tuple[Option, ...]
    commands: dict[str, tuple[str, Node]] = field(default_factory=dict)  # name: (help, node)
    words: tuple[str, ...] = ()  # positional arguments with fixed choices

    def walk(self) -> Iterator[Node]:
        yield self
        for _, child in self.commands.values():
            yield from child.walk()


def completion_parser() -> Parser:
    parser = Parser(prog="vmrun completion",
                    description="Print the completion script for SHELL on stdout. bash: "
                    "save it as ~/.local/share/bash-completion/completions/vmrun; zsh: as "
                    "_vmrun in a directory on $fpath; fish: as "
                    "~/.config/fish/completions/vmrun.fish.")
    parser.add_argument("shell", choices=SHELLS)
    return parser


def _checked(word: str) -> str:
    """WORD as it goes unquoted into a script; anything else is a bug in a parser."""
    if not _WORD.fullmatch(word):
        raise AssertionError(f"not a plain word for a completion script: {word!r}")
    return word


def _help_of(action: argparse.Action) -> str:
    """The option's help up to its first parenthesis or semicolon, for a one-line hint."""
    text = action.help if isinstance(action.help, str) and "%" not in action.help else ""
    return " ".join(re.split(r"[(;]", text)[0].split())[:70]


def node_of(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Node:
    options: list[Option] = []
    commands: dict[str, tuple[str, Node]] = {}
    words: list[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        choices = tuple(_checked(str(c)) for c in action.choices or ())
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._get_subactions()}
            for name, sub in action.choices.items():
                commands[name] = (helps.get(name, ""), node_of(sub, (*path, name)))
        elif action.option_strings:
            options.append(Option(tuple(map(_checked, action.option_strings)),
                                  action.nargs != 0, choices, _help_of(action)))
        else:
            words += choices
    return Node(path, tuple(options), commands, tuple(words))


def command_tree() -> Node:
    """Every command path of vmrun, from the parsers each subcommand parses with."""
    from vmrun.cli.bake import bake_parser
    from vmrun.cli.cluster import cluster_parser
    from vmrun.cli.config import config_parser
    from vmrun.cli.disk import disk_parser
    from vmrun.cli.doctor import doctor_parser
    from vmrun.cli.image import image_parser
    from vmrun.cli.info import info_parser
    from vmrun.cli.run import run_parser
    from vmrun.cli.seed import seed_parser
    from vmrun.cli.template import template_parser
    from vmrun.cli.test import test_parser

    parsers: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "run": run_parser, "info": info_parser, "seed": seed_parser, "image": image_parser,
        "disk": disk_parser, "template": template_parser, "doctor": doctor_parser,
        "completion": completion_parser, "test": test_parser, "config": config_parser,
        "cluster": cluster_parser,
    }
    root = node_of(run_parser(), ("vmrun",))
    for name, make in parsers.items():
        child = node_of(make(), ("vmrun", name))
        if name == "image":  # bake has a parser of its own, dispatched before image's
            child.commands["bake"] = ("provision an image once with cloud-init",
                                      node_of(bake_parser(), ("vmrun", "image", "bake")))
        root.commands[name] = (COMMANDS[name], child)
    return root


def _key(node: Node) -> str:
    return " ".join(node.path)


def _quote(text: str) -> str:
    """TEXT in single quotes for bash, zsh and fish alike (no backslash, no quote)."""
    return "'" + text.replace("\\", "").replace("'", "") + "'"


def _transitions(root: Node) -> list[str]:
    """Case patterns "PATH/WORD" that step into a subcommand's path."""
    return [f"{_key(node)}/{name}" for node in root.walk() for name in node.commands]


def _value_options(node: Node) -> list[Option]:
    return [o for o in node.options if o.takes_value]


def bash_script(root: Node) -> str:
    lines = [
        "# vmrun completion for bash: vmrun completion bash > "
        "~/.local/share/bash-completion/completions/vmrun",
        "_vmrun() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    local path=vmrun word i",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        word="${COMP_WORDS[i]}"',
        '        if [[ $word == -- && ($path == vmrun || $path == "vmrun run") ]]; then',
        "            COMPREPLY=($(compgen -c -- \"$cur\"))  # the guest's command",
        "            [[ $i -lt $((COMP_CWORD - 1)) ]] && COMPREPLY=($(compgen -f -- \"$cur\"))",
        "            return 0",
        "        fi",
        '        case "$path/$word" in',
        "            " + "|".join(_quote(t) for t in _transitions(root))
        + ') path="$path $word" ;;',
        "        esac",
        "    done",
        '    local options="" words="" values=""',
        '    case "$path" in',
    ]
    for node in root.walk():
        options = " ".join(n for o in node.options for n in o.names)
        words = " ".join([*node.commands, *node.words])
        lines.append(f"        {_quote(_key(node))})")
        lines.append(f"            options={_quote(options)} words={_quote(words)}")
        cases = [f"{'|'.join(o.names)}) values={_quote(' '.join(o.choices) or '-f')} ;;"
                 for o in _value_options(node)]
        if cases:
            lines.append('            case "$prev" in')
            lines += [f"                {case}" for case in cases]
            lines.append("            esac")
        lines.append("            ;;")
    lines += [
        "    esac",
        '    if [[ $values == -f ]]; then',
        '        COMPREPLY=($(compgen -f -- "$cur"))',
        '    elif [[ -n $values ]]; then',
        '        COMPREPLY=($(compgen -W "$values" -- "$cur"))',
        '    elif [[ $cur == -* ]]; then',
        '        COMPREPLY=($(compgen -W "$options" -- "$cur"))',
        '    else',
        '        COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        '        [[ ${#COMPREPLY[@]} -eq 0 ]] && COMPREPLY=($(compgen -f -- "$cur"))',
        "    fi",
        "    return 0",
        "}",
        "complete -o filenames -F _vmrun vmrun",
        "",
    ]
    return "\n".join(lines)


def zsh_script(root: Node) -> str:
    lines = [
        "#compdef vmrun",
        "# vmrun completion for zsh: vmrun completion zsh > ~/.zfunc/_vmrun "
        "(a directory on $fpath, before compinit)",
        "_vmrun() {",
        "    local path_=vmrun word i",
        "    local -a opts vals cmds",  # (words and commands are zsh's own)
        "    for ((i = 2; i < CURRENT; i++)); do",
        "        word=${words[i]}",
        '        if [[ $word == -- && ($path_ == vmrun || $path_ == "vmrun run") ]]; then',
        "            (( i == CURRENT - 1 )) && _command_names -e || _files",
        "            return",
        "        fi",
        '        case "$path_/$word" in',
        "            " + "|".join(_quote(t) for t in _transitions(root))
        + ') path_="$path_ $word" ;;',
        "        esac",
        "    done",
        "    local prev=${words[CURRENT-1]} cur=${words[CURRENT]}",
        '    case "$path_" in',
    ]
    for node in root.walk():
        lines.append(f"        {_quote(_key(node))})")
        names = [n for o in node.options for n in o.names]
        lines.append(f"            opts=({' '.join(names)})")
        described = [_quote(f"{name}:{help_}") for name, (help_, _) in node.commands.items()]
        lines.append(f"            cmds=({' '.join(described)})")
        lines.append(f"            vals=({' '.join(node.words)})")
        cases = [f"{'|'.join(o.names)}) vals=({' '.join(o.choices) or '-f'}); "
                 "opts=(); cmds=() ;;" for o in _value_options(node)]
        if cases:
            lines.append('            case "$prev" in')
            lines += [f"                {case}" for case in cases]
            lines.append("            esac")
        lines.append("            ;;")
    lines += [
        "    esac",
        '    if [[ ${vals[1]} == -f ]]; then',
        "        _files",
        '    elif [[ $cur == -* && ${#opts} -gt 0 ]]; then',
        "        compadd -- $opts",
        "    elif (( ${#cmds} )); then",
        "        _describe command cmds",
        "    elif (( ${#vals} )); then",
        "        compadd -- $vals",
        "    else",
        "        _files",
        "    fi",
        "}",
        'if [[ $zsh_eval_context[-1] == loadautofunc ]]; then',
        '    _vmrun "$@"',
        "else",
        "    compdef _vmrun vmrun",
        "fi",
        "",
    ]
    return "\n".join(lines)


def _fish_option(option: Option) -> str:
    flags = []
    for name in option.names:
        if name.startswith("--"):
            flags.append(f"-l {name[2:]}")
        elif len(name) == 2:
            flags.append(f"-s {name[1:]}")
        else:
            flags.append(f"-o {name[1:]}")
    if option.choices:
        flags.append(f"-x -a {_quote(' '.join(option.choices))}")
    elif option.takes_value:
        flags.append("-r")
    if option.help:
        flags.append(f"-d {_quote(option.help)}")
    return " ".join(flags)


def fish_script(root: Node) -> str:
    lines = [
        "# vmrun completion for fish: vmrun completion fish > "
        "~/.config/fish/completions/vmrun.fish",
        "function __vmrun_path",
        "    set -l path vmrun",
        "    for word in (commandline -opc)[2..-1]",
        '        if test "$word" = -- -a \\( "$path" = vmrun -o "$path" = "vmrun run" \\)',
        "            echo 'vmrun --'",
        "            return",
        "        end",
        '        switch "$path/$word"',
        "            case " + " ".join(_quote(t) for t in _transitions(root)),
        '                set path "$path $word"',
        "        end",
        "    end",
        "    echo $path",
        "end",
        "",
        "complete -c vmrun -e",
    ]
    for node in root.walk():
        where = f"-n \"test (__vmrun_path) = '{_key(node)}'\""
        if node.commands:
            lines.append(f"complete -c vmrun {where} -f")
        for name, (help_, _) in node.commands.items():
            lines.append(f"complete -c vmrun {where} -a {name} -d {_quote(help_)}")
        if node.words:
            lines.append(f"complete -c vmrun {where} -a {_quote(' '.join(node.words))}")
        lines += [f"complete -c vmrun {where} {_fish_option(o)}" for o in node.options]
    lines.append("")
    return "\n".join(lines)


SCRIPTS: dict[str, Callable[[Node], str]] = {
    "bash": bash_script, "zsh": zsh_script, "fish": fish_script,
}


def cmd_completion(argv: Sequence[str]) -> int:
    args = completion_parser().parse_args(list(argv))
    print(SCRIPTS[args.shell](command_tree()), end="")
    return 0
