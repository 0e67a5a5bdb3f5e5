"""Load a file of scripts/ as a module, for the tests of benchmark and evaluation scripts.

Why this module exists: scripts/ is not a package, so each script's test imports it by path; the
module is registered in ``sys.modules`` first because dataclasses look their module up by name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
