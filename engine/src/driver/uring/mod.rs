//! placeholder during development
use std::io;
use crate::worker::WorkerContext;
pub fn probe() -> Result<String, String> { Err("not yet".into()) }
pub(crate) fn run(ctx: WorkerContext) -> io::Result<()> { crate::driver::epoll::run(ctx) }
