//! Splits and encodes a text file with a vocabulary from `ranks.tiktoken`, timing each phase.
//! Usage: cargo run --release --example profile_encode -- TEXT RANKS_TIKTOKEN_DIR
use rustchat_core::pretokenize::CL100K_PATTERN;
use rustchat_core::tokenizer::Core;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let ranks_txt = std::fs::read_to_string(&args[2]).unwrap();
    let ranks: Vec<(Vec<u8>, u32)> = ranks_txt
        .lines()
        .map(|l| {
            let (b, r) = l.split_once(' ').unwrap();
            (b64(b), r.parse().unwrap())
        })
        .collect();
    let pattern = if args.len() > 3 && args[3] == "ours" {
        rustchat_core::pretokenize::default_pattern()
    } else {
        CL100K_PATTERN.to_string()
    };
    let core = Core::new(ranks, &pattern, vec![]).unwrap();
    let mb = text.len() as f64 / 1e6;
    let t0 = Instant::now();
    let mut n = 0usize;
    core.splitter.for_each_chunk(&text, |_| n += 1).unwrap();
    let dt = t0.elapsed().as_secs_f64();
    println!("split: {n} chunks, {:.1} MB/s", mb / dt);
    let t0 = Instant::now();
    let (mut whole, mut multi, mut multi_bytes) = (0usize, 0usize, 0usize);
    core.splitter
        .for_each_chunk(&text, |c| {
            if c.len() == 1 || core.bpe.rank(c.as_bytes()).is_some() {
                whole += 1
            } else {
                multi += 1;
                multi_bytes += c.len()
            }
        })
        .unwrap();
    let dt = t0.elapsed().as_secs_f64();
    println!("lookup only: {whole} whole, {multi} multi ({multi_bytes} bytes), {:.1} MB/s", mb / dt);
    let mut dt = f64::MAX;
    let mut ids = Vec::new();
    for _ in 0..1 {
        let t0 = Instant::now();
        ids = core.encode(&text).unwrap();
        dt = dt.min(t0.elapsed().as_secs_f64());
    }
    println!("encode: {} ids, {:.1} MB/s", ids.len(), mb / dt);
    use rayon::prelude::*;
    let docs: Vec<&str> = text.split("\n\n").collect();
    // Pure-Rust batch scaling on this machine, the ceiling for the Python batch APIs: 1 and 2
    // threads taken in turns (the VM's speed drifts), best of 8 each.
    let pools: Vec<rayon::ThreadPool> =
        [1usize, 2].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
    let mut best = [f64::MAX; 2];
    let mut cpu = [f64::MAX; 2];
    for _ in 0..8 {
        for (k, pool) in pools.iter().enumerate() {
            let (t0, c0) = (Instant::now(), cpu_seconds());
            let v: Vec<Vec<u32>> = pool.install(|| docs.par_iter().map(|d| core.encode(d).unwrap()).collect());
            best[k] = best[k].min(t0.elapsed().as_secs_f64());
            cpu[k] = cpu[k].min(cpu_seconds() - c0);
            assert!(!v.is_empty());
        }
    }
    println!(
        "batch 1 thread {:.1} MB/s, 2 threads {:.1} MB/s, ratio {:.2}",
        mb / best[0],
        mb / best[1],
        best[0] / best[1]
    );
    // CPU seconds the same work took: more with 2 threads means they slow each other down
    // (shared caches, memory), not that a core sat idle.
    println!("cpu time 1 thread {:.3} s, 2 threads {:.3} s ({:+.1}%)", cpu[0], cpu[1], 100.0 * (cpu[1] / cpu[0] - 1.0));
}

/// CPU time of every thread of this process so far, from /proc (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

fn b64(s: &str) -> Vec<u8> {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        if c == b'=' {
            break;
        }
        buf = (buf << 6) | T.iter().position(|&x| x == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}
