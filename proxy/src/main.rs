//! `custodia-proxy` binary: see [`custodia_proxy::cli`].

#[global_allocator]
static ALLOCATOR: custodia_proxy::Allocator = custodia_proxy::Allocator;

fn main() {
    std::process::exit(custodia_proxy::cli::main(std::env::args_os()));
}
