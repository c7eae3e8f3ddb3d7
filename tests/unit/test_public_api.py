from __future__ import annotations

import inspect
import re

import pytest

import vmrun
import vmrun.cli.common
import vmrun.cli.run
import vmrun.errors
from vmrun.errors import EXIT_SIGINT, EXIT_SIGTERM, VmrunError


def error_classes() -> dict[str, type[VmrunError]]:
    return {
        name: value
        for name, value in vars(vmrun.errors).items()
        if inspect.isclass(value) and issubclass(value, VmrunError)
    }


def docstring_tree() -> dict[str, tuple[str | None, int | None]]:
    """Parse the tree in vmrun.errors' docstring: class -> (drawn parent, drawn exit code)."""
    doc = vmrun.errors.__doc__
    assert doc is not None
    tree: dict[str, tuple[str | None, int | None]] = {}
    stack: list[str] = []  # the class drawn at each depth so far
    for line in doc.splitlines():
        # "    VmrunError   root; ...", "    ├── UsageError ...", "    │   └── VerificationError"
        match = re.match(r"^ {4}([│├└─ ]*)([A-Z]\w+)\s{2,}(.*)$", line)
        if not match:
            continue
        prefix, name, rest = match.groups()
        depth = len(prefix) // 4
        del stack[depth:]
        parent = stack[-1] if stack else None
        stack.append(name)
        code = re.search(r"\(exit (\d+)\)", rest)
        tree[name] = (parent, int(code.group(1)) if code else None)
    return tree


def cli_exit_codes() -> dict[int, str]:
    """Parse the CLI's EXIT_CODES text: code -> its description."""
    codes: dict[int, str] = {}
    for line in vmrun.cli.common.EXIT_CODES.splitlines():
        match = re.match(r"^\s+(\d{3})\s+(.*)$", line)
        if match:
            codes[int(match.group(1))] = match.group(2)
            # "130  interrupted (SIGINT), 143 terminated (SIGTERM)": two on one line
            for extra in re.finditer(r",\s+(\d{3})\s+(\w[^,]*)", match.group(2)):
                codes[int(extra.group(1))] = extra.group(2)
    return codes


# Which class each reserved code's description in the CLI help is about.
CLI_KEYWORDS = {
    "ChannelLost": "channel lost",
    "GuestPanic": "panicked",
    "CommandTimeout": "--timeout",
    "BootTimeout": "--boot-timeout",
    "QemuError": "QEMU",
    "FetchError": "fetching or verifying",
    "UsageError": "bad usage",
    "BakeFailed": "bake failed",
}


def test_all_is_sorted_and_unique() -> None:
    assert vmrun.__all__ == sorted(vmrun.__all__)
    assert len(set(vmrun.__all__)) == len(vmrun.__all__)


@pytest.mark.parametrize("name", vmrun.__all__)
def test_every_exported_name_exists(name: str) -> None:
    assert hasattr(vmrun, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from vmrun import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(vmrun.__all__)


def test_version_looks_like_a_release() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", vmrun.__version__)


def test_every_error_class_is_exported() -> None:
    assert set(error_classes()) <= set(vmrun.__all__)


@pytest.mark.parametrize("name", vmrun.__all__)
def test_exported_exceptions_derive_from_vmrun_error(name: str) -> None:
    value = getattr(vmrun, name)
    if inspect.isclass(value) and issubclass(value, BaseException):
        assert issubclass(value, VmrunError)
        assert value is getattr(vmrun.errors, name)


def test_error_tree_in_docstring_matches_classes() -> None:
    tree = docstring_tree()
    classes = error_classes()
    assert set(tree) == set(classes)
    for name, (parent, code) in tree.items():
        cls = classes[name]
        if parent is None:
            assert cls is VmrunError
        else:
            assert cls.__bases__ == (classes[parent],), name
        if code is not None:
            assert cls.exit_code == code, name
    # Every class but the root has its code drawn.
    assert all(code is not None for name, (_, code) in tree.items() if name != "VmrunError")


def test_reserved_codes_in_docstring_prose() -> None:
    doc = vmrun.errors.__doc__
    assert doc is not None
    codes = {cls.exit_code for cls in error_classes().values()}
    assert f"({min(codes)}-{max(codes)})" in doc
    assert f"{EXIT_SIGINT} (SIGINT)" in doc
    assert f"{EXIT_SIGTERM} (SIGTERM)" in doc


def test_cli_exit_codes_agree_with_classes() -> None:
    codes = cli_exit_codes()
    classes = error_classes()
    reserved = {cls.exit_code for cls in classes.values()}
    assert set(codes) == reserved | {EXIT_SIGINT, EXIT_SIGTERM}
    for name, keyword in CLI_KEYWORDS.items():
        assert keyword in codes[classes[name].exit_code], (name, codes)
    assert "SIGINT" in codes[EXIT_SIGINT]
    assert "SIGTERM" in codes[EXIT_SIGTERM]
    # The codes a signal would give (128+N) stay clear of vmrun's own ones.
    assert max(reserved) < 128


def test_every_reserved_code_is_described_once() -> None:
    classes = error_classes()
    by_code: dict[int, set[str]] = {}
    for cls in classes.values():
        # A subclass that inherits its parent's code needs no line of its own.
        owner = next(c for c in cls.__mro__ if "exit_code" in vars(c))
        by_code.setdefault(cls.exit_code, set()).add(owner.__name__)
    assert set(by_code) == set(range(117, 126))
    for owners in by_code.values():
        # VmrunError and UsageError both say 125; every other code has one owner.
        assert len(owners - {"VmrunError"}) == 1, owners
