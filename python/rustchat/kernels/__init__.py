"""rustchat.kernels: Triton kernels with plain-PyTorch references (see kernels/__init__.py).

The kernel sources live in the repository's top-level kernels/ directory, one op per file. This
package points its __path__ at that directory, so `rustchat.kernels.<module>` imports them from
there: in a source checkout (editable install) the repository's kernels/, in an installed wheel
the copy that pyproject's [tool.maturin] include puts at the wheel's top level (maturin keeps an
included file's path; it cannot place it under rustchat/). No symlinks, no second copy in git.
"""
import os as _os


def _source_dir() -> str:
    here = _os.path.dirname(_os.path.abspath(__file__))
    for d in (
        _os.path.join(here, _os.pardir, _os.pardir, _os.pardir, "kernels"),  # python/rustchat/kernels -> kernels
        _os.path.join(here, _os.pardir, _os.pardir, "kernels"),  # site-packages/rustchat/kernels -> site-packages/kernels
    ):
        if _os.path.isfile(_os.path.join(d, "_backend.py")):
            return _os.path.realpath(d)
    raise ImportError(f"rustchat.kernels: kernel sources not found next to {here}")


__path__ = [_source_dir()]  # noqa: F821 (a package's search path: submodules load from there)
_init = _os.path.join(__path__[0], "__init__.py")
with open(_init, encoding="utf-8") as _f:
    exec(compile(_f.read(), _init, "exec"))  # the public names (cross_entropy, ...)
del _f, _init
