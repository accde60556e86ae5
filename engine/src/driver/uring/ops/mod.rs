//! The operations this driver puts on the ring, and how their completions find their way
//! back: `user_data` packs the operation's kind, a side, the generation of the session's
//! slot and the slot (or listener) index. This is the only place of the driver that needs
//! `unsafe`: submitting entries, lending a connect its address, and taking ownership of the
//! fds accepts return.
//!
//! Ownership rule: an operation names an fd (and, for connect, an address) that must stay
//! valid until its completion arrives, also after it was cancelled. A session is therefore
//! freed (its fds closed, its slot reused) only when none of its operations is in flight; the
//! generation in `user_data` makes a completion that still found a reused slot recognisable.
#![allow(unsafe_code)]

pub(crate) mod bufring;

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use io_uring::{opcode, squeue, types, IoUring};

use crate::side::{Direction, Side};

/// Kind of an operation, stored in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Multishot accept on listener `index`.
    Accept,
    /// Readiness of the worker's eventfd.
    Wake,
    /// Connect of slot `index` to its current backend.
    Connect,
    /// Readable: the socket of `side` of slot `index`.
    PollIn,
    /// Writable: the socket of `side` of slot `index`.
    PollOut,
    /// An AsyncCancel request; its own completion carries nothing we need.
    Cancel,
    /// A receive from the socket of `side` into a provided buffer.
    Recv,
    /// A send to the socket of `side` from a lane's buffer.
    Send,
    /// The close of a freed session's socket; its completion carries nothing we need.
    Close,
    /// Experiment (`ring-splice`): a splice from the socket of `side` into a lane's pipe.
    #[cfg(feature = "ring-splice")]
    SpliceIn,
    /// Experiment (`ring-splice`): a splice from a lane's pipe to the socket of `side`.
    #[cfg(feature = "ring-splice")]
    SpliceOut,
}

const KIND_SHIFT: u32 = 56;
const SIDE_BIT: u64 = 1 << 55;
const GEN_SHIFT: u32 = 32;
/// Bits of a slot's generation that `user_data` carries.
pub(super) const GEN_MASK: u32 = (1 << 23) - 1;

/// What a completion is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tag {
    pub op: Op,
    pub side: Side,
    /// The slot's generation (its low [`GEN_MASK`] bits), 0 for listeners.
    pub gen: u32,
    pub index: u32,
}

/// Packs an operation into `user_data`.
pub(super) fn pack(op: Op, side: Side, gen: u32, index: u32) -> u64 {
    let kind = match op {
        Op::Accept => 1u64,
        Op::Wake => 2,
        Op::Connect => 3,
        Op::PollIn => 4,
        Op::PollOut => 5,
        Op::Cancel => 6,
        Op::Recv => 7,
        Op::Send => 8,
        Op::Close => 9,
        #[cfg(feature = "ring-splice")]
        Op::SpliceIn => 10,
        #[cfg(feature = "ring-splice")]
        Op::SpliceOut => 11,
    };
    let side = if side == Side::Backend { SIDE_BIT } else { 0 };
    (kind << KIND_SHIFT) | side | u64::from(gen & GEN_MASK) << GEN_SHIFT | u64::from(index)
}

/// Unpacks `user_data`; `None` for a value this driver never produced.
pub(super) fn unpack(data: u64) -> Option<Tag> {
    let op = match data >> KIND_SHIFT {
        1 => Op::Accept,
        2 => Op::Wake,
        3 => Op::Connect,
        4 => Op::PollIn,
        5 => Op::PollOut,
        6 => Op::Cancel,
        7 => Op::Recv,
        8 => Op::Send,
        9 => Op::Close,
        #[cfg(feature = "ring-splice")]
        10 => Op::SpliceIn,
        #[cfg(feature = "ring-splice")]
        11 => Op::SpliceOut,
        _ => return None,
    };
    let side = if data & SIDE_BIT != 0 { Side::Backend } else { Side::Client };
    let gen = (data >> GEN_SHIFT) as u32 & GEN_MASK;
    Some(Tag { op, side, gen, index: data as u32 })
}

/// Bit of [`InFlight::ops`] for an operation of a session.
pub(super) fn bit(op: Op, side: Side) -> u16 {
    let shift = match op {
        Op::Connect => return 1,
        Op::PollIn => 1,
        Op::PollOut => 3,
        Op::Recv => 5,
        Op::Send => 7,
        #[cfg(feature = "ring-splice")]
        Op::SpliceIn => 9,
        #[cfg(feature = "ring-splice")]
        Op::SpliceOut => 11,
        Op::Accept | Op::Wake | Op::Cancel | Op::Close => return 0,
    };
    1 << (shift + (side == Side::Backend) as u16)
}

