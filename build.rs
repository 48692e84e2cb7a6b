//! Stages the Triton kernel sources (the top-level `kernels/*.py`, the package layout the
//! project is specified with) in OUT_DIR; maturin's out-dir include (pyproject.toml) ships
//! them from there as `rustchat/kernels/` in the wheel, and copies them into
//! `python/rustchat/kernels/` for an editable install. One source of truth, no symlinks.
//!
//! The folder has no `__init__.py` on purpose: Python run from the checkout's root would import
//! it as the top-level package `kernels` and shadow PyPI's `kernels` (which transformers >= 5.25
//! imports). Without one it is at most a namespace package, which any installed regular package
//! of that name outranks. The package's initializer is `kernels/package_init.py`, staged as
//! `__init__.py`.
use std::{env, fs, path::PathBuf};

fn main() {
    let src = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("kernels");
    // Staged at OUT_DIR's top: the include maps OUT_DIR/<file> to rustchat/kernels/<file>.
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=kernels");
    for old in fs::read_dir(&out).expect("list OUT_DIR").flatten() {
        if old.path().extension().is_some_and(|x| x == "py") {
            fs::remove_file(old.path()).expect("clear a staged kernel"); // a deleted kernel must not linger
        }
    }
    let entries = fs::read_dir(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    for entry in entries {
        let path = entry.expect("list kernels/").path();
        if path.extension().is_some_and(|x| x == "py") {
            println!("cargo:rerun-if-changed={}", path.display());
            fs::copy(&path, out.join(staged_name(&path))).expect("stage a kernel source");
        }
    }
}

/// The name a kernel source is shipped under: `package_init.py` becomes the package's `__init__.py`.
fn staged_name(path: &std::path::Path) -> std::ffi::OsString {
    let name = path.file_name().expect("a file name");
    if name == PACKAGE_INIT {
        "__init__.py".into()
    } else {
        name.to_os_string()
    }
}

const PACKAGE_INIT: &str = "package_init.py";
