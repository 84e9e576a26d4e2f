//! Large weight buffers in transparent huge pages.
//!
//! A model's weights are read end to end at every decoding step. In 4 KiB pages, t5-base's
//! f32 weights span about 120 000 pages: loading takes a page fault (and a zeroed page) for
//! each, and every step walks that many TLB entries. Marking a fresh buffer `MADV_HUGEPAGE`
//! before its first write lets Linux back it with 2 MiB pages where the system allows it
//! (`/sys/kernel/mm/transparent_hugepage/enabled` set to `madvise` or `always`). It is advice
//! only: where it is refused, or on other systems, nothing changes.

/// Asks for huge pages for the 2 MiB-aligned interior of `buf`, a fresh allocation not yet
/// written (so that its first writes fault in huge pages).
pub(crate) fn advise<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `buf`'s allocation, which this process owns;
            // MADV_HUGEPAGE changes how pages are backed, never their contents. A failure
            // (a kernel without THP) leaves ordinary pages, so its result is ignored.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// `n` zeros in a buffer advised as [`advise`] says (fresh zero pages from the allocator, not
/// yet written), or an out-of-memory error naming `what`.
pub(crate) fn zeroed<T: crate::alloc::ZeroBits>(
    n: usize,
    what: &str,
) -> crate::error::Result<Vec<T>> {
    let v = crate::alloc::try_zeroed(n, what)?;
    advise(&v);
    Ok(v)
}
