//! The Python extension `rustchat._core`: translates Python objects to and from the pure-Rust
//! core (ids cross as little-endian byte buffers, never one object per token) and releases
//! the GIL around the core's loops. Built only with the `python` cargo feature.

mod bestfit;
mod collate;
mod guard;
mod idlists;
mod render;
mod text;
mod threads;
mod tokenizer;
mod trainer;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<tokenizer::PyCore>()?;
    m.add_class::<trainer::PyTrainer>()?;
    m.add_class::<bestfit::PyBestFit>()?;
    m.add_function(wrap_pyfunction!(render::render_conversations, m)?)?;
    m.add_function(wrap_pyfunction!(collate::py_collate_sft, m)?)?;
    m.add_function(wrap_pyfunction!(collate::py_pack_rows, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?; // the Rust crate's own version, for `rustchat --version`
    m.add("DEFAULT_PATTERN", crate::pretokenize::default_pattern())?;
    m.add("CL100K_PATTERN", crate::pretokenize::CL100K_PATTERN)?;
    m.add("MAX_VOCAB", crate::bpe::MAX_VOCAB)?;
    m.add("SPECIAL_TOKENS", crate::render::CHAT_SPECIALS.to_vec())?;
    Ok(())
}
