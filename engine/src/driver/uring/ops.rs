//! The operations this driver puts on the ring and how their completions find their way
//! back: `user_data` packs the operation kind, a direction and a slot or listener index.
//!
//! Ownership rule: an operation names an fd (and, for connect, an address) that must stay
//! valid until its completion arrives, also after it was cancelled. A session is therefore
//! finalised (fds closed, slot freed) only when its in-flight count is zero, so a completion
//! always refers to the session that still occupies its slot.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use crate::session::Direction;

/// Kind of an operation, stored in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Multishot accept on listener `index`.
    Accept,
    /// Readiness of the worker's eventfd.
    Wake,
    /// Connect of slot `index` to its current backend.
    Connect,
    /// Readable: the source of direction `dir` of slot `index`.
    PollIn,
    /// Writable: the destination of direction `dir` of slot `index`.
    PollOut,
    /// An AsyncCancel request; its own completion carries nothing we need.
    Cancel,
}

const KIND_SHIFT: u32 = 56;
const DIR_BIT: u64 = 1 << 55;

/// Packs an operation into `user_data`.
pub(super) fn pack(op: Op, index: u32, dir: Direction) -> u64 {
    let kind = match op {
        Op::Accept => 1u64,
        Op::Wake => 2,
        Op::Connect => 3,
        Op::PollIn => 4,
        Op::PollOut => 5,
        Op::Cancel => 6,
    };
    let dir = if dir == Direction::Down { DIR_BIT } else { 0 };
    (kind << KIND_SHIFT) | dir | index as u64
}

/// Unpacks `user_data`; `None` for a value this driver never produced.
pub(super) fn unpack(data: u64) -> Option<(Op, u32, Direction)> {
    let op = match data >> KIND_SHIFT {
        1 => Op::Accept,
        2 => Op::Wake,
        3 => Op::Connect,
        4 => Op::PollIn,
        5 => Op::PollOut,
        6 => Op::Cancel,
        _ => return None,
    };
    let dir = if data & DIR_BIT != 0 { Direction::Down } else { Direction::Up };
    Some((op, data as u32, dir))
}

/// Bit of [`Inflight`] for an operation of a session.
pub(super) fn bit(op: Op, dir: Direction) -> u8 {
    match (op, dir) {
        (Op::Connect, _) => 1,
        (Op::PollIn, Direction::Up) => 2,
        (Op::PollIn, Direction::Down) => 4,
        (Op::PollOut, Direction::Up) => 8,
        (Op::PollOut, Direction::Down) => 16,
        _ => 0,
    }
}

/// Which operations of a session are on the ring, as [`bit`]s.
pub(super) type Inflight = u8;

/// Every session operation, for cancellation.
pub(super) const SESSION_OPS: [(Op, Direction); 5] = [
    (Op::Connect, Direction::Up),
    (Op::PollIn, Direction::Up),
    (Op::PollIn, Direction::Down),
    (Op::PollOut, Direction::Up),
    (Op::PollOut, Direction::Down),
];

pub(super) fn accept_multi(fd: RawFd, index: u32) -> squeue::Entry {
    opcode::AcceptMulti::new(types::Fd(fd))
        .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        .build()
        .user_data(pack(Op::Accept, index, Direction::Up))
}

pub(super) fn poll(fd: RawFd, events: libc::c_short, user_data: u64) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), events as u32).build().user_data(user_data)
}

pub(super) fn cancel(target: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(target).build().user_data(pack(Op::Cancel, 0, Direction::Up))
}

/// # Safety
/// `addr` must stay valid and unmoved until the operation's completion arrives.
pub(super) unsafe fn connect(fd: RawFd, addr: &socket2::SockAddr, index: u32) -> squeue::Entry {
    opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len()).build().user_data(pack(
        Op::Connect,
        index,
        Direction::Up,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [Op::Accept, Op::Wake, Op::Connect, Op::PollIn, Op::PollOut, Op::Cancel] {
            for dir in [Direction::Up, Direction::Down] {
                for index in [0, 1, 77, u32::MAX] {
                    assert_eq!(unpack(pack(op, index, dir)), Some((op, index, dir)));
                }
            }
        }
        assert_eq!(unpack(0), None);
    }

    #[test]
    fn session_ops_have_distinct_bits() {
        let bits: Vec<u8> = SESSION_OPS.iter().map(|&(op, dir)| bit(op, dir)).collect();
        let all = bits.iter().fold(0u8, |acc, b| {
            assert_eq!(acc & b, 0);
            acc | b
        });
        assert_eq!(all.count_ones(), 5);
    }
}