/// Every operation a session can have on the ring, for cancellation.
#[cfg(not(feature = "ring-splice"))]
pub(super) const SESSION_OPS: [(Op, Side); 9] = [
    (Op::Connect, Side::Backend),
    (Op::PollIn, Side::Client),
    (Op::PollIn, Side::Backend),
    (Op::PollOut, Side::Client),
    (Op::PollOut, Side::Backend),
    (Op::Recv, Side::Client),
    (Op::Recv, Side::Backend),
    (Op::Send, Side::Client),
    (Op::Send, Side::Backend),
];

/// Every operation a session can have on the ring, for cancellation.
#[cfg(feature = "ring-splice")]
pub(super) const SESSION_OPS: [(Op, Side); 13] = [
    (Op::Connect, Side::Backend),
    (Op::PollIn, Side::Client),
    (Op::PollIn, Side::Backend),
    (Op::PollOut, Side::Client),
    (Op::PollOut, Side::Backend),
    (Op::Recv, Side::Client),
    (Op::Recv, Side::Backend),
    (Op::Send, Side::Client),
    (Op::Send, Side::Backend),
    (Op::SpliceIn, Side::Client),
    (Op::SpliceIn, Side::Backend),
    (Op::SpliceOut, Side::Client),
    (Op::SpliceOut, Side::Backend),
];

/// Bytes a lane holds in a provided buffer: received, not yet all sent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// Which buffer ring (0: small, 1: large).
    pub ring: u8,
    pub bid: u16,
    /// The first byte not yet sent, and how many are left.
    pub start: u32,
    pub len: u32,
}

/// What one lane has on the ring's data path.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RingLane {
    pub held: Option<Held>,
    /// A receive filled a whole small buffer: receive into large ones from now on.
    pub bulk: bool,
    /// A receive filled a whole large buffer: a bulk stream, which this lane moves inline
    /// after readiness from now on (one ring buffer in flight a direction, a receive then a
    /// send completion for each, costs a bulk stream far more CPU per byte).
    pub streaming: bool,
    /// Which buffer ring the receive in flight selects from.
    pub recv_ring: u8,
    /// The bytes the receive in flight may take (the core's read allowance, at most a
    /// buffer): a continuation never takes more.
    pub want: u32,
    /// The receive in flight continues a short one into the rest of the held buffer, to
    /// learn whether the source's end of stream came with its bytes.
    pub continuing: bool,
    /// The buffer rings were empty at this lane's last receive: it reads inline after
    /// readiness, into a buffer of the worker's pool, until they have buffers again.
    pub inline: bool,
}

/// What a session has on the ring.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Its operations, as [`bit`]s.
    pub ops: u16,
    /// The address its connect reads from; owned here until the connect's completion.
    pub connect_addr: Option<Box<socket2::SockAddr>>,
    /// Its lanes on the ring's data path, by direction.
    pub lanes: [RingLane; 2],
}

impl InFlight {
    pub fn lane(&mut self, dir: Direction) -> &mut RingLane {
        &mut self.lanes[dir as usize]
    }
}

/// Queues an entry, handing a full submission queue to the kernel first.
pub(super) fn push(ring: &mut IoUring, entry: &squeue::Entry) {
    loop {
        // SAFETY: every entry built in this module refers only to fds and memory that stay
        // alive until its completion arrives: sessions are freed only when nothing of theirs
        // is in flight (their fds and their boxed connect address with them), and the
        // listeners and the eventfd outlive the ring (it is dropped first); a close names an
        // fd given up to the ring, which nothing else uses or closes.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return;
        }
        if let Err(e) = ring.submit() {
            log::warn!("io_uring submit failed while the queue was full: {e}");
        }
    }
}

/// Experiment (`ring-splice`): a non-blocking splice of up to `len` bytes from `from` to
/// `to` (a socket and a pipe); `async_first`: IOSQE_ASYNC, straight to an io-wq thread.
#[cfg(feature = "ring-splice")]
pub(super) fn splice(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: u32,
    more: bool,
    async_first: bool,
    user_data: u64,
) -> squeue::Entry {
    let mut flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    if more {
        flags |= libc::SPLICE_F_MORE;
    }
    let entry =
        opcode::Splice::new(types::Fd(from.as_raw_fd()), -1, types::Fd(to.as_raw_fd()), -1, len)
            .flags(flags)
            .build()
            .user_data(user_data);
    if async_first {
        entry.flags(squeue::Flags::ASYNC)
    } else {
        entry
    }
}

