//! Peers that stop reading pin relay buffers, and that must not stall anyone else. On the
//! io_uring copy relay a stalled session holds a provided buffer per direction; once
//! stalled sessions hold every buffer of the worker's rings, a new session's receive finds
//! none (ENOBUFS) and reads inline instead, and it is served as if nothing were wrong. When
//! the stalled sessions end, their buffers go back to the rings and new sessions receive on
//! the ring again. Runs on every driver (on the others no ring exists: the new session is
//! served all the same, and no fallback is counted).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use sluice_engine::tables::Tables;
use sluice_engine::{DriverChoice, EngineConfig, Relay};
use socket2::{Domain, Socket, Type};

mod common;

/// The smallest ring `engine.ring_buffers` allows: 64 small buffers and 8 large ones.
const RING_BUFFERS: u16 = 64;
/// More stalled sessions than the rings have buffers.
const STALLED: usize = 100;
const PAYLOAD: usize = 200 * 1024;

/// A backend whose connections say what they want in their first byte: `F`, a stream of
/// bytes until the connection breaks; anything else, an echo of what follows until the end.
fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'F' {
                    let chunk = [7u8; 64 * 1024];
                    while s.write_all(&chunk).is_ok() {}
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) if s.write_all(&buf[..n]).is_ok() => {}
                        Ok(_) => break,
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A client that asks for the stream and never reads it, with a small receive buffer.
fn stalled_client(target: SocketAddr) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&target.into()).expect("connect through the engine");
    s.send(b"F").unwrap();
    s
}

/// One echo session of PAYLOAD bytes; panics unless all of it comes back within seconds.
fn echo_session(target: SocketAddr) {
    let mut s = TcpStream::connect(target).expect("connect through the engine");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sent: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let sent = sent.clone();
        thread::spawn(move || {
            w.write_all(b"E").unwrap();
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("the echo, while other sessions are stalled");
    writer.join().unwrap();
    assert!(got == sent, "the echo came back altered: {} of {PAYLOAD} bytes", got.len());
}

fn stalled_peers_do_not_stall_a_new_session(driver: DriverChoice, relay: Relay) {
    let config = EngineConfig {
        workers: 1,
        pin: false,
        driver,
        relay,
        ring_buffers: RING_BUFFERS,
        ..EngineConfig::default()
    };
    let Some((engine, listen)) =
        common::one_service_on("stalls", backend(), config, |s| Tables::new(1, vec![s]))
    else {
        return;
    };
    let stats = engine.stats()[0].clone();
    let on_ring = driver == DriverChoice::Uring && relay == Relay::Copy;
    let stalled: Vec<Socket> = (0..STALLED).map(|_| stalled_client(listen)).collect();
    if on_ring {
        // Bounded: the streams fill the stalled clients' sockets within a second or two.
        let until = Instant::now() + Duration::from_secs(20);
        while stats.ring_fallbacks.load(Ordering::Relaxed) == 0 && Instant::now() < until {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            stats.ring_fallbacks.load(Ordering::Relaxed) > 0,
            "{STALLED} stalled sessions never took every buffer of a {RING_BUFFERS}-buffer ring"
        );
    } else {
        thread::sleep(Duration::from_millis(500));
    }
    echo_session(listen);
    drop(stalled);
    let until = Instant::now() + Duration::from_secs(10);
    while stats.active.load(Ordering::Relaxed) > 0 && Instant::now() < until {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stats.active.load(Ordering::Relaxed), 0, "the stalled sessions ended");
    // Their buffers are back: new sessions receive on the ring, with no fallback.
    let fallbacks = stats.ring_fallbacks.load(Ordering::Relaxed);
    for _ in 0..10 {
        echo_session(listen);
    }
    let after = stats.ring_fallbacks.load(Ordering::Relaxed);
    assert_eq!(after, fallbacks, "{driver:?}/{relay:?}: sessions after the stall fell back");
    if !on_ring {
        assert_eq!(after, 0, "{driver:?}/{relay:?} has no ring to fall back from");
    }
    engine.drain(Duration::from_secs(2));
    engine.join().unwrap();
}

common::every_driver!(stalled_peers_do_not_stall_a_new_session);
