use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = kernex_agent::cli::Cli::parse();
    match kernex_agent::cli::dispatch(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            kernex_agent::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
