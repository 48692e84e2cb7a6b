//! rustchat's Rust core: BPE tokenizer (vocabulary, pre-splitting, encoding, training),
//! conversation rendering, SFT collation and packing, all pure Rust. The Python extension
//! `rustchat._core` is the `py` module, compiled only with the `python` feature (maturin turns
//! it on), so `cargo test` runs without Python.

pub mod bestfit;
pub mod bpe;
pub mod collate;
pub mod le;
pub mod pack;
pub mod pretokenize;
pub mod render;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod unicode;

#[cfg(feature = "python")]
mod py;

// mimalloc for the core's own allocations: per-document id vectors and chunk caches churn
// through many short-lived buffers, and glibc's malloc returned large ones to the kernel
// each call (page faults were ~15% of batch-encode time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
