//! The `dealsync` binary: parse the command line, start tracing, run the command, map
//! its error to an exit code (0 ok, 2 usage, 78 config, 75 another daemon runs on the
//! same database, 1 anything else).

use clap::Parser;
use dealsync::cli::{self, Cli};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // clap prints help and --version to stdout with code 0, usage errors with code 2.
        Err(error) => error.exit(),
    };
    dealsync::telemetry::init_tracing(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "could not start the async runtime");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(cli::dispatch(cli));
    // Do not wait for blocking tasks still running: everything durable has been
    // committed or rolled back by now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(error) = result {
        let code = error.exit_code();
        let message = match code {
            78 => format!("dealsync: configuration error:\n{error}"),
            _ => format!("dealsync: {}", dealsync::telemetry::error_chain(&error)),
        };
        // Any error (a store path, an address) may quote a value from the config.
        eprintln!(
            "{}",
            dealsync::config::interpolate::scrub_process_output(&message)
        );
        std::process::exit(code);
    }
}
