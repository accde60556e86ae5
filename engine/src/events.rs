//! What workers report: counters (atomics, read by anyone at any time) and one record per
//! finished session, sent over a bounded channel. A full channel drops the record and
//! counts the drop: reporting never blocks a worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::session::CloseReason;

/// Capacity of the record channel from workers to the control thread.
pub const DEFAULT_EVENT_QUEUE: usize = 65_536;

/// Counters of one worker. Monotonic except `active`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub accept_errors: AtomicU64,
    pub connect_errors: AtomicU64,
}

impl WorkerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The record of one finished session.
#[derive(Debug, Clone)]
pub struct CloseRecord {
    pub worker: usize,
    pub service: Arc<str>,
    pub listener: SocketAddr,
    pub client: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub start: SystemTime,
    pub duration: Duration,
    /// Bytes client -> backend.
    pub bytes_up: u64,
    /// Bytes backend -> client.
    pub bytes_down: u64,
    pub reason: CloseReason,
    /// Version of the tables that decided the session.
    pub tables_version: u64,
}

/// Something a worker reports to the control thread.
#[derive(Debug, Clone)]
pub enum Event {
    Closed(CloseRecord),
}

/// The sending half held by each worker.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// A bounded channel of `capacity` events; the receiver goes to the control thread.
    pub fn bounded(capacity: usize) -> (EventSink, Receiver<Event>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (EventSink { tx, dropped: Arc::default() }, rx)
    }

    /// Sends without blocking; a full or closed channel drops the event and counts it.
    pub fn send(&self, event: Event) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Event {
        Event::Closed(CloseRecord {
            worker: 0,
            service: "s".into(),
            listener: ([127, 0, 0, 1], 1).into(),
            client: ([127, 0, 0, 1], 2).into(),
            backend: None,
            start: SystemTime::now(),
            duration: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
            reason: CloseReason::NoBackend,
            tables_version: 1,
        })
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (sink, rx) = EventSink::bounded(2);
        for _ in 0..5 {
            sink.send(record());
        }
        assert_eq!(rx.len(), 2);
        assert_eq!(sink.dropped(), 3);
    }
}
