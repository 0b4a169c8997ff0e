//! `lab`: start, supervise, inspect and stop the native stack. Parses the command line and
//! hands over to [`cli`]; everything else lives in the `lab` library.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
