//! Stages the Triton kernel sources (the top-level `kernels/*.py`, the package layout the
//! project is specified with) in OUT_DIR; maturin's out-dir include (pyproject.toml) ships
//! them from there as `rustchat/kernels/` in the wheel, and copies them into
//! `python/rustchat/kernels/` for an editable install. One source of truth, no symlinks.
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
            fs::copy(&path, out.join(path.file_name().unwrap())).expect("stage a kernel source");
        }
    }
}
