//! Hostile input (RELIABILITY.md scenario 17): every seed input of every fuzz target under
//! fuzz/corpus/<target>/ is replayed here on stable, in every test run. Each must return
//! without a panic and within a time bound (no hang). A crash the fuzzer finds is added to
//! its target's corpus as a regression input.
//!
//! One line per target below, with the same call its fuzz target makes
//! (fuzz/fuzz_targets/<target>.rs).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a fuzz target does with one input.
type Target = fn(&[u8]);

/// What each fuzz target does with one input, by target (corpus folder) name.
const TARGETS: &[(&str, Target)] = &[
    ("config", sluice::config::check_untrusted),
    ("sni", |data| {
        let _ = sluice_engine::sni::read_sni(data);
    }),
    ("proxy_header", |data| {
        let _ = sluice_engine::proxy::parse(data);
    }),
];

/// Longest a whole corpus may take (a hang fails here instead of blocking the suite).
const CORPUS_BOUND: Duration = Duration::from_secs(60);
/// Longest one input may take.
const INPUT_BOUND: Duration = Duration::from_secs(2);

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

/// The corpus of `target`, sorted by name; panics if it is missing or empty.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!("fuzz target {target}: no seed corpus at {}: {e}", dir.display())
    });
    let mut inputs: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), data)
        })
        .collect();
    assert!(!inputs.is_empty(), "fuzz target {target}: empty seed corpus at {}", dir.display());
    inputs.sort();
    inputs
}

/// Runs every input of `target` on a thread; returns the slowest input and its time.
fn replay(target: &'static str, run: Target) -> (String, Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("replay-{target}"))
        .spawn(move || {
            let mut slowest = (String::new(), Duration::ZERO);
            for (name, data) in inputs(target) {
                let t = Instant::now();
                run(&data);
                let took = t.elapsed();
                assert!(took < INPUT_BOUND, "{target}/{name} took {took:?}");
                if took > slowest.1 {
                    slowest = (name, took);
                }
            }
            let _ = tx.send(slowest);
        })
        .expect("spawn replay thread");
    match rx.recv_timeout(CORPUS_BOUND) {
        Ok(slowest) => slowest,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{target}: corpus hung past {CORPUS_BOUND:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{target}: an input panicked (above)"),
    }
}

#[test]
fn every_seed_input_of_every_fuzz_target_returns_without_a_panic() {
    for &(target, run) in TARGETS {
        let (name, took) = replay(target, run);
        println!("{target}: {} inputs, slowest {name} in {took:?}", inputs(target).len());
    }
}

#[test]
fn every_fuzz_target_has_its_replay_line_and_corpus() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for entry in std::fs::read_dir(&targets).expect("fuzz/fuzz_targets") {
        let path = entry.expect("entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        assert!(
            TARGETS.iter().any(|&(t, _)| t == name),
            "fuzz target {name} has no replay line in control/tests/fuzz_corpus.rs"
        );
        assert!(corpus_dir(name).is_dir(), "fuzz target {name} has no seed corpus");
    }
}
