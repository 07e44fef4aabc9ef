//! `custodia-proxy` binary: see [`custodia_proxy::cli`].

fn main() {
    std::process::exit(custodia_proxy::cli::main(std::env::args_os()));
}
