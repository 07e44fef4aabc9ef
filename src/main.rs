//! `custodia`: runs the whole stack locally (`custodia [run] [--config FILE]`), and embeds the
//! other binaries so the stack needs only this one executable:
//! `custodia proxy …` is `custodia-proxy …`, `custodia app …` is `custodia-app …`.

use std::ffi::OsString;
use std::path::PathBuf;

// Output to a reader that has gone (`custodia --help | head -1`) is no panic.
use custodia_proxy::cli::say;

const USAGE: &str = "\
usage: custodia [run] [--config FILE]     start the local stack (default config/custodia.toml)
       custodia proxy ARGS…              the same as custodia-proxy ARGS…
       custodia app ARGS…                the same as custodia-app ARGS…
       custodia --version                the version";

/// `custodia proxy` is the same program as `custodia-proxy`, allocator included.
#[global_allocator]
static ALLOCATOR: custodia_proxy::Allocator = custodia_proxy::Allocator;

/// Transparent huge pages off before anything is allocated (see `custodia_proxy::memory`).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static DISABLE_THP: extern "C" fn() =
    custodia_proxy::memory::disable_transparent_huge_pages_at_load;

fn main() {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let sub = args.get(1).map(|a| a.to_string_lossy().into_owned());
    let code = match sub.as_deref() {
        Some("proxy") => {
            args.remove(1);
            custodia_proxy::cli::main(args)
        }
        Some("app") => {
            args.remove(1);
            custodia_app::run_cli(args)
        }
        Some("--help") | Some("-h") | Some("help") => {
            say(&format!("{USAGE}\n"));
            0
        }
        Some("--version") | Some("-V") => {
            say(&format!("custodia {}\n", env!("CARGO_PKG_VERSION")));
            0
        }
        Some("run") => run_stack(&args[2..]),
        _ => run_stack(&args[1..]),
    };
    std::process::exit(code);
}

fn run_stack(args: &[OsString]) -> i32 {
    let mut config = PathBuf::from("config/custodia.toml");
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("--config") => match rest.next() {
                Some(path) => config = PathBuf::from(path),
                None => return usage_error("--config needs a file path"),
            },
            Some(flag) if flag.starts_with("--config=") => {
                config = PathBuf::from(&flag["--config=".len()..]);
            }
            Some("--help" | "-h") => {
                say(&format!("{USAGE}\n"));
                return 0;
            }
            Some(other) => return usage_error(&format!("unknown argument `{other}`")),
            None => return usage_error("arguments must be UTF-8"),
        }
    }
    let plan = match custodia::stack::plan(&config) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("custodia: {e}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("custodia: cannot start the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(custodia::stack::run(plan)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("custodia: {e}");
            1
        }
    }
}

fn usage_error(message: &str) -> i32 {
    eprintln!("custodia: {message}\n\n{USAGE}");
    2
}
