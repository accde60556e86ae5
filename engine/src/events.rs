//! How workers report: connection-log records ([`crate::record::Record`]) travel to the log
//! thread in batches over a bounded channel. A full channel drops the batch and counts the
//! drop: reporting never blocks a worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::record::Record;

/// Capacity of the record channel from workers to the log thread, in batches.
pub const DEFAULT_EVENT_QUEUE: usize = 4096;

/// Records sent at once: a worker collects its records and sends them as one message when
/// the batch is full or [`FLUSH_INTERVAL`] has passed, so the log thread is woken a few
/// times a second under load, not once per session. Read it as a slice; when the receiver
/// drops it, its vector goes back to the worker that sent it, so that a busy worker reuses a
/// few vectors instead of allocating one per batch (fresh allocations of varying sizes,
/// freed on another thread, slowly fragment a long-running process's heap).
#[derive(Debug)]
pub struct Batch {
    records: Vec<Record>,
    home: Sender<Vec<Record>>,
}

impl std::ops::Deref for Batch {
    type Target = [Record];

    fn deref(&self) -> &[Record] {
        &self.records
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        // A worker that is gone, or holds enough spares, lets this one go.
        let _ = self.home.try_send(records);
    }
}

/// Most records a worker holds before sending them.
pub const MAX_BATCH: usize = 256;
/// Longest a record waits in a worker before it is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Emptied batch vectors a worker keeps for reuse: enough for the batches in flight to the
/// log thread at a steady rate; under a backlog, more are allocated and later let go.
const SPARE_BATCHES: usize = 8;

/// The sending half held by each worker (each clone has its own pending batch and spares).
#[derive(Debug)]
pub struct EventSink {
    tx: Sender<Batch>,
    dropped: Arc<AtomicU64>,
    pending: Vec<Record>,
    /// When the oldest pending record was queued.
    oldest: Option<Instant>,
    /// Where receivers return emptied vectors, and where they are taken from.
    spare: (Sender<Vec<Record>>, Receiver<Vec<Record>>),
}

impl Clone for EventSink {
    fn clone(&self) -> Self {
        Self::new(self.tx.clone(), self.dropped.clone())
    }
}

impl EventSink {
    /// A bounded channel of `capacity` batches; the receiver goes to the control thread.
    pub fn bounded(capacity: usize) -> (EventSink, Receiver<Batch>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (EventSink::new(tx, Arc::default()), rx)
    }

    fn new(tx: Sender<Batch>, dropped: Arc<AtomicU64>) -> Self {
        let spare = crossbeam_channel::bounded(SPARE_BATCHES);
        Self { tx, dropped, pending: Vec::new(), oldest: None, spare }
    }

    /// Queues a record; it leaves with the next [`flush`](Self::flush).
    pub fn send(&mut self, record: Record) {
        if self.pending.capacity() == 0 {
            self.pending =
                self.spare.1.try_recv().unwrap_or_else(|_| Vec::with_capacity(MAX_BATCH));
        }
        self.pending.push(record);
        self.oldest.get_or_insert_with(Instant::now);
        if self.pending.len() >= MAX_BATCH {
            self.flush();
        }
    }

    /// When the pending records must leave, if there are any.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + FLUSH_INTERVAL)
    }

    /// Flushes if the oldest pending record has waited [`FLUSH_INTERVAL`].
    pub fn flush_if_due(&mut self, now: Instant) {
        if self.flush_deadline().is_some_and(|d| now >= d) {
            self.flush();
        }
    }

    /// Sends the pending records without blocking; a full or closed channel drops them and
    /// counts them.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.oldest = None;
        let records = std::mem::take(&mut self.pending);
        let n = records.len() as u64;
        let batch = Batch { records, home: self.spare.0.clone() };
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{CloseReason, Protocol, RecordKind, Verdict};
    use std::time::SystemTime;

    fn record() -> Record {
        Record {
            kind: RecordKind::Close,
            worker: 0,
            service: "s".into(),
            listener: ([127, 0, 0, 1], 1).into(),
            client: ([127, 0, 0, 1], 2).into(),
            backend: None,
            start: SystemTime::now(),
            end: SystemTime::now(),
            duration: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
            protocol: Protocol::Tcp,
            packets_up: 0,
            packets_down: 0,
            verdict: Verdict::Allow,
            rule: None,
            reason: Some(CloseReason::NoBackend),
            tables_version: 1,
        }
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (mut sink, rx) = EventSink::bounded(2);
        for _ in 0..5 {
            sink.send(record());
            sink.flush();
        }
        assert_eq!(rx.len(), 2);
        assert_eq!(sink.dropped(), 3);
    }

    #[test]
    fn records_travel_in_batches() {
        let (mut sink, rx) = EventSink::bounded(8);
        for _ in 0..3 {
            sink.send(record());
        }
        assert!(rx.is_empty(), "nothing leaves before a flush");
        sink.flush();
        assert_eq!(rx.try_recv().unwrap().len(), 3);
        for _ in 0..MAX_BATCH {
            sink.send(record());
        }
        assert_eq!(rx.try_recv().unwrap().len(), MAX_BATCH, "a full batch leaves at once");
    }

    #[test]
    fn a_received_batch_comes_back_to_its_worker_for_reuse() {
        let (mut sink, rx) = EventSink::bounded(8);
        sink.send(record());
        sink.flush();
        let batch = rx.try_recv().unwrap();
        let vector = batch.as_ptr();
        assert_eq!(batch.len(), 1);
        drop(batch);
        sink.send(record());
        sink.flush();
        let again = rx.try_recv().unwrap();
        assert_eq!((again.as_ptr(), again.len()), (vector, 1), "the same vector, refilled");
    }
}
