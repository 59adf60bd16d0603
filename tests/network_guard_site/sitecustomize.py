"""Loaded by every Python process the tests start (this directory is first on their
``PYTHONPATH``): the network guard of ``tests/network_guard.py``, recording to the file
the test session reads (``MSC3870_NETWORK_GUARD_LOG``)."""

import importlib.util
import os
import sys
from pathlib import Path

_path = Path(__file__).resolve().parent.parent / "network_guard.py"
_spec = importlib.util.spec_from_file_location("_msc3870_network_guard", _path)
if _spec is not None and _spec.loader is not None:
    _guard = importlib.util.module_from_spec(_spec)
    # Registered before it runs: dataclasses and typing look modules up by name.
    sys.modules[_spec.name] = _guard
    _spec.loader.exec_module(_guard)
    _log = os.environ.get(_guard.LOG_ENV)
    _guard.install(_guard.file_recorder(_log) if _log else lambda f: print(f, file=sys.stderr))
