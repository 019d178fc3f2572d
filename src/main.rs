//! The `chartbridge` binary: see `chartbridge --help`.

/// The gateway allocates many small JSON nodes per request on several threads; mimalloc keeps
/// that cheaper than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_huge_pages();
    chartbridge::cli::run()
}

/// mimalloc asks for transparent huge pages for its memory and gives freed memory back to the
/// system, so the large buffers of each store round (Bundles, their compression) kept faulting
/// in fresh 2 MiB pages, each zeroed whole. Off for this process only.
#[cfg(target_os = "linux")]
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours; a
    // kernel without it answers EINVAL, which leaves things as they were.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn no_huge_pages() {}
