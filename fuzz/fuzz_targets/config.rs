//! Configuration text (TOML) -> validated, compiled tables: no panic, no hang, no I/O.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::config::check_untrusted(data));
