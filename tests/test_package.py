"""Every fxquant module imports: a broken one fails here, never as a skipped test elsewhere."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import fxquant

# __main__ runs the command line when imported
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(Path(fxquant.__file__).parent)], "fxquant.")
                 if m.name != "fxquant.__main__")


def test_the_package_has_its_modules():
    assert {"fxquant.api", "fxquant.capture", "fxquant.dump", "fxquant.passes.common"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_no_test_skips_over_a_missing_fxquant_module():
    """pytest.importorskip turns an ImportError into a skip: never use it on fxquant's own modules."""
    for path in Path(__file__).parent.glob("test_*.py"):
        skips = "importorskip(" + '"fxquant'  # split, so this file does not match itself
        assert skips not in path.read_text(), f"{path.name}: import fxquant modules directly"
