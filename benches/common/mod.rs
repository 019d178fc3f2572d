//! What both benches share.

/// The bench cannot go on without `r`: say why and stop (no panic, no backtrace). For what
/// comes from outside the process — files, the network, a child process.
pub fn or_exit<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("bench: {what}: {e}");
        std::process::exit(1)
    })
}
