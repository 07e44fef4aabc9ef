//! `custodia-proxy` binary: see [`custodia_proxy::cli`].

#[global_allocator]
static ALLOCATOR: custodia_proxy::Allocator = custodia_proxy::Allocator;

/// Transparent huge pages off before anything is allocated (see `custodia_proxy::memory`).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static DISABLE_THP: extern "C" fn() =
    custodia_proxy::memory::disable_transparent_huge_pages_at_load;

fn main() {
    std::process::exit(custodia_proxy::cli::main(std::env::args_os()));
}
