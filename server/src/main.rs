use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kernex_server::init_logging();
    let cli = kernex_server::cli::Cli::parse();
    match kernex_server::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
