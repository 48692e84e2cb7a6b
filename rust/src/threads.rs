//! Rayon pools by thread count, so callers can ask for `num_threads` per call.
//!
//! A request for more threads than the machine has cores gets as many as it has: more would
//! only add switching (and a caller asking for a million would start a million OS threads).

use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Locks a mutex whose data stays valid even if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cores this process may run on (at least 1).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `num_threads` as it will be used: None stays None (the global pool, one thread per core),
/// 0 is refused, and more than the cores available is capped to them.
pub fn capped(num_threads: Option<usize>) -> Result<Option<usize>, String> {
    match num_threads {
        Some(0) => Err("num_threads must be at least 1".into()),
        n => Ok(n.map(|n| n.min(available_cores()))),
    }
}

/// A rayon pool per thread count (built once, at most one per core count); None means the
/// global pool.
fn pool(num_threads: Option<usize>) -> Result<Option<Arc<rayon::ThreadPool>>, String> {
    static POOLS: OnceLock<Mutex<FxHashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    match capped(num_threads)? {
        None => Ok(None),
        Some(n) => {
            let mut pools = lock(POOLS.get_or_init(Default::default));
            if let Some(p) = pools.get(&n) {
                return Ok(Some(p.clone()));
            }
            let p = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| e.to_string())?);
            pools.insert(n, p.clone());
            Ok(Some(p))
        }
    }
}

/// Runs `f` on the pool for `num_threads` (see `pool`).
pub fn with_threads<T: Send>(num_threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    Ok(match pool(num_threads)? {
        None => f(),
        Some(p) => p.install(f),
    })
}

/// Runs `f` on the calling thread with a scope whose spawned jobs run on the pool for
/// `num_threads`; returns when they all have.
pub fn in_pool<'scope, T>(num_threads: Option<usize>, f: impl FnOnce(&rayon::Scope<'scope>) -> T) -> Result<T, String> {
    Ok(match pool(num_threads)? {
        None => rayon::in_place_scope(f),
        Some(p) => p.in_place_scope(f),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_have_the_asked_size_and_zero_is_refused() {
        let cores = available_cores();
        assert_eq!(with_threads(Some(3), rayon::current_num_threads).unwrap(), 3.min(cores));
        // Far more than the cores: capped, not a million OS threads.
        assert_eq!(with_threads(Some(1_000_000), rayon::current_num_threads).unwrap(), cores);
        assert_eq!(capped(Some(usize::MAX)).unwrap(), Some(cores));
        assert_eq!(capped(None).unwrap(), None);
        assert_eq!(with_threads(Some(1), rayon::current_num_threads).unwrap(), 1);
        assert_eq!(with_threads(Some(0), || ()).unwrap_err(), "num_threads must be at least 1");
        // Jobs spawned in the scope run on the asked pool.
        let seen = Mutex::new(0);
        in_pool(Some(2), |s| s.spawn(|_| *lock(&seen) = rayon::current_num_threads())).unwrap();
        assert_eq!(*lock(&seen), 2.min(cores));
    }
}
