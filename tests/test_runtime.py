"""Process-wide settings live in `vistune.runtime`, and only entry points set them.

Read from the source with `ast`, like tests/test_layering.py: a library module (the
trainer, the engine, ...) that sets torch's threads, tunes glibc's allocator or writes
the environment changes the process under its caller's feet; and a library module that
calls the runtime's settings does the same one step removed.
"""
from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path

import torch

from vistune import runtime

SRC = Path(__file__).resolve().parents[1] / "src" / "vistune"

# The entry points: the commands, the demo and the server's app (create_app).
ENTRY = ("cli/", "demo/", "serve/api.py")
THREAD_CALLS = {"set_num_threads", "set_num_interop_threads"}
ALLOCATOR_NAMES = {"mallopt", "malloc_trim"}
ENV_WRITES = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def process_settings(tree: ast.AST) -> list[str]:
    """Each place in ``tree`` that sets process-wide state, as 'line: what'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in THREAD_CALLS:
                found.append(f"{node.lineno}: {name}")
            elif name in ALLOCATOR_NAMES:
                found.append(f"{node.lineno}: {name}")
            elif name in ("putenv", "unsetenv"):
                found.append(f"{node.lineno}: os.{name}")
            elif isinstance(f, ast.Attribute) and name in ENV_WRITES and _is_environ(f.value):
                found.append(f"{node.lineno}: environ.{name}")
        elif isinstance(node, ast.Constant) and node.value in ALLOCATOR_NAMES:
            found.append(f"{node.lineno}: {node.value} (looked up by name)")  # ctypes: getattr(libc, "mallopt")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and _is_environ(t.value):
                    found.append(f"{node.lineno}: environ[...] {'del' if isinstance(node, ast.Delete) else '='}")
    return found


def runtime_imports(tree: ast.AST) -> list[str]:
    """Each import of vistune.runtime in ``tree`` (absolute or relative), as 'line: import'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[-1] == "runtime" or any(a.name == "runtime" for a in node.names):
                found.append(f"{node.lineno}: from {'.' * node.level}{mod} import "
                             + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name == "vistune.runtime"]
    return found


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        yield where, ast.parse(path.read_text(), str(path))


def _is_entry(where: str) -> bool:
    return where.startswith(ENTRY)


def test_only_the_runtime_and_entry_points_set_process_wide_state():
    found = [f"{where}:{f}" for where, tree in _modules() if where != "runtime.py" and not _is_entry(where)
             for f in process_settings(tree)]
    assert not found, "library code sets process-wide state (use vistune.runtime from an entry point):\n  " + \
        "\n  ".join(found)


def test_only_entry_points_call_the_runtime():
    found = [f"{where}:{f}" for where, tree in _modules() if not _is_entry(where) for f in runtime_imports(tree)]
    assert not found, "library code calls vistune.runtime (only cli/, demo/ and create_app may):\n  " + \
        "\n  ".join(found)


def test_the_checks_find_what_they_look_for():
    src = textwrap.dedent("""
        import os, ctypes, torch
        from . import runtime
        from ..runtime import threads
        torch.set_num_threads(2)
        torch.set_num_interop_threads(1)
        ctypes.CDLL(None).mallopt(-3, 1)
        fn = getattr(ctypes.CDLL(None), "malloc_trim")
        os.environ["A"] = "1"
        os.environ.setdefault("B", "0")
        os.environ.update(C="1")
        del os.environ["D"]
        os.putenv("E", "1")
        x = os.environ.get("F")  # reading is fine
        torch.get_num_threads()
    """)
    tree = ast.parse(src)
    assert len(process_settings(tree)) == 9
    assert len(runtime_imports(tree)) == 2
    runtime_src = (SRC / "runtime.py").read_text()
    assert process_settings(ast.parse(runtime_src)), "the runtime module itself must be found setting state"


def test_threads_are_set_for_a_block_and_put_back():
    before = torch.get_num_threads()
    with runtime.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_training_tunes_the_allocator_only_without_an_accelerator(monkeypatch):
    import vistune.hardware

    calls = []
    monkeypatch.setattr(runtime, "training_memory", lambda: calls.append("training") or True)
    monkeypatch.setattr(vistune.hardware, "has_accelerator", lambda: True)
    assert runtime.training_process() is False and calls == []  # a GPU run: the allocator is left alone
    monkeypatch.setattr(vistune.hardware, "has_accelerator", lambda: False)
    assert runtime.training_process() is True and calls == ["training"]


def test_serving_turns_gradio_analytics_off_only_with_the_page(monkeypatch):
    monkeypatch.setattr(runtime, "one_malloc_arena", lambda: True)
    monkeypatch.setattr(runtime, "inference_memory", lambda: True)
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    runtime.serving_process(web=False)
    assert "GRADIO_ANALYTICS_ENABLED" not in os.environ
    runtime.serving_process(web=True)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # the user's own choice stands
    runtime.serving_process(web=True)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "True"

