//! The ring itself: how it is set up (the best task-running mode the kernel offers, the
//! queue sizes) and the probe that says once, at start, whether this kernel can run the
//! driver and with which features.

use std::io;

use io_uring::{opcode, IoUring, Probe};

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// Completion queue entries per ring (the kernel keeps overflow, FEAT_NODROP, beyond this).
const CQ_ENTRIES: u32 = 8192;

/// How the ring runs completion work, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskRun {
    /// SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1+): completion work runs only when the
    /// worker asks for completions, on the worker's own thread.
    Defer,
    /// COOP_TASKRUN (Linux 5.19+): no interrupting IPIs for completion work.
    Coop,
}

pub(super) fn build_ring() -> io::Result<(IoUring, TaskRun)> {
    let defer = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(RING_ENTRIES);
    if let Ok(ring) = defer {
        return Ok((ring, TaskRun::Defer));
    }
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(CQ_ENTRIES)
        .build(RING_ENTRIES)?;
    Ok((ring, TaskRun::Coop))
}

/// Whether the kernel of `ring` knows `opcode`.
pub(super) fn supports(ring: &IoUring, opcode: u8) -> bool {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok() && probe.is_supported(opcode)
}

/// Checks that this kernel can run the driver; returns the features line, or why not.
/// COOP_TASKRUN support implies Linux 5.19+, which also has multishot accept.
pub fn probe() -> Result<String, String> {
    let (ring, taskrun) = build_ring()
        .map_err(|e| format!("cannot create a ring with COOP_TASKRUN (needs Linux 5.19+): {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe opcodes: {e}"))?;
    for (name, code) in [
        ("accept", opcode::Accept::CODE),
        ("connect", opcode::Connect::CODE),
        ("poll_add", opcode::PollAdd::CODE),
        ("async_cancel", opcode::AsyncCancel::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("opcode {name} is not supported"));
        }
    }
    let params = ring.params();
    if !params.is_feature_ext_arg() {
        return Err("no IORING_FEAT_EXT_ARG for timed waits (needs Linux 5.11+)".into());
    }
    if !params.is_feature_nodrop() {
        return Err("no IORING_FEAT_NODROP (needs Linux 5.5+)".into());
    }
    let taskrun = match taskrun {
        TaskRun::Defer => "single_issuer,defer_taskrun",
        TaskRun::Coop => "coop_taskrun",
    };
    Ok(format!(
        "{taskrun},multishot_accept,connect,poll_add,splice=inline,fast_poll={}",
        params.is_feature_fast_poll()
    ))
}
