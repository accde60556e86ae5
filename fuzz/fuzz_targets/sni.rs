//! A client's first bytes -> the TLS ClientHello's server name, as the firewall reads it
//! with MSG_PEEK: no panic, no hang, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sluice_engine::sni::read_sni(data);
});
