"""The installed package ships every kernel source and the package data, and is one abi3
extension (one wheel for every CPython >= 3.10).

The kernel sources live in the top-level kernels/ directory; rustchat.kernels is a small package
whose __path__ points at them (the repository's kernels/ in a source checkout, the copy the wheel
carries at its top level once installed). No symlinks anywhere."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest

import rustchat

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "kernels").glob("*.py"))


def test_every_kernel_source_is_shipped():
    import rustchat.kernels as k

    assert KERNEL_FILES, "kernels/ is empty?"
    found = {p.name for d in k.__path__ for p in Path(d).glob("*.py")}
    assert set(KERNEL_FILES) <= found, f"missing from rustchat.kernels: {sorted(set(KERNEL_FILES) - found)}"
    for name in ("cross_entropy", "linear_cross_entropy", "apply_rotary", "rotary_tables"):
        assert callable(getattr(k, name))
    assert not any(p.is_symlink() for p in (REPO / "python").rglob("*")), "symlinks in python/"
    assert not any(p.is_symlink() for p in (REPO / "kernels").rglob("*")), "symlinks in kernels/"


def test_wheel_includes_the_kernels():
    """pyproject's maturin include carries every kernels/*.py into the wheel."""
    with open(REPO / "pyproject.toml", "rb") as f:
        inc = tomllib.load(f)["tool"]["maturin"]["include"]
    pats = [i if isinstance(i, str) else i["path"] for i in inc
            if isinstance(i, str) or "wheel" in ([i["format"]] if isinstance(i["format"], str) else i["format"])]
    covered = {p.name for pat in pats for p in REPO.glob(pat)}
    assert set(KERNEL_FILES) <= covered, f"not included in the wheel: {sorted(set(KERNEL_FILES) - covered)}"


def test_installed_wheel_layout_imports(tmp_path):
    """The layout a wheel installs (site/rustchat/kernels/__init__.py + site/kernels/*.py) imports
    rustchat.kernels and its submodules without the repository."""
    site = tmp_path / "site"
    (site / "rustchat" / "kernels").mkdir(parents=True)
    (site / "rustchat" / "__init__.py").write_text("")
    shutil.copy(REPO / "python" / "rustchat" / "kernels" / "__init__.py", site / "rustchat" / "kernels")
    shutil.copytree(REPO / "kernels", site / "kernels")
    code = ("import rustchat.kernels as k, sys; assert callable(k.cross_entropy); "
            "m = sys.modules['rustchat.kernels.rotary']; print(m.__file__)")
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).resolve() == (site / "kernels" / "rotary.py").resolve()


@pytest.mark.skipif(not os.environ.get("RUSTCHAT_WHEEL"), reason="set RUSTCHAT_WHEEL=path/to/rustchat-*.whl to inspect a built wheel")
def test_built_wheel_contents():
    names = set(zipfile.ZipFile(os.environ["RUSTCHAT_WHEEL"]).namelist())
    assert "rustchat/kernels/__init__.py" in names
    missing = [f for f in KERNEL_FILES if f"kernels/{f}" not in names]
    assert not missing, f"wheel lacks kernels/{missing}"


def test_package_data_is_shipped():
    assert (resources.files("rustchat") / "data" / "identity.jsonl").is_file()


def test_extension_is_abi3():
    so = Path(rustchat._core.__file__).name
    assert ".abi3." in so, so
