//! Buffers allocated fallibly: where memory runs out, an error that names the size instead of
//! the process aborting (the global allocator's default), at load (packing and quantizing
//! weights) and for the backend's tensors.

use crate::error::{Result, T5Error};

/// Element types whose all-zero bit pattern is the value 0.
///
/// # Safety
/// Implemented only for types where every zero byte pattern is a valid value.
pub(crate) unsafe trait ZeroBits: Copy {}
// SAFETY: zero bits are 0 (or 0.0) for each of these.
unsafe impl ZeroBits for u8 {}
unsafe impl ZeroBits for i8 {}
unsafe impl ZeroBits for u16 {}
unsafe impl ZeroBits for u32 {}
unsafe impl ZeroBits for i32 {}
unsafe impl ZeroBits for f32 {}

/// The error of an allocation of `bytes` that failed.
pub(crate) fn out_of_memory(bytes: usize, what: &str) -> T5Error {
    T5Error::Backend(format!(
        "out of memory: cannot allocate {} for {what}",
        crate::generate::memory::human_bytes(bytes as u64)
    ))
}

/// `len` zeros. The memory comes zeroed from the allocator (`calloc`), so a large buffer's
/// pages are fresh zero pages from the system, faulted in by whichever thread first writes
/// them, instead of being written twice (a fill, then the code that produces the values).
pub(crate) fn try_zeroed<T: ZeroBits>(len: usize, what: &str) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if len == 0 || size == 0 {
        return Ok(Vec::new());
    }
    let oom = || out_of_memory(len.saturating_mul(size), what);
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| oom())?;
    // SAFETY: `layout` has a non-zero size; a non-null result is `len` zeroed values of `T`
    // (valid by `ZeroBits`) allocated by the global allocator with the layout `Vec<T>` uses
    // for that capacity, so the Vec owns and frees it.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            return Err(oom());
        }
        Ok(Vec::from_raw_parts(p, len, len))
    }
}

/// `len` copies of `value`.
pub(crate) fn try_filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| out_of_memory(len.saturating_mul(std::mem::size_of::<T>()), what))?;
    v.resize(len, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_past_memory_are_errors_that_name_the_size() {
        let e = try_zeroed::<f32>(usize::MAX / 8, "a test").unwrap_err();
        assert!(e.to_string().contains("out of memory"), "{e}");
        assert!(e.to_string().contains("a test"), "{e}");
        let e = try_filled(usize::MAX / 8, 1.0f32, "a test").unwrap_err();
        assert!(e.to_string().contains("out of memory"), "{e}");
        // Half the address space is a valid layout but no allocator can give it.
        let e = try_zeroed::<u8>(isize::MAX as usize, "a test").unwrap_err();
        assert!(e.to_string().contains("out of memory"), "{e}");
    }

    #[test]
    fn buffers_hold_what_they_say() {
        assert_eq!(try_zeroed::<i8>(5, "t").unwrap(), vec![0i8; 5]);
        assert_eq!(try_zeroed::<f32>(0, "t").unwrap(), Vec::<f32>::new());
        assert_eq!(try_filled(3, 1.5f32, "t").unwrap(), vec![1.5f32; 3]);
    }
}
