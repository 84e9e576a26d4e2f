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

/// A buffer of packed weights: carved from a large anonymous mapping in 2 MiB pages
/// ([`HugeBuf::zeroed`]), or an ordinary vector.
///
/// Why: [`zeroed`] can only advise the 2 MiB-aligned interior of an allocation of its own, and
/// the allocator places one at any 4 KiB boundary: a 768 x 768 f32 weight (2.3 MiB) rarely
/// holds a whole aligned 2 MiB extent, a bf16 one (1.2 MiB) never does. In t5-base f32, 45%
/// of the packed weights (400 of 880 MiB) were left in 4 KiB pages. Weights placed one after
/// the other in chunks of 128 MiB (`map::CHUNK`), each aligned to 2 MiB and advised whole,
/// all come in huge pages (and in the order they were loaded). Batch-1 decoding, which reads
/// every weight once per step, got 9% (f32), 14% (bf16) and 18% (int8) faster on t5-base
/// (case a, alternating runs; see `bench/RESULTS.md`).
///
/// A range is handed out once. When a buffer is dropped, its range joins the chunk's free
/// space and the whole 2 MiB pages of that space go back to the system (`MADV_DONTNEED`; not
/// the partial ones, which would split pages that live neighbours share), so a process that
/// loads and drops models does not keep their weights; a chunk is unmapped with its last buffer.
pub(crate) struct HugeBuf<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    owner: Owner<T>,
}

