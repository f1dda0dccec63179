//! `udaconnect`: the service binary.

// mimalloc rather than the system allocator: the engine allocates and frees per batch, and
// glibc's malloc returned the large per-batch buffers to the kernel only to fault them in again
// (16 % of `engine-bench`'s time was the kernel clearing those pages; docs/benchmarks.md).
// mimalloc's own purge delay is tuned the same way (src/allocator.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    udaconnect::allocator::tune();
    udaconnect::cli::main()
}
