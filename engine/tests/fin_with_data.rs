//! The last bytes of a stream and its end leave in one segment: when a backend's reply and
//! its FIN arrive together, the client receives them together too, not as the bytes and
//! then a lone FIN (one packet more per connection, on both hosts). Runs on every driver.
//!
//! The backend speaks first and sends its reply and FIN as one segment; the client sends
//! nothing, so every segment it receives after its handshake comes from the relay.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use sluice_engine::testing;
use sluice_engine::DriverChoice;
use sluice_engine::Relay;

mod common;

const SESSIONS: usize = 20;
const REPLY: [u8; 64] = [5; 64];

/// A backend that greets each connection with REPLY and its FIN in one segment, then waits
/// for the other side's end.
fn greeting_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            if !matches!(testing::send_before_fin(&s, &REPLY), Ok(n) if n == REPLY.len()) {
                continue;
            }
            let _ = testing::shutdown_write(&s);
            let _ = s.read(&mut [0u8; 16]);
        }
    });
    addr
}

/// Segments the client received for the reply and its end.
fn one_session(target: SocketAddr) -> u32 {
    let mut s = TcpStream::connect(target).expect("connect through the engine");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("the reply and its end");
    assert_eq!(got, REPLY);
    // The handshake brought one segment (the SYN-ACK); the reply may arrive before this
    // side looks, so the count is taken once, at the end.
    testing::segments_in(&s).unwrap() - 1
}

fn fin_leaves_with_the_last_bytes(driver: DriverChoice, relay: Relay) {
    let Some((engine, listen)) = common::one_service("greeting", greeting_backend(), driver, relay)
    else {
        return;
    };
    let segments: Vec<u32> = (0..SESSIONS).map(|_| one_session(listen)).collect();
    engine.drain(Duration::from_secs(2));
    engine.join().unwrap();
    assert!(
        segments.iter().all(|&n| n == 1),
        "{driver:?}/{relay:?}: segments per reply and FIN: {segments:?}"
    );
}

common::every_driver!(fin_leaves_with_the_last_bytes);
