"""Every `steerlin.<name>` that steerlin's messages and docstrings send users to exists."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import steerlin

SRC = Path(steerlin.__file__).parent


def _resolves(dotted: str) -> bool:
    obj = steerlin
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        name = "steerlin." + ".".join(parts[: i + 1])
        try:
            obj = importlib.import_module(name)
        except ImportError:
            # a module of the other TransformerLens line (e.g. backend.fast needs TL3): it
            # exists if its file does and defines the rest of the name
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                return False
            src = Path(spec.origin).read_text(encoding="utf-8")
            rest = parts[i + 1 :]
            return not rest or re.search(rf"^(class|def) {rest[0]}\b|^{rest[0]} =", src, re.M)
    return True


def test_every_steerlin_name_mentioned_in_the_package_exists():
    missing = set()
    for path in SRC.rglob("*.py"):
        for m in re.finditer(
            r"steerlin\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)",
            path.read_text(encoding="utf-8"),
        ):
            name = m.group(1).rstrip(".")
            if name.endswith(("py", "json", "md", "txt")) or name.startswith(("egg", "cache")):
                continue  # file names, not attributes
            if not _resolves(name):
                missing.add(f"{path.relative_to(SRC)}: steerlin.{name}")
    assert not missing, sorted(missing)
