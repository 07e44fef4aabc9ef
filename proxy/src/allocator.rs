//! The proxy's global allocator: mimalloc, asked for an aligned block only when the alignment
//! is more than every mimalloc block has anyway.
//!
//! Asking `mi_malloc_aligned` for everything (what the `mimalloc` crate does) costs little for
//! blocks up to 1 KiB, but above that mimalloc 3 can vouch for the alignment only of
//! power-of-two sizes up to 4 KiB: any other block, even one asking for an alignment of 1,
//! takes its over-allocating fallback, ~430 instructions instead of ~130. The fast path's
//! 8 KiB upstream read buffer took it on every request, and so do Pingora's buffers.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Every mimalloc block is aligned to a machine word: block sizes are multiples of it.
const WORD: usize = std::mem::size_of::<usize>();

/// The allocator the proxy binaries install (`#[global_allocator]` in each `main.rs`).
pub struct Allocator;

/// Whether a plain block satisfies `align` for a block of `size` bytes.
fn plain(align: usize, size: usize) -> bool {
    align <= WORD && align <= size
}

// SAFETY: every block comes from mimalloc with at least the layout's size and alignment (a
// plain one only when `plain` holds), and is freed or resized only by mimalloc.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for_and_keep_their_bytes_when_resized() {
        let allocator = Allocator;
        for align in [1, 2, 8, 16, 64, 4096] {
            for size in [1, 7, 24, 1000, 1500, 8192, 70_000] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a non-zero size; each block is written within its size, then freed
                // once with its layout.
                unsafe {
                    let p = allocator.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    p.write_bytes(0xab, size);
                    let grown = allocator.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown {size}, align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xab));
                    allocator.dealloc(grown, Layout::from_size_align_unchecked(size * 3, align));
                    let zeroed = allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0);
                    assert!((0..size).all(|i| *zeroed.add(i) == 0));
                    allocator.dealloc(zeroed, layout);
                }
            }
        }
    }
}
