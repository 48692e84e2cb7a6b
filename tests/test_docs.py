"""The docs name only what exists. Every reference in README.md and docs/*.md to the code has to
resolve in the checkout:

- `rustchat.x.y` (anywhere) and `module.name` / `Class.name` in backticks, where `module` is one
  of the package's modules and `Class` one of its classes: the module's file exists and defines
  the name (read with `ast`, so nothing torch-heavy is imported; the Rust extension is asked);
- paths under python/rustchat/, rustchat/, kernels/, scripts/, tests/, docs/, rust/, .ci/:
  the file or directory exists (a `*` must match something); markdown links too;
- `name.py` / `name.sh` / `name.rs` in backticks: a file of that name exists in the sources;
- `module::NAME` in backticks: the Rust module defines NAME;
- `--flag`: a flag of some rustchat command (or of a script, or another tool's, named);
- a section cited as `docs/<page>.md, "Heading"` (in the docs and in code comments) is a heading of
  that page, or a paragraph that opens with it in bold; `section N` of design.md exists.

Names that look like references but are not rustchat's are listed in NOT_OURS with the reason.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG_SRC = ROOT / "python" / "rustchat"
FIXTURES = ROOT / "tests" / "fixtures"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), FIXTURES / "README.md"]
# where code comments and docstrings cite doc sections
COMMENTED = [
    *PKG_SRC.rglob("*.py"),
    *(ROOT / "kernels").glob("*.py"),
    *(ROOT / "scripts").glob("*"),
    *(ROOT / "tests").glob("*.py"),
    *(ROOT / "rust").rglob("*.rs"),
    ROOT / "build.rs",
]
COMMENTED = sorted(p for p in COMMENTED if p.is_file() and PKG_SRC / "kernels" not in p.parents)  # not the build's copy
SOURCE_DIRS = [PKG_SRC, ROOT / "kernels", ROOT / "scripts", ROOT / "tests", ROOT / "rust", ROOT / "examples"]

# spans in backticks that look like references to rustchat but name something else
NOT_OURS = {
    "model.embed_tokens": "transformers' parameter name (docs/design.md, export)",
    "chat_rl.py": "nanochat's RL script",
}
FILE_SUFFIXES = {
    "json",
    "jsonl",
    "md",
    "py",
    "pt",
    "pkl",
    "safetensors",
    "txt",
    "csv",
    "yaml",
    "zip",
    "html",
    "jinja",
    "parquet",
    "tiktoken",
    "gz",
    "rs",
    "sh",
    "toml",
}


# ----------------------------------------------------------------------------- the package, by ast
@functools.cache
def modules() -> dict[str, Path | None]:
    """rustchat-relative dotted module name ("" for the package) -> source file; the Rust
    extension maps to None. kernels/ is shipped as rustchat.kernels (package_init.py its
    __init__); python/rustchat/kernels/ is the build's copy of it and is skipped."""
    out: dict[str, Path | None] = {"_core": None}
    for p in sorted(PKG_SRC.rglob("*.py")):
        rel = p.relative_to(PKG_SRC).with_suffix("")
        if rel.parts[0] == "kernels":
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = p
    for p in sorted((ROOT / "kernels").glob("*.py")):
        out["kernels" if p.stem == "package_init" else f"kernels.{p.stem}"] = p
    return out


@functools.cache
def tree(mod: str) -> ast.Module:
    return ast.parse(modules()[mod].read_text(encoding="utf-8"))


def _absolute(mod: str, level: int, target: str | None) -> str:
    """The rustchat-relative name of `from <level dots><target> import ...` inside `mod`."""
    path = modules()[mod]
    here = (
        mod.split(".")
        if mod and path is not None and path.stem in ("__init__", "package_init")
        else mod.split(".")[:-1]
    )
    here = [p for p in here if p]
    here = here[: len(here) - (level - 1)] if level > 1 else here
    return ".".join(here + ([target] if target else []))


