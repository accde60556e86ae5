//! Replays every file of the PROXY protocol fuzz corpus (`fuzz/corpus/proxy_header/`)
//! through the parser, whole and cut at every length: no panic, and every answer within the
//! parser's bounds. This is how CI runs the corpus without a fuzzer.

use std::path::Path;

use sluice_engine::proxy::{parse, Parsed, MAX_HEADER};

#[test]
fn every_corpus_file_parses_without_panic_within_bounds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_header");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("corpus file");
        for n in 0..=bytes.len() {
            match parse(&bytes[..n]) {
                Ok(Parsed::Complete(h)) => assert!(h.len <= n && h.len <= MAX_HEADER),
                Ok(Parsed::Incomplete { need }) => assert!(need > n && need <= MAX_HEADER),
                Err(_) => {}
            }
        }
        files += 1;
    }
    assert!(files >= 10, "the corpus has {files} files");
}
