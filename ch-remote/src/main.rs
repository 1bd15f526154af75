//! `ch-remote`: drives a running VMM through its REST API on a Unix socket, with upstream
//! cloud-hypervisor v53's verbs, arguments and output, plus the `nv-persist` family.
//!
//! Exit codes as upstream: 0 on success; 1 when the request cannot be built, the socket cannot be
//! opened or the VMM answers with an error (its messages numbered on stderr), or a VM of
//! `nv-persist power-fail --region` was not saved; 2 on usage errors. `nv-persist list` without
//! `--api-socket` and `nv-persist power-fail --region` work on the region itself
//! (`region_commands`).

mod commands;
mod error_report;
mod option_syntax;
mod region_commands;

use std::process::ExitCode;

use clap::Parser;

use crate::commands::{Cli, CommandError};
use api_client::ClientError;

/// Why a run failed; printed as a chain of causes, as upstream prints its errors.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Command(CommandError),
    #[error("http client error")]
    HttpClient(#[source] ClientError),
    #[error(transparent)]
    Region(region_commands::RegionCommandError),
}

fn main() -> ExitCode {
    // clap exits with 2 on usage errors (and with no arguments at all), as upstream does.
    let cli = Cli::parse();
    if let Some(action) = cli.command.region_action(cli.api_socket.is_some()) {
        return match region_commands::run(&action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&Failure::Region(error)),
        };
    }
    let Some(socket) = cli.api_socket.as_deref() else {
        eprintln!(
            "Please either provide the api-socket option or dbus-service-name and \
             dbus-object-path options"
        );
        return ExitCode::FAILURE;
    };
    let call = match cli.command.to_api_call(&mut std::io::stdin().lock()) {
        Ok(call) => call,
        Err(error) => return fail(&Failure::Command(error)),
    };
    let mut stream = match api_client::connect(socket) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("Error opening HTTP socket {socket}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match api_client::call(&mut stream, &call) {
        Ok(body) => {
            // As upstream: the body as the VMM sent it (compact JSON), on one line.
            if let Some(body) = body {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&Failure::HttpClient(error)),
    }
}

fn fail(failure: &Failure) -> ExitCode {
    eprint!("{}", error_report::render(failure));
    ExitCode::FAILURE
}
