//! The `chartbridge` binary: see `chartbridge --help`.

/// The gateway allocates many small JSON nodes per request on several threads; mimalloc keeps
/// that cheaper than glibc's malloc (measured with `cargo bench --bench load`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chartbridge::cli::run()
}
