//! The process allocator: mimalloc, asked for an alignment only when a
//! layout needs more than every block has.
//!
//! The `mimalloc` crate's allocator passes every layout to
//! `mi_malloc_aligned`. For a block over 1 KiB whose size class is not a
//! power of two, mimalloc's aligned path then over-allocates and marks the
//! page, even for an alignment of 8: on the bypassed path that was 18 of
//! the 74 allocations per request. Without it, the allocator's instructions
//! per request fell by about 40 % and the request's by 2–4 % on every path
//! (callgrind, benches/HISTORY.md round 8).
//!
//! On 64-bit targets every mimalloc block of 16 bytes or more is 16-byte
//! aligned (size classes come in multiples of two words; mimalloc asserts
//! it in `_mi_page_malloc_zero`), and a smaller one is 8-byte aligned. That
//! is the promise glibc's `malloc` makes, so the test below is the one
//! std's `System` allocator applies before it calls plain `malloc`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment of every mimalloc block of at least this many bytes.
const PLAIN_ALIGN: usize = 16;

/// mimalloc, through its plain entry points wherever they align enough.
pub struct MiMalloc;

/// True when a plain block of `size` bytes is aligned to `align`.
fn plain_fits(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it; the
// aligned entry points are used whenever `plain_fits` cannot promise the
// layout's alignment.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain_fits(layout.size(), layout.align()) {
            mi_malloc(layout.size()).cast()
        } else {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain_fits(layout.size(), layout.align()) {
            mi_zalloc(layout.size()).cast()
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain_fits(new_size, layout.align()) {
            mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around every boundary mimalloc's classes have, small to large.
    fn sizes() -> impl Iterator<Item = usize> {
        (1..=300).chain((9..20).flat_map(|shift| {
            let base = 1usize << shift;
            [base - 1, base, base + 1, base * 3 / 2 + 8]
        }))
    }

    #[test]
    fn every_block_has_its_layouts_alignment_and_keeps_its_bytes() {
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in sizes() {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: the layout has a non-zero size; the block is
                // written within it, then grown and freed with it.
                unsafe {
                    let block = MiMalloc.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    block.write_bytes(0xA5, size);
                    let grown = MiMalloc.realloc(block, layout, size * 2 + 24);
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "realloc of size {size}, align {align}"
                    );
                    assert!(
                        (0..size).all(|i| *grown.add(i) == 0xA5),
                        "bytes lost growing {size}"
                    );
                    MiMalloc.dealloc(
                        grown,
                        Layout::from_size_align(size * 2 + 24, align).unwrap(),
                    );
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_and_aligned() {
        for align in [8, 16, 128] {
            for size in sizes() {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: as above; the block is read within its layout.
                unsafe {
                    let block = MiMalloc.alloc_zeroed(layout);
                    assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    assert!((0..size).all(|i| *block.add(i) == 0), "size {size}");
                    MiMalloc.dealloc(block, layout);
                }
            }
        }
    }

    #[test]
    fn only_layouts_a_plain_block_aligns_take_the_plain_path() {
        assert!(plain_fits(8, 8));
        assert!(plain_fits(1500, 8));
        assert!(plain_fits(16, 16));
        // A 4-byte block may sit 8-aligned only; an alignment above 16 is never promised.
        assert!(!plain_fits(4, 8));
        assert!(!plain_fits(4096, 32));
        assert!(!plain_fits(8, 16));
    }
}
