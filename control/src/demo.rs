//! `sluice demo`: sluice's main job on its embedded default, shown end to end. It starts an
//! echo server on the default backend address, the engine on the default listener, sends a
//! few clients' payloads through it and prints what passed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sluice_engine::counters::WorkerStats;
use sluice_engine::events::EventSink;
use sluice_engine::Engine;

use crate::config::{Config, Registry};
use crate::run::RunError;

const CLIENTS: usize = 8;
const PAYLOAD: usize = 1 << 20;

/// Runs the demo; fails if any byte did not come back as sent.
pub fn demo(config: Config) -> Result<bool, RunError> {
    let service = &config.services[0];
    let backend_addr = service.backends[0].addr;
    let listen = service.listen[0].addr;
    let backend = TcpListener::bind(backend_addr).map_err(|source| {
        RunError::Engine(sluice_engine::EngineError::Bind { addr: backend_addr, source })
    })?;
    thread::spawn(move || echo_server(backend));
    let tables = Arc::new(ArcSwap::from_pointee(config.tables(1, &mut Registry::default())));
    let (sink, _records) = EventSink::bounded(1024);
    let engine = Engine::start(&config.engine, tables, sink)?;
    println!("sluice demo: {} workers, {}", engine.worker_count(), engine.selection());
    println!(
        "forwarding {listen} -> echo server on {backend_addr}; {CLIENTS} clients send 1 MiB each\n"
    );
    println!("{:<8} {:>10} {:>10} {:>8} {:>9}", "client", "sent", "received", "intact", "time");
    let clients: Vec<_> = (0..CLIENTS).map(|i| thread::spawn(move || client(listen, i))).collect();
    let mut all_ok = true;
    for (i, handle) in clients.into_iter().enumerate() {
        let outcome = handle.join().unwrap_or_else(|_| Err(io::Error::other("client panicked")));
        match outcome {
            Ok((received, intact, took)) => {
                all_ok &= intact;
                println!(
                    "{i:<8} {PAYLOAD:>10} {received:>10} {:>8} {:>7.1}ms",
                    if intact { "yes" } else { "NO" },
                    took.as_secs_f64() * 1e3
                );
            }
            Err(e) => {
                all_ok = false;
                println!("{i:<8} failed: {e}");
            }
        }
    }
    engine.drain(Duration::from_secs(2));
    while !engine.is_stopped() {
        thread::sleep(Duration::from_millis(10));
    }
    let stats = engine.stats();
    let sum = |f: fn(&WorkerStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    println!(
        "\nsessions accepted={} closed={} bytes client->backend={} backend->client={}",
        sum(|s| WorkerStats::get(&s.accepted)),
        sum(|s| WorkerStats::get(&s.closed)),
        sum(|s| WorkerStats::get(&s.bytes_up)),
        sum(|s| WorkerStats::get(&s.bytes_down)),
    );
    engine.join()?;
    println!(
        "{}",
        if all_ok { "demo passed: every byte came back as sent" } else { "demo FAILED" }
    );
    Ok(all_ok)
}

fn client(addr: SocketAddr, seed: usize) -> io::Result<(usize, bool, Duration)> {
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i.wrapping_mul(31) ^ seed) as u8).collect();
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let to_send = payload.clone();
    let sender = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&to_send)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::with_capacity(PAYLOAD);
    stream.read_to_end(&mut received)?;
    sender.join().map_err(|_| io::Error::other("sender panicked"))??;
    Ok((received.len(), received == payload, started.elapsed()))
}

fn echo_server(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let mut reader = stream;
            let Ok(mut writer) = reader.try_clone() else { return };
            let _ = io::copy(&mut reader, &mut writer);
            let _ = writer.shutdown(Shutdown::Write);
        });
    }
}