def _members(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines: functions, classes, assignments, imports."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. a guarded import
            out.update(_members(node.body))
            for h in getattr(node, "handlers", []):
                out.update(_members(h.body))
            out.update(_members(node.orelse))
    return out


def _lazy_names(t: ast.Module) -> set[str]:
    """Names a module-level __getattr__ hands out (string constants it compares with)."""
    for node in t.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return set()


def resolve(mod: str, attrs: list[str]) -> str | None:
    """None when `rustchat.<mod>.<attrs...>` exists, else what is missing."""
    if not attrs:
        return None
    if mod == "_core":
        import rustchat._core as core  # the Rust extension: no torch

        obj = core
        for a in attrs:
            if not hasattr(obj, a):
                return f"rustchat._core has no {a}"
            obj = getattr(obj, a)
        return None
    for i in range(len(attrs), 0, -1):  # the longest module name first (hf_remote has no __init__)
        if (sub := ".".join([mod, *attrs[:i]]).lstrip(".")) in modules():
            return resolve(sub, attrs[i:])
    t = tree(mod)
    members = _members(t.body)
    name, rest = attrs[0], attrs[1:]
    node = members.get(name)
    where = f"rustchat.{mod}".rstrip(".")
    if node is None:
        return None if name in _lazy_names(t) else f"{where} ({modules()[mod].relative_to(ROOT)}) has no {name}"
    if isinstance(node, ast.ImportFrom):
        if node.level == 0 and not (node.module or "").startswith("rustchat"):
            return None  # another package's name: not ours to check
        src = (
            _absolute(mod, node.level, node.module) if node.level else node.module.removeprefix("rustchat").lstrip(".")
        )
        orig = next(a.name for a in node.names if (a.asname or a.name) == name)
        if f"{src}.{orig}".lstrip(".") in modules():
            return resolve(f"{src}.{orig}".lstrip("."), rest)
        return resolve(src, [orig, *rest])
    if isinstance(node, ast.ClassDef):
        return _resolve_in_class(mod, node, rest)
    return None  # a function's or a value's attributes are not followed


def _resolve_in_class(mod: str, cls: ast.ClassDef, attrs: list[str]) -> str | None:
    if not attrs:
        return None
    members = _members(cls.body)
    if attrs[0] in members:
        node = members[attrs[0]]
        return _resolve_in_class(mod, node, attrs[1:]) if isinstance(node, ast.ClassDef) else None
    for base in cls.bases:  # inherited from a base class defined in the same module
        if isinstance(base, ast.Name):
            found = _members(tree(mod).body).get(base.id)
            if isinstance(found, ast.ClassDef) and _resolve_in_class(mod, found, attrs) is None:
                return None
            if found is None or not isinstance(found, ast.ClassDef):
                return None  # a base from elsewhere (torch, dataclasses, ...): not followed
    return f"rustchat.{mod}.{cls.name} has no {attrs[0]}"


@functools.cache
def classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Class name -> [(module, class)] for every top-level class of the package."""
    out: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for mod, path in modules().items():
        if path is None:
            continue
        for node in tree(mod).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append((mod, node))
    return out


def check_python_name(dotted: str) -> str | None:
    """`rustchat.x.y`, `module.name` or `Class.name`: None when it resolves (or is not ours)."""
    parts = dotted.split(".")
    if parts[0] == "rustchat":
        return resolve("", parts[1:])
    tops = {m.split(".")[0] for m in modules()}
    if parts[0] in tops:
        return resolve("", parts)
    if parts[0] in classes():
        errors = [_resolve_in_class(m, c, parts[1:]) for m, c in classes()[parts[0]]]
        return None if None in errors else errors[0]
    return None  # torch.load, os.stat, F.rms_norm, ...: not rustchat's


# ----------------------------------------------------------------------------- the references
def _code_spans(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # blocks: only rustchat.x below
    return re.findall(r"``?([^`]+?)``?", text)


def references(doc: Path) -> list[tuple[str, str]]:
    """(kind, reference) for everything in one doc that must exist."""
    text = doc.read_text(encoding="utf-8")
    refs = []
    for m in re.finditer(r"(?<![\w/.~-])rustchat(?:\.[A-Za-z_]\w*)+", text):
        refs.append(("python", m.group(0)))
    for span in _code_spans(text):
        span = span.strip()
        if span in NOT_OURS:
            continue
        call = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?", span)
        if call and call.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES and not span.startswith("rustchat."):
            refs.append(("python", call.group(1)))
        elif re.fullmatch(r"[\w-]+\.(py|sh|rs)", span):
            refs.append(("file name", span))
        elif m := re.fullmatch(r"(\w+)::(\w+)", span):
            refs.append(("rust", span))
    prefixes = r"(?:python/rustchat|rustchat|kernels|scripts|tests|docs|rust|\.ci)"  # not examples/: "examples/s"
    for m in re.finditer(rf"(?<![\w/.~<>-]){prefixes}/[\w.*/-]*", text):
        path = m.group(0).rstrip(".,;:")
        if not re.search(r"[<>]", text[m.end() : m.end() + 1]):  # `<base dir>/...` placeholders end here
            refs.append(("path", path))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://|#|mailto:", target):
            refs.append(("link", str((doc.parent / target.split("#")[0]).resolve().relative_to(ROOT))))
    return refs


@functools.cache
def source_file_names() -> set[str]:
    return {p.name for d in SOURCE_DIRS for p in d.rglob("*") if p.is_file()} | {"build.rs"}


def check(kind: str, ref: str) -> str | None:
    if kind == "python":
        return check_python_name(ref)
    if kind in ("path", "link"):
        path = ref.replace("python/rustchat/", "rustchat/", 1) if ref.startswith("python/") else ref
        base = ROOT / "python" if path.startswith("rustchat/") else ROOT
        if "*" in path:
            return None if list(base.glob(path)) else f"{ref} matches nothing"
        return None if (base / path).exists() else f"{ref} does not exist"
    if kind == "file name":
        return None if ref in source_file_names() else f"no file {ref} in the sources"
    if kind == "rust":
        mod, name = ref.split("::")
        for p in (ROOT / "rust" / "src" / f"{mod}.rs", ROOT / "rust" / "src" / mod / "mod.rs"):
            if p.is_file():
                return None if re.search(rf"\b{name}\b", p.read_text(encoding="utf-8")) else f"{p} has no {name}"
        return f"no Rust module {mod} in rust/src/"
    raise AssertionError(kind)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_reference_in_the_docs_exists(doc):
    refs = references(doc)
    assert refs, f"{doc} names nothing of the code?"
    bad = sorted({f"{kind} {ref}: {err}" for kind, ref in refs if (err := check(kind, ref))})
    assert not bad, f"{doc.relative_to(ROOT)} names what does not exist:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- flags
OTHER_TOOLS_FLAGS = {
    "--index-url": "pip",
    "--nproc-per-node": "torchrun",
    "--die-with-parent": "bubblewrap",
    "--example": "cargo run",
    "--release": "cargo run",
}


def rustchat_flags() -> set[str]:
    from rustchat.cli import build_parser  # no torch: the commands import it when they run

    flags, parsers = set(), [build_parser()]
    while parsers:
        for action in parsers.pop()._actions:
            flags.update(action.option_strings)
            if isinstance(action.choices, dict):  # subcommands
                parsers += action.choices.values()
    return flags


def test_every_flag_in_the_docs_exists():
    """A `--flag` is rustchat's (some command takes it), a script's (scripts/ spells it) or
    another tool's (OTHER_TOOLS_FLAGS)."""
    known = rustchat_flags() | OTHER_TOOLS_FLAGS.keys()
    scripts = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "scripts").glob("*")) if p.is_file())
    bad = []
    for doc in DOCS:
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][\w-]*", doc.read_text(encoding="utf-8")))):
            if flag not in known and not re.search(rf"(?<![\w-]){flag}(?![\w-])", scripts):
                bad.append(f"{doc.relative_to(ROOT)}: {flag} is no flag of rustchat or of scripts/")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- sections
