//! One direction of a relay (a *lane*): what its source and destination are believed ready
//! for, how many bytes the driver holds for it, and how far its end of stream has come. The
//! session core steps each lane to its next action; the lane knows nothing of time, shaping
//! or records.
//!
//! Invariants:
//! - at most one operation (read, write, shutdown, probe) of a lane is with the driver at a
//!   time (`busy`), and a lane reads only when it holds no bytes: one buffer or pipe's worth
//!   per direction, never more;
//! - the end of stream is forwarded (shutdown) only once every byte read was written;
//! - a lane asks for readiness once per wait (`awaiting_*`), and a readiness report is
//!   never lost: it sets the belief whether or not the lane was waiting for it.

use crate::side::{Direction, Side};

use super::action::Action;

/// Reads a lane makes in one run of its session before the session yields to others.
pub const READS_PER_TURN: u8 = 16;

/// One direction of a session's relay.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lane {
    /// Bytes written to the destination so far.
    pub bytes: u64,
    /// Bytes read from the source that the driver holds, not yet written.
    pub held: usize,
    /// The source sent its end of stream.
    pub eof: bool,
    /// The destination was shut down for writing: the end of stream was forwarded.
    pub shut: bool,
    /// The source may have bytes (or its end): a read is worth trying.
    pub readable: bool,
    /// The destination may take bytes.
    pub writable: bool,
    /// The source has signalled its end of stream (POLLRDHUP): read on to the end so the
    /// last bytes leave with the FIN.
    pub hangup: bool,
    /// An operation of this lane is with the driver.
    pub busy: bool,
    /// Readiness of the source, resp. destination, was asked for and has not come.
    pub awaiting_in: bool,
    pub awaiting_out: bool,
    /// The driver holds a buffer or pipe for this lane.
    pub holding: bool,
    /// The session's byte cap is reached: the lane only probes whether its source ends.
    pub capped: bool,
    /// The capture must hear of this lane's forwarded FIN.
    pub capture_fin: bool,
    /// Reads left in this run (see [`READS_PER_TURN`]).
    pub reads_left: u8,
}

/// What stepping a lane gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Carry out this action.
    Act(Action),
    /// Read, if the shaper allows: the caller asks it and then calls [`Lane::read`].
    Read,
    /// The lane used its reads for this run.
    Yield,
    /// Nothing to do until an outcome, a readiness report or a timer.
    Wait,
    /// The direction is finished: its end of stream was forwarded.
    Done,
}

impl Lane {
    /// A lane of a session whose backend has just connected. The client usually speaks
    /// first: its lane tries a read at once, while the backend's waits for readiness (so a
    /// new connection costs no read that would only say EAGAIN).
    pub fn connected(dir: Direction) -> Lane {
        Lane {
            readable: dir == Direction::Up,
            writable: true,
            reads_left: READS_PER_TURN,
            ..Lane::default()
        }
    }

    /// The next thing this lane needs, for direction `dir`.
    pub fn step(&mut self, dir: Direction) -> Step {
        if self.busy {
            return Step::Wait;
        }
        let (source, destination) = (dir.source(), dir.source().other());
        if self.held > 0 {
            if self.writable {
                self.busy = true;
                return Step::Act(Action::Write { dir, fin: self.eof });
            }
            return self.await_ready(destination, false);
        }
        if self.eof {
            if std::mem::take(&mut self.holding) {
                return Step::Act(Action::Release(dir));
            }
            if !self.shut {
                self.busy = true;
                return Step::Act(Action::Shutdown(dir));
            }
            return Step::Done;
        }
        if !self.readable {
            if std::mem::take(&mut self.holding) {
                return Step::Act(Action::Release(dir));
            }
            return self.await_ready(source, true);
        }
        if self.reads_left == 0 {
            return Step::Yield;
        }
        if self.capped {
            self.busy = true;
            return Step::Act(Action::Probe(dir));
        }
        Step::Read
    }

    /// The shaper allows `max` bytes: the read to ask for.
    pub fn read(&mut self, dir: Direction, max: usize) -> Action {
        self.busy = true;
        self.holding = true;
        self.reads_left = self.reads_left.saturating_sub(1);
        Action::Read { dir, max, to_end: self.hangup }
    }

    /// The shaper holds the lane back: it waits (for a timer), without its buffer.
    pub fn throttled(&mut self, dir: Direction) -> Step {
        if std::mem::take(&mut self.holding) {
            return Step::Act(Action::Release(dir));
        }
        Step::Wait
    }

    /// Asks once for readiness of `side` (readable when `input`).
    fn await_ready(&mut self, side: Side, input: bool) -> Step {
        let awaiting = if input { &mut self.awaiting_in } else { &mut self.awaiting_out };
        if std::mem::replace(awaiting, true) {
            return Step::Wait;
        }
        Step::Act(if input { Action::AwaitReadable(side) } else { Action::AwaitWritable(side) })
    }

    /// The source may have bytes again.
    pub fn source_ready(&mut self) {
        self.readable = true;
        self.awaiting_in = false;
    }

    /// The destination may take bytes again.
    pub fn destination_ready(&mut self) {
        self.writable = true;
        self.awaiting_out = false;
    }

    /// A new run of the session: the lane may read its share again.
    pub fn new_turn(&mut self) {
        self.reads_left = READS_PER_TURN;
    }

    /// Both ends of this direction are done.
    pub fn is_done(&self) -> bool {
        self.shut
    }
}
