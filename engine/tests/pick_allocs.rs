//! Picking a backend is on every new session's path: it must not touch the allocator, under
//! any algorithm, with or without backups and earlier attempts. Allocation churn per session
//! is what slowly fragments a long-running worker's heap.

use std::time::Instant;

use sluice_engine::balance::{Algorithm, Backend, Pick, Pool, Tried};
use sluice_engine::testing::{allocations, CountingAlloc};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn pool(algorithm: Algorithm) -> Pool {
    let backend = |i: u16, weight: u32, backup: bool| Backend {
        weight,
        backup,
        ..Backend::new(([127, 0, 0, 1], 9000 + i).into())
    };
    let backends = vec![
        backend(0, 3, false),
        backend(1, 1, false),
        backend(2, 2, false),
        backend(3, 1, true),
        backend(4, 1, true),
    ];
    Pool::with_algorithm(backends, algorithm)
}

#[test]
fn picking_a_backend_allocates_nothing() {
    let now = Instant::now();
    for algorithm in [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::LeastSessions,
        Algorithm::TwoChoices,
        Algorithm::SourceHash,
    ] {
        let pool = pool(algorithm);
        let before = allocations();
        let mut picked = 0;
        for session in 0..1_000u64 {
            let (start, key) = (pool.start(), session.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut tried = Tried::default();
            // Every attempt a session may make: the later ones walk past the tried backends
            // and, once the primaries are used up, into the backups.
            while let Some(i) = pool.pick(&Pick { start, key, tried: tried.as_slice(), now }) {
                tried.push(i);
                picked += 1;
            }
            assert_eq!(tried.len(), pool.attempts(), "{algorithm:?}");
        }
        assert_eq!(picked, 1_000 * pool.attempts(), "{algorithm:?}");
        assert_eq!(allocations() - before, 0, "{algorithm:?} allocated while picking");
    }
}
