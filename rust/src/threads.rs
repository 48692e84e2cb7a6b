//! Rayon pools by thread count, so callers can ask for `num_threads` per call.

use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Locks a mutex whose data stays valid even if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A rayon pool per requested thread count (built once); None means the global pool.
fn pool(num_threads: Option<usize>) -> Result<Option<Arc<rayon::ThreadPool>>, String> {
    static POOLS: OnceLock<Mutex<FxHashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    match num_threads {
        None => Ok(None),
        Some(0) => Err("num_threads must be at least 1".into()),
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
        assert_eq!(with_threads(Some(3), rayon::current_num_threads).unwrap(), 3);
        assert_eq!(with_threads(Some(1), rayon::current_num_threads).unwrap(), 1);
        assert_eq!(with_threads(Some(0), || ()).unwrap_err(), "num_threads must be at least 1");
        // Jobs spawned in the scope run on the asked pool.
        let seen = Mutex::new(0);
        in_pool(Some(2), |s| s.spawn(|_| *lock(&seen) = rayon::current_num_threads())).unwrap();
        assert_eq!(*lock(&seen), 2);
    }
}
