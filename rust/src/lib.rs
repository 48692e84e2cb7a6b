//! rustchat's Rust core, exposed to Python as `rustchat._core`.

pub mod bpe;
pub mod collate;
pub mod guard;
pub mod idlists;
pub mod pretokenize;
pub mod render;
pub mod tokenizer;
pub mod train;
pub mod unicode;

use pyo3::prelude::*;

// mimalloc for the core's own allocations: per-document id vectors and chunk caches churn
// through many short-lived buffers, and glibc's malloc returned large ones to the kernel
// each call (page faults were ~15% of batch-encode time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<tokenizer::PyCore>()?;
    m.add_class::<tokenizer::PyTrainer>()?;
    m.add_function(wrap_pyfunction!(render::render_conversations, m)?)?;
    m.add_function(wrap_pyfunction!(collate::py_collate_sft, m)?)?;
    m.add_function(wrap_pyfunction!(collate::py_pack_rows, m)?)?;
    m.add("DEFAULT_PATTERN", pretokenize::default_pattern())?;
    m.add("CL100K_PATTERN", pretokenize::CL100K_PATTERN)?;
    m.add("SPECIAL_TOKENS", render::CHAT_SPECIALS.to_vec())?;
    Ok(())
}
