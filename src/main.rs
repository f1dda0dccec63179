//! `udaconnect`: the service binary.

fn main() -> std::process::ExitCode {
    udaconnect::cli::main()
}
