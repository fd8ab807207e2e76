"""The house rules of docs/architecture.md, checked on the code's imports: what may import
what, no import circle, and the closed sets the store and the call domain share."""

from __future__ import annotations

import ast
from pathlib import Path

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.store.records import MODES, SERVER_LOST

PACKAGE = Path(__file__).resolve().parent.parent / "voice_trio"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of the package, and the package modules it imports (including those
    imported only for type checking: a circle hidden there is a circle all the same).
    ``from package import module`` depends on the module, not on the package's face."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                names.update(submodules or {node.module})
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[name] = {n for n in names if n in modules and n != name}
    return found


def test_no_module_imports_from_a_package_above_it() -> None:
    below_instance = ("voice_trio.calls", "voice_trio.media", "voice_trio.fallback")
    forbidden = {
        "voice_trio.media": ("voice_trio.fallback", "voice_trio.instance", "voice_trio.web"),
        "voice_trio.fallback": ("voice_trio.media", "voice_trio.instance", "voice_trio.web"),
        "voice_trio.calls": ("voice_trio.media", "voice_trio.fallback", "voice_trio.instance"),
        "voice_trio.conversation": (*below_instance, "voice_trio.instance", "voice_trio.store"),
        "voice_trio.sim": ("voice_trio.calls", "voice_trio.media", "voice_trio.fallback"),
    }
    wrong = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        for package, banned in forbidden.items()
        if module.startswith(package + ".")
        for target in targets
        if target.startswith(banned)
    ]
    assert wrong == []


def test_there_is_no_import_circle() -> None:
    graph = imports()
    # Tarjan's strongly connected components: any with two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == []


def test_the_store_and_the_call_domain_name_modes_and_end_reasons_alike() -> None:
    assert set(MODES) == {mode.value for mode in CallMode}
    assert EndReason(SERVER_LOST) is EndReason.SERVER_LOST
    # A StrEnum member is its string: records, metric labels and JSON read as before.
    assert f"{EndReason.STREAM_LOST}" == "stream_lost" == EndReason.STREAM_LOST
