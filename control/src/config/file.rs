//! Reading the configuration file, at start and on every reload, in the control thread.
//!
//! Invariants: the path is opened with O_NONBLOCK (a FIFO or a device cannot hold the open,
//! nor the read, however it behaves), and only a regular file is read; at most
//! [`MAX_CONFIG_SIZE`] bytes are read, so a file without bound (or one that grows while it
//! is read) is refused instead of filling memory. Every refusal is a clear message.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::defaults::MAX_CONFIG_SIZE;

/// The text of the configuration file at `path`, or why it cannot be used.
pub(super) fn read(path: &Path) -> Result<String, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err(format!("is {}, not a regular file", kind(&meta.file_type())));
    }
    if meta.len() > MAX_CONFIG_SIZE {
        return Err(too_large(meta.len()));
    }
    read_bounded(file)
}

fn read_bounded(file: File) -> Result<String, String> {
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_SIZE {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!("is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to())
    })
}

fn too_large(len: u64) -> String {
    format!(
        "is larger ({len} bytes or more) than the largest configuration read, {MAX_CONFIG_SIZE} bytes (32 MiB)"
    )
}

fn kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}