/// A close of `fd`, which the ring now owns: nothing else may use or close it.
pub(super) fn close(fd: OwnedFd) -> squeue::Entry {
    opcode::Close::new(types::Fd(fd.into_raw_fd())).build().user_data(pack(
        Op::Close,
        Side::Client,
        0,
        0,
    ))
}

pub(super) fn accept_multi(fd: BorrowedFd<'_>, index: u32) -> squeue::Entry {
    opcode::AcceptMulti::new(types::Fd(fd.as_raw_fd()))
        .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        .build()
        .user_data(pack(Op::Accept, Side::Client, 0, index))
}

pub(super) fn poll(fd: BorrowedFd<'_>, events: libc::c_short, user_data: u64) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events as u32).build().user_data(user_data)
}

pub(super) fn cancel(target: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(target).build().user_data(pack(Op::Cancel, Side::Client, 0, 0))
}

/// A connect of `fd` to the address boxed in `inflight`, which keeps it until the
/// completion arrives.
pub(super) fn connect(
    fd: BorrowedFd<'_>,
    inflight: &InFlight,
    user_data: u64,
) -> Option<squeue::Entry> {
    let addr = inflight.connect_addr.as_ref()?;
    let entry = opcode::Connect::new(types::Fd(fd.as_raw_fd()), addr.as_ptr().cast(), addr.len());
    Some(entry.build().user_data(user_data))
}

/// A receive of up to `len` bytes from `fd` into a buffer the kernel picks from `group`.
pub(super) fn recv(fd: BorrowedFd<'_>, group: u16, len: u32, user_data: u64) -> squeue::Entry {
    opcode::Recv::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), len)
        .buf_group(group)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(user_data)
}

/// A receive of up to `len` bytes from `fd` into `buf` that does not wait (MSG_DONTWAIT):
/// it completes at once with what the socket holds, 0 at its end of stream, or -EAGAIN.
///
/// The bytes at `buf` must stay in place until the completion: they lie in a provided
/// buffer the lane holds until then.
pub(super) fn recv_now(
    fd: BorrowedFd<'_>,
    buf: *mut u8,
    len: u32,
    user_data: u64,
) -> squeue::Entry {
    opcode::Recv::new(types::Fd(fd.as_raw_fd()), buf, len)
        .flags(libc::MSG_DONTWAIT)
        .build()
        .user_data(user_data)
}

/// A send of `len` bytes at `buf` to `fd`; `more`: the write side is shut down next
/// (MSG_MORE, so the last bytes may leave with the FIN).
///
/// The bytes must stay in place until the send's completion: they lie in a provided
/// buffer that is given back to its ring only then.
pub(super) fn send(
    fd: BorrowedFd<'_>,
    buf: *const u8,
    len: u32,
    more: bool,
    user_data: u64,
) -> squeue::Entry {
    let mut flags = libc::MSG_NOSIGNAL;
    if more {
        flags |= libc::MSG_MORE;
    }
    opcode::Send::new(types::Fd(fd.as_raw_fd()), buf, len).flags(flags).build().user_data(user_data)
}

/// The fd a successful accept completion (`result` >= 0) carries.
pub(super) fn accepted(result: i32) -> Option<OwnedFd> {
    // SAFETY: a non-negative result of an accept completion is a new fd, created for this
    // ring's accept and owned by nothing else.
    (result >= 0).then(|| unsafe { OwnedFd::from_raw_fd(result) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [
            Op::Accept,
            Op::Wake,
            Op::Connect,
            Op::PollIn,
            Op::PollOut,
            Op::Cancel,
            Op::Recv,
            Op::Send,
            Op::Close,
        ] {
            for side in [Side::Client, Side::Backend] {
                for (gen, index) in [(0, 0), (1, 77), (GEN_MASK, u32::MAX), (5, 1 << 20)] {
                    let tag = Tag { op, side, gen, index };
                    assert_eq!(unpack(pack(op, side, gen, index)), Some(tag));
                }
            }
        }
        assert_eq!(unpack(0), None);
    }

    #[test]
    fn a_later_generation_of_a_slot_packs_differently() {
        let old = pack(Op::PollIn, Side::Client, 6, 9);
        let new = pack(Op::PollIn, Side::Client, 7, 9);
        assert_ne!(old, new);
        assert_eq!(unpack(new).map(|t| (t.gen, t.index)), Some((7, 9)));
    }

    #[test]
    fn session_ops_have_distinct_bits() {
        let bits: Vec<u16> = SESSION_OPS.iter().map(|&(op, side)| bit(op, side)).collect();
        let all = bits.iter().fold(0u16, |acc, b| {
            assert_eq!(acc & b, 0);
            acc | b
        });
        assert_eq!(all.count_ones() as usize, SESSION_OPS.len());
    }
}