@functools.cache
def sections(doc: str) -> tuple[set[str], set[int]]:
    """(headings and bold paragraph leads, section numbers) of docs/<doc>."""
    names, numbers = set(), set()
    for line in (ROOT / "docs" / doc).read_text(encoding="utf-8").splitlines():
        if m := re.match(r"#+ (?:(\d+)\. )?(.+)", line):
            if m.group(1):
                numbers.add(int(m.group(1)))
            names.add(m.group(2).strip())
        elif m := re.match(r"\*\*([^*]+?)\.?\*\*", line):
            names.add(m.group(1))
    return names, numbers


def _cites_section(name: str, found: set[str]) -> bool:
    return any(h == name or h.startswith((name + " (", name + ":")) for h in found)


CITES = re.compile(r'docs/(\w+\.md)[,(\s#/!*]*"([^"]{1,80})"')


def test_cited_sections_exist():
    bad = []
    for path in [*DOCS, *COMMENTED]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITES.finditer(text):
            doc, name = m.group(1), re.sub(r"\s*\n\s*(?:#|//[!/]?)?\s*", " ", m.group(2))  # over lines
            if not (ROOT / "docs" / doc).is_file():
                bad.append(f"{path.relative_to(ROOT)}: docs/{doc} does not exist")
            elif not _cites_section(name, sections(doc)[0]):
                bad.append(f'{path.relative_to(ROOT)}: docs/{doc} has no section "{name}"')
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for n in re.findall(r"\bsections? (\d+)", design):
        if int(n) not in sections("design.md")[1]:
            bad.append(f"docs/design.md: no section {n}")
    assert not bad, "\n".join(bad)


