"""The package's layout stays one a newcomer can hold in their head: few rooms, a module per job,
and `import chargpt` cheap (the import direction itself is import-linter's, in `.ci/run`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import chargpt

PACKAGE = Path(chargpt.__file__).parent
DUNDER = {"__init__.py", "__main__.py", "__pycache__"}


def test_the_package_has_at_most_twelve_rooms():
    names = sorted(p.name for p in PACKAGE.iterdir() if p.name not in DUNDER)
    assert len(names) <= 12, names


def test_import_chargpt_loads_no_torch_until_a_name_is_used():
    code = (
        "import sys, chargpt; assert 'torch' not in sys.modules, 'torch loaded'; "
        "chargpt.CharTokenizer; assert 'torch' not in sys.modules, 'torch loaded by tokenizer'; "
        "chargpt.Trainer; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_public_api_names_resolve():
    for name in chargpt.__all__:
        assert getattr(chargpt, name) is not None
    assert "Trainer" in dir(chargpt)
