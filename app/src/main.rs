//! The `custodia-app` binary: everything lives in the library's [`custodia_app::run_cli`].

fn main() {
    std::process::exit(custodia_app::run_cli(std::env::args_os()));
}