def test_the_checker_finds_drift():
    """The checks above are not vacuous: names that do not exist are reported."""
    assert check("python", "rustchat.schedules.rl_lr_multiplier")
    assert check("python", "schedules.rl_lr_multiplier")
    assert check("python", "rustchat.hf_import")
    assert check("python", "Engine.no_such_method")
    assert check("path", "rust/src/pretokenize.rs")
    assert check("path", "tests/fixtures/nope_*")
    assert check("rust", "render::NO_SUCH_NAME")
    assert check("file name", "hf_import.py")
    for ok in (
        "rustchat.load_model",
        "rustchat.Tokenizer.from_tiktoken",
        "rustchat.SPECIAL_TOKENS",
        "rustchat._core.BestFitPacker",
        "rustchat.tasks.get_task",
        "rustchat.kernels.rotary.rotary_tables",
        "trainer.run_stage",
        "Engine.decode_step",
        "torch.load",
    ):
        assert check("python", ok) is None, ok
    assert not _cites_section("Inference", sections("design.md")[0])
    assert _cites_section("Inference engine", sections("design.md")[0])
    assert _cites_section("Pretraining rows", sections("benchmarks.md")[0])


# ----------------------------------------------------------------------------- nanochat's commits
# What "nanochat" means in the docs: one of two commits (docs/design.md, "Which nanochat").
COMMITS = ("48abd7d", "92d63d4")


def blocks(text: str) -> list[tuple[list[str], str]]:
    """(enclosing headings, block) for every paragraph, list item and table row of a markdown
    page; code blocks are left out."""
    out, headings, current, fenced = [], [], [], False

    def flush():
        if current:
            out.append(([h for _, h in headings], " ".join(current)))
            current.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        if m := re.match(r"(#+) (.*)", line):
            flush()
            level = len(m.group(1))
            headings[:] = [(lv, h) for lv, h in headings if lv < level] + [(level, m.group(2))]
        elif not line.strip():
            flush()
        elif re.match(r"\s*(- |\d+\. |\|)", line) and not line.startswith("  "):
            flush()
            current.append(line)
        else:
            current.append(line)
    flush()
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_what_nanochat_does_names_the_commit(doc):
    """A paragraph, list item or table row that says what nanochat does names the commit it holds
    for (48abd7d, 92d63d4), itself or in a heading above it; names in backticks (commands,
    files) do not count as saying anything."""
    bad = []
    for headings, block in blocks(doc.read_text(encoding="utf-8")):
        prose = re.sub(r"`[^`]*`|\]\([^)]*\)", "", block)
        if re.search(r"\bnanochat\b", prose) and not any(c in " ".join([*headings, block]) for c in COMMITS):
            bad.append(block[:160])
    assert not bad, f"{doc.relative_to(ROOT)}: nanochat without its commit ({' or '.join(COMMITS)}):\n" + "\n".join(bad)


def test_every_fixture_names_its_nanochat_commit():
    """tests/fixtures/<name>_<commit>/: a commit of COMMITS, each directory in the fixtures' README."""
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    dirs = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    assert dirs
    for name in dirs:
        assert name.rsplit("_", 1)[-1] in COMMITS, f"tests/fixtures/{name}: not named after 48abd7d or 92d63d4"
        assert f"`{name}/`" in readme, f"tests/fixtures/README.md does not describe {name}/"


def test_nothing_points_outside_the_repository():
    """Docs, code and scripts name no path outside the checkout (a sibling directory, the machine
    the project was written on); .ci/run's optional corpus step is the one exception."""
    outside = re.compile("|".join([r"\.\./" + "shared", r"(?<![\w.])/" + r"work/", r"\.\./\.\./"]))
    files = [*DOCS, *COMMENTED, ROOT / "pyproject.toml", ROOT / "Cargo.toml", *(ROOT / "examples").glob("*")]
    bad = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        if p.is_file()
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not bad, "\n".join(bad)
