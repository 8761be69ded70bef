use clap::Parser as _;

// The heartbeat path allocates per request (HTTP, JSON); mimalloc is measurably faster than glibc's
// allocator under that churn on two cores (`just bench-heartbeat`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _traces = kernex_server::init_logging();
    let cli = kernex_server::cli::Cli::parse();
    match kernex_server::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
