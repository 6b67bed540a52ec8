"""The public surface is documented: every exported name and its public methods have docstrings."""

from __future__ import annotations

import inspect
import subprocess
import sys

import llmtally


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in llmtally.__all__:
        obj = getattr(llmtally, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                missing.append(name)
            for attr, value in vars(obj).items() if inspect.isclass(obj) else ():
                if not attr.startswith("_") and callable(value) and not inspect.getdoc(value):
                    missing.append(f"{name}.{attr}")
    assert not missing


def test_pydoc_renders_the_package() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pydoc", "llmtally"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "TokenTracker" in out.stdout and "llmtally: meter LLM token usage" in out.stdout