enum Owner<T> {
    /// An ordinary allocation (other systems, empty buffers, [`HugeBuf::from`] a vector).
    Vec(#[allow(dead_code)] Vec<T>),
    /// `bytes` bytes (a multiple of 4 KiB) at offset `at` of a chunk, which lives while any
    /// of its buffers does.
    #[cfg(target_os = "linux")]
    Chunk {
        chunk: std::sync::Arc<map::Chunk>,
        at: usize,
        bytes: usize,
    },
}

// SAFETY: a HugeBuf owns its elements as a Vec does (its range of a chunk is its alone), so it
// may move to or be shared with other threads under the same bounds as a Vec<T>.
unsafe impl<T: Send> Send for HugeBuf<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Sync> Sync for HugeBuf<T> {}

impl<T> From<Vec<T>> for HugeBuf<T> {
    fn from(mut v: Vec<T>) -> Self {
        // The vector's heap buffer does not move when the vector does.
        let (ptr, len) = (
            std::ptr::NonNull::new(v.as_mut_ptr()).expect("non-null"),
            v.len(),
        );
        HugeBuf {
            ptr,
            len,
            owner: Owner::Vec(v),
        }
    }
}

impl<T> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` initialized values that this buffer owns.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: crate::alloc::ZeroBits> HugeBuf<T> {
    /// `n` zeros in huge pages where the system gives them: the next free range of the current
    /// chunk (fresh pages, never used before), a new chunk when it is full, or a mapping of its
    /// own for a buffer over a quarter of a chunk. An out-of-memory error naming `what` where
    /// the memory cannot be had.
    pub(crate) fn zeroed(n: usize, what: &str) -> crate::error::Result<Self> {
        const {
            assert!(std::mem::size_of::<T>() > 0 && std::mem::align_of::<T>() <= 4096);
        }
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| crate::alloc::out_of_memory(usize::MAX, what))?;
        #[cfg(target_os = "linux")]
        if bytes > 0 {
            let (chunk, at, bytes) = map::carve(bytes, what)?;
            // SAFETY: `at` is inside the chunk's mapping, 4 KiB-aligned (so aligned for T, as
            // asserted above), and followed by `bytes` >= n · size_of::<T>() bytes that no
            // other buffer has; a fresh anonymous mapping reads as zeros, valid values of T
            // (`ZeroBits`).
            let ptr = unsafe { chunk.base().add(at) } as *mut T;
            return Ok(HugeBuf {
                ptr: std::ptr::NonNull::new(ptr).expect("a mapping is not at address 0"),
                len: n,
                owner: Owner::Chunk { chunk, at, bytes },
            });
        }
        crate::alloc::try_zeroed(n, what).map(HugeBuf::from)
    }
}

impl<T> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        // Give back the pages the chunk no longer needs (before this buffer's reference to
        // the chunk goes, so the mapping is still there); the last buffer unmaps it all.
        #[cfg(target_os = "linux")]
        if let Owner::Chunk { chunk, at, bytes } = &self.owner {
            chunk.release(*at, *bytes);
        }
    }
}

/// The chunks [`HugeBuf::zeroed`] carves buffers from.
#[cfg(target_os = "linux")]
mod map {
    use std::sync::{Arc, Mutex, Weak};

    const HUGE: usize = 2 << 20;
    const PAGE: usize = 4 << 10;
    /// Bytes per chunk: at most one partly used 2 MiB page is left over at a chunk's end, so
    /// few chunks waste little (t5-base's bf16 weights take four).
    pub(super) const CHUNK: usize = 128 << 20;

    /// An anonymous mapping, 2 MiB-aligned and advised `MADV_HUGEPAGE`, unmapped on drop.
    pub(crate) struct Chunk {
        base: *mut u8,
        len: usize,
        /// The ranges of dropped buffers, merged where they touch, by offset.
        freed: Mutex<Vec<(usize, usize)>>,
    }

    // SAFETY: the mapping is plain memory owned by the chunk; buffers carved from it are
    // disjoint, and the chunk itself only unmaps it when the last of them is gone.
    unsafe impl Send for Chunk {}
    // SAFETY: as above.
    unsafe impl Sync for Chunk {}

    impl Chunk {
        pub(super) fn base(&self) -> *mut u8 {
            self.base
        }

        /// Records `[at, at + bytes)` as no longer used and gives back the whole 2 MiB pages
        /// of the free range it joins (`MADV_DONTNEED`). Only whole huge pages: freeing part
        /// of one would split it, and the live buffers that share it would go on in 4 KiB
        /// pages. The allocator never hands a range out twice, so freed pages stay unused.
        pub(super) fn release(&self, at: usize, bytes: usize) {
            let mut freed = self.freed.lock().unwrap_or_else(|e| e.into_inner());
            let (s, e) = merge_free(&mut freed, at, at + bytes);
            let (lo, hi) = (s.next_multiple_of(HUGE), e / HUGE * HUGE);
            if hi > lo {
                // SAFETY: [lo, hi) lies inside the mapping, within ranges of buffers that are
                // gone (or going: this one, whose last use was before its drop).
                unsafe {
                    libc::madvise(
                        self.base.add(lo) as *mut libc::c_void,
                        hi - lo,
                        libc::MADV_DONTNEED,
                    );
                }
            }
        }

        /// A mapping of `len` bytes (a multiple of 4 KiB) starting on a 2 MiB boundary.
        fn new(len: usize, what: &str) -> crate::error::Result<Chunk> {
            let oom = || crate::alloc::out_of_memory(len, what);
            let span = len.checked_add(HUGE).ok_or_else(oom)?;
            // SAFETY: a new private anonymous mapping; no existing memory is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    span,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(oom());
            }
            let (head, tail) = trim(p as usize);
            let base = p.cast::<u8>().wrapping_add(head);
            // SAFETY: the head [p, p + head) and the tail [base + len, + tail) are parts of
            // the mapping just made, which nothing uses; the advice only changes how
            // [base, base + len) is backed. Their results are ignored: a failed unmap leaves
            // unused address space, a refused advice ordinary pages.
            unsafe {
                if head > 0 {
                    libc::munmap(p, head);
                }
                if tail > 0 {
                    libc::munmap(base.add(len) as *mut libc::c_void, tail);
                }
                libc::madvise(base as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
            Ok(Chunk {
                base,
                len,
                freed: Mutex::new(Vec::new()),
            })
        }
    }

    impl Drop for Chunk {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`; no buffer of it is left.
            unsafe {
                libc::munmap(self.base as *mut libc::c_void, self.len);
            }
        }
    }

    /// For a mapping of `len + 2 MiB` bytes at `start` (4 KiB-aligned): the bytes before its
    /// first 2 MiB boundary and the bytes after the `len` that follow it, to unmap.
    pub(super) fn trim(start: usize) -> (usize, usize) {
        let head = start.next_multiple_of(HUGE) - start;
        (head, HUGE - head)
    }

    /// Adds `[s, e)` to the sorted, disjoint ranges `freed`, merged with those it touches;
    /// returns the merged range.
    pub(super) fn merge_free(
        freed: &mut Vec<(usize, usize)>,
        s: usize,
        e: usize,
    ) -> (usize, usize) {
        let i = freed.partition_point(|r| r.1 < s);
        let (mut s, mut e, mut j) = (s, e, i);
        while j < freed.len() && freed[j].0 <= e {
            s = s.min(freed[j].0);
            e = e.max(freed[j].1);
            j += 1;
        }
        freed.splice(i..j, [(s, e)]);
        (s, e)
    }

    /// The chunk being filled (held weakly: it goes when its buffers do) and its bytes used.
    static CURRENT: Mutex<(Weak<Chunk>, usize)> = Mutex::new((Weak::new(), 0));

    /// A range of `bytes` (rounded up to 4 KiB) never handed out before: its chunk, its
    /// offset and its rounded length.
    pub(super) fn carve(
        bytes: usize,
        what: &str,
    ) -> crate::error::Result<(Arc<Chunk>, usize, usize)> {
        let bytes = bytes
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| crate::alloc::out_of_memory(bytes, what))?;
        if bytes > CHUNK / 4 {
            return Ok((Arc::new(Chunk::new(bytes, what)?), 0, bytes));
        }
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let (weak, used) = &mut *current;
        if let Some(chunk) = weak.upgrade() {
            if *used + bytes <= chunk.len {
                let at = *used;
                *used += bytes;
                return Ok((chunk, at, bytes));
            }
        }
        let chunk = Arc::new(Chunk::new(CHUNK, what)?);
        *weak = Arc::downgrade(&chunk);
        *used = bytes;
        Ok((chunk, 0, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_and_keep_their_values() {
        // Small buffers share a chunk; one over a quarter of a chunk has a mapping of its own.
        let sizes = [1usize, 1000, 4096, 300_000, 9 << 20];
        let mut bufs: Vec<HugeBuf<u32>> = sizes
            .iter()
            .map(|&n| HugeBuf::zeroed(n, "test").unwrap())
            .collect();
        for (b, &n) in bufs.iter().zip(&sizes) {
            assert_eq!(b.len(), n);
            assert!(b.iter().all(|&v| v == 0));
        }
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(i as u32 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                b.iter().all(|&v| v == i as u32 + 1),
                "buffer {i} overwritten"
            );
        }
        // Dropping some (their pages given back) leaves the others intact, and a new buffer
        // is zeros, not a dropped one's values.
        bufs.remove(1);
        bufs.remove(2);
        let fresh: HugeBuf<u32> = HugeBuf::zeroed(1000, "test").unwrap();
        assert!(fresh.iter().all(|&v| v == 0));
        assert!(bufs[0].iter().all(|&v| v == 1));
        assert!(bufs[1].iter().all(|&v| v == 3));
        assert!(bufs[2].iter().all(|&v| v == 5));
    }

    #[test]
    fn empty_and_vector_buffers() {
        let empty: HugeBuf<f32> = HugeBuf::zeroed(0, "test").unwrap();
        assert!(empty.is_empty());
        let v: HugeBuf<i32> = vec![1, 2, 3].into();
        assert_eq!(&v[..], &[1, 2, 3]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn chunks_are_aligned_and_large_buffers_have_their_own() {
        const HUGE: usize = 2 << 20;
        // The ends of the over-sized mapping to unmap, aligned start or not.
        assert_eq!(map::trim(8 * HUGE), (0, HUGE));
        assert_eq!(map::trim(8 * HUGE + 4096), (HUGE - 4096, 4096));
        assert_eq!(map::trim(9 * HUGE - 4096), (4096, HUGE - 4096));
        let (chunk, at, bytes) = map::carve(10, "test").unwrap();
        assert_eq!(chunk.base() as usize % HUGE, 0);
        assert_eq!((at % 4096, bytes), (0, 4096));
        // Over a quarter of a chunk: a mapping of its own, unmapped with its buffer (the
        // arena keeps no reference to it).
        let (big, at, bytes) = map::carve(map::CHUNK / 2 + 1, "test").unwrap();
        assert_eq!(big.base() as usize % HUGE, 0);
        assert_eq!((at, bytes), (0, map::CHUNK / 2 + 4096));
        assert_eq!(std::sync::Arc::strong_count(&big), 1);
        let weak = std::sync::Arc::downgrade(&big);
        drop(big);
        assert!(weak.upgrade().is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn freed_ranges_merge() {
        let mut freed = Vec::new();
        assert_eq!(map::merge_free(&mut freed, 10, 20), (10, 20));
        assert_eq!(map::merge_free(&mut freed, 30, 40), (30, 40));
        assert_eq!(map::merge_free(&mut freed, 50, 60), (50, 60));
        assert_eq!(freed, [(10, 20), (30, 40), (50, 60)]);
        // Touching both neighbours joins all three.
        assert_eq!(map::merge_free(&mut freed, 20, 30), (10, 40));
        assert_eq!(map::merge_free(&mut freed, 0, 5), (0, 5));
        assert_eq!(freed, [(0, 5), (10, 40), (50, 60)]);
        assert_eq!(map::merge_free(&mut freed, 40, 50), (10, 60));
        assert_eq!(freed, [(0, 5), (10, 60)]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_dropped_buffer_gives_back_its_whole_huge_pages_only() {
        const HUGE: usize = 2 << 20;
        // Three neighbours in one chunk (6 MiB each, so the middle one spans whole 2 MiB
        // pages); other tests may carve from the same chunk meanwhile, elsewhere.
        let n = (6 << 20) / 4;
        let same_chunk = |bufs: &[HugeBuf<u32>]| {
            bufs.windows(2).all(|p| match (&p[0].owner, &p[1].owner) {
                (Owner::Chunk { chunk: a, .. }, Owner::Chunk { chunk: b, .. }) => {
                    std::sync::Arc::ptr_eq(a, b)
                }
                _ => false,
            })
        };
        // Where a chunk boundary falls between them, a second try starts in the new chunk,
        // which has room for all three.
        let mut bufs: Vec<HugeBuf<u32>> = Vec::new();
        for _ in 0..2 {
            bufs = (0..3)
                .map(|_| HugeBuf::zeroed(n, "test").unwrap())
                .collect();
            if same_chunk(&bufs) {
                break;
            }
        }
        assert!(
            same_chunk(&bufs),
            "three 6 MiB buffers never shared a chunk"
        );
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(7 + i as u32);
        }
        let middle = bufs.remove(1);
        let (chunk, at, bytes) = match &middle.owner {
            Owner::Chunk { chunk, at, bytes } => (chunk.clone(), *at, *bytes),
            Owner::Vec(_) => unreachable!(),
        };
        drop(middle);
        let (lo, hi) = (at.next_multiple_of(HUGE), (at + bytes) / HUGE * HUGE);
        assert!(hi > lo);
        let read = |off: usize| {
            // SAFETY: inside the chunk's mapping, which `chunk` keeps mapped; u32-aligned.
            unsafe { *(chunk.base().add(off) as *const u32) }
        };
        // The whole huge pages of its range read as zeros now (given back)...
        assert!((lo..hi).step_by(4096).all(|off| read(off) == 0));
        // ... the partial ones keep its values (not given back: the neighbours share them),
        // and the neighbours are untouched.
        if lo > at {
            assert_eq!(read(at), 8);
        }
        assert!(bufs[0].iter().all(|&v| v == 7));
        assert!(bufs[1].iter().all(|&v| v == 9));
    }
}
