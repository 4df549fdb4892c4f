//! The `dealsync` binary: parse the command line, start tracing, run the command, map
//! its error to an exit code (0 ok, 2 usage, 78 config, 1 anything else).

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
        match code {
            78 => eprintln!("dealsync: configuration error:\n{error}"),
            _ => eprintln!("dealsync: {}", dealsync::telemetry::error_chain(&error)),
        }
        std::process::exit(code);
    }
}
