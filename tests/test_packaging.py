"""The installed package ships every kernel source and the package data, and is one abi3
extension (one wheel for every CPython >= 3.10)."""
from importlib import resources
from pathlib import Path

import rustchat

REPO = Path(__file__).resolve().parents[1]


def test_every_kernel_source_is_shipped():
    installed = {p.name for p in resources.files("rustchat.kernels").iterdir() if p.name.endswith(".py")}
    in_repo = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert in_repo, "kernels/ is empty?"
    assert in_repo <= installed, f"missing from the installed rustchat.kernels: {sorted(in_repo - installed)}"
    import rustchat.kernels as k

    for name in ("cross_entropy", "linear_cross_entropy", "apply_rotary", "rotary_tables"):
        assert callable(getattr(k, name))


def test_package_data_is_shipped():
    assert (resources.files("rustchat") / "data" / "identity.jsonl").is_file()


def test_extension_is_abi3():
    so = Path(rustchat._core.__file__).name
    assert ".abi3." in so, so
