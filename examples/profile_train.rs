//! Times the two phases of BPE training on a text file, without Python: counting the chunks of
//! its blank-line-separated paragraphs (`ChunkCounter::feed`, batches of 20,000) and
//! `learn_merges`; best of REPEAT runs, with a fingerprint of the merges (to check that a change
//! keeps them). RAYON_NUM_THREADS=1 gives single-thread times, steadier on a shared machine.
//! Usage: cargo run --release --example profile_train -- TEXT [REPEAT [N_MERGES]]
use rustchat_core::pretokenize::{default_pattern, Splitter};
use rustchat_core::train::{learn_merges, ChunkCounter};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let repeat: usize = args.get(2).map_or(3, |s| s.parse().unwrap());
    // 65,536 ids less the 256 bytes and 9 special tokens, as `Tokenizer.train` asks for.
    let n_merges: usize = args.get(3).map_or(65_271, |s| s.parse().unwrap());
    let docs: Vec<&str> = text.split("\n\n").filter(|d| !d.trim().is_empty()).collect();
    let (mut count_s, mut learn_s) = (f64::MAX, f64::MAX);
    let mut fingerprint = 0u64;
    let mut n_learned = 0;
    for _ in 0..repeat {
        let mut counter = ChunkCounter::new(Splitter::new(&default_pattern()).unwrap(), None, None);
        let t = Instant::now();
        for batch in docs.chunks(20_000) {
            counter.feed(batch).unwrap();
        }
        count_s = count_s.min(t.elapsed().as_secs_f64());
        let counts = counter.into_counts();
        let t = Instant::now();
        let merges = learn_merges(counts, n_merges, |_| {});
        learn_s = learn_s.min(t.elapsed().as_secs_f64());
        // FNV-1a over the merges' bytes, each merge closed by 0xff.
        fingerprint = merges.iter().fold(0xcbf2_9ce4_8422_2325, |h, m| {
            m.iter().chain([&0xff]).fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
        });
        n_learned = merges.len();
    }
    println!(
        "{} paragraphs, {:.1} MB: count {count_s:.3} s, learn_merges {learn_s:.3} s (best of {repeat}); \
         {n_learned} merges, fingerprint {fingerprint:016x}",
        docs.len(),
        text.len() as f64 / 1e6
    );
}
