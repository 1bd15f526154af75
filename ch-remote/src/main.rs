//! `ch-remote`: drives a running VMM through its REST API on a Unix socket, with upstream
//! cloud-hypervisor's verbs plus the `nv-persist` family. Prints the JSON the API returns; errors
//! go to stderr with the server's message and exit code 1.

mod api_client;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::api_client::ApiClient;
use crate::commands::Cli;

fn main() -> ExitCode {
    // clap exits with 2 on usage errors, as upstream's ch-remote does.
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let call = cli.command.to_api_call()?;
    let client = ApiClient::new(&cli.api_socket);
    let answer = client.call(&call)?;
    if let Some(body) = answer {
        // Pretty, like upstream's ch-remote; a body that is not JSON is shown as it came.
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
            Err(_) => println!("{}", String::from_utf8_lossy(&body)),
        }
    }
    Ok(())
}
