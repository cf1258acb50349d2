//! Starting the writeback of a file range without waiting for it: the one system call the cache
//! store needs that rustix has no binding for. It lives here because this crate holds every
//! `unsafe` block of the workspace.
//!
//! What it deliberately is not: a durability guarantee (the store still fsyncs).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Asks the kernel to start writing `length` bytes of `file` from `offset` to disk, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). A large file written this way as it
/// grows is mostly on disk by the time it is fsynced. Only a hint: errors, such as a filesystem
/// without it, are ignored.
//
// Neither rustix nor nix has a safe `sync_file_range`, and the safe calls that come closest
// differ (`fadvise(DONTNEED)` also evicts the range from the page cache; `fdatasync` waits).
pub fn start_writeback(file: &File, offset: u64, length: u64) {
    let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) else { return };
    // SAFETY: sync_file_range takes no pointer and only reads its integer arguments; the
    // descriptor stays open while `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, length, libc::SYNC_FILE_RANGE_WRITE);
    }
}
