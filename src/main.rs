//! The `chartbridge` binary: see `chartbridge --help`.

fn main() -> std::process::ExitCode {
    chartbridge::cli::run()
}
