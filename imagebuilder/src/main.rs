use clap::Parser as _;

fn main() -> std::process::ExitCode {
    match imagebuilder::cli::run(imagebuilder::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
