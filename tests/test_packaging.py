"""The installed package ships every kernel source and the package data, and is one abi3
extension (one wheel for every CPython >= 3.10).

The kernel sources live in the top-level kernels/; build.rs stages them and maturin's out-dir
include installs them as rustchat/kernels/ (copied into python/rustchat/kernels/ by an editable
install). No symlinks anywhere."""
import os
import zipfile
from importlib import resources
from pathlib import Path

import pytest

import rustchat

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "kernels").glob("*.py"))


def test_every_kernel_source_is_shipped_unchanged():
    import rustchat.kernels as k

    assert KERNEL_FILES, "kernels/ is empty?"
    installed = Path(k.__file__).parent
    for name in KERNEL_FILES:
        shipped = installed / name
        assert shipped.is_file(), f"rustchat.kernels lacks {name} (installed at {installed})"
        assert shipped.read_bytes() == (REPO / "kernels" / name).read_bytes(), f"{shipped} differs from kernels/{name}"
    for name in ("cross_entropy", "linear_cross_entropy", "apply_rotary", "rotary_tables"):
        assert callable(getattr(k, name))
    assert not any(p.is_symlink() for p in (REPO / "python").rglob("*")), "symlinks in python/"
    assert not any(p.is_symlink() for p in (REPO / "kernels").rglob("*")), "symlinks in kernels/"


@pytest.mark.skipif(not os.environ.get("RUSTCHAT_WHEEL"), reason="set RUSTCHAT_WHEEL=path/to/rustchat-*.whl to inspect a built wheel")
def test_built_wheel_contents():
    names = set(zipfile.ZipFile(os.environ["RUSTCHAT_WHEEL"]).namelist())
    missing = [f for f in KERNEL_FILES if f"rustchat/kernels/{f}" not in names]
    assert not missing, f"wheel lacks rustchat/kernels/{missing}"
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would shadow others"


def test_package_data_is_shipped():
    assert (resources.files("rustchat") / "data" / "identity.jsonl").is_file()


def test_extension_is_abi3():
    so = Path(rustchat._core.__file__).name
    assert ".abi3." in so, so
