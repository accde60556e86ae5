//! A client's first bytes on a listener that accepts PROXY protocol -> the header v1 or v2,
//! as the drivers parse it before the firewall decides: no panic, no hang, no unbounded
//! allocation, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sluice_engine::proxy::parse(data);
});
