//! A real SMTP server process for integration tests.
//!
//! `SmtpServer` runs `smtp_sink.py` (aiosmtpd) on 127.0.0.1 and a free port, and reads
//! back every message it accepted. Recipients containing `bounce` get a permanent 550,
//! those containing `tempfail` a transient 451, while [`SmtpServer::refuse`] is set
//! every recipient gets the reply it names, and [`SmtpServer::refuse_recipient`] gives
//! one address a reply of its own. The server can be stopped and started
//! again on the same port to test an SMTP outage, and is killed on drop.
//!
//! The interpreter is `/usr/bin/python3`, the one Debian's `python3-aiosmtpd` package
//! installs into, whatever `python3` comes first on `PATH`; `DEALSYNC_TEST_PYTHON`
//! names another interpreter that has `aiosmtpd`.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::free_port;

const SINK_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/daemon/harness/smtp_sink.py"
);
const DEFAULT_PYTHON: &str = "/usr/bin/python3";
const PYTHON_OVERRIDE_VAR: &str = "DEALSYNC_TEST_PYTHON";
/// Generous: a cold Python start on a loaded CI machine can take seconds.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts to bind, each on a fresh port for `start` and on the same port for `restart`.
const START_ATTEMPTS: u32 = 5;

/// One message the server accepted: the SMTP envelope and the raw message data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReceivedMail {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub data: String,
}

/// A running (or stopped) SMTP sink; see the module documentation.
pub struct SmtpServer {
    port: u16,
    process: Option<SinkProcess>,
    /// Holds `mail/` (one JSON file per message) and `sink.log` (the process's stderr).
    dir: TempDir,
}

struct SinkProcess {
    /// Holds the child's stdin open: the sink exits when it closes.
    child: Child,
    /// Kept open so the sink never writes into a closed pipe.
    _stdout: Lines<BufReader<ChildStdout>>,
}

/// Why one attempt to start the sink failed, and whether another attempt can help.
struct StartFailure {
    retryable: bool,
    reason: String,
}

impl SmtpServer {
    /// Starts an SMTP server on 127.0.0.1 and a free port, and returns once it listens.
    ///
    /// Panics with the sink's stderr when it cannot start, e.g. without `aiosmtpd`.
    pub async fn start() -> SmtpServer {
        let dir = tempfile::Builder::new()
            .prefix("dealsync-smtp-")
            .tempdir()
            .expect("creating a temporary directory for the SMTP sink");
        fs::create_dir(dir.path().join("mail")).expect("creating the SMTP sink's mail directory");

        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            // Another process may take the port between `free_port` and the bind.
            let port = free_port();
            match spawn_sink(dir.path(), port).await {
                Ok(process) => {
                    return SmtpServer {
                        port,
                        process: Some(process),
                        dir,
                    };
                }
                Err(failure) if failure.retryable => last_failure = failure.reason,
                Err(failure) => panic!("{}", failure.reason),
            }
        }
        panic!("the SMTP sink did not start in {START_ATTEMPTS} attempts; last: {last_failure}")
    }

    /// Returns the port the server listens on, the same across `stop` and `restart`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the URL for the daemon's `[email] url`: `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Returns every message accepted so far, in arrival order, across restarts.
    ///
    /// A message is on disk before the server answers 250 to its DATA, so one the
    /// client saw accepted is always here.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        let mail_dir = self.dir.path().join("mail");
        let mut paths: Vec<PathBuf> = fs::read_dir(&mail_dir)
            .expect("reading the SMTP sink's mail directory")
            .map(|entry| entry.expect("reading a mail directory entry").path())
            .filter(|path| {
                // Skips the sink's temporary files, which start with a dot.
                path.extension()
                    .is_some_and(|extension| extension == "json")
                    && !path
                        .file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|path| {
                let text = fs::read_to_string(path).expect("reading a received message");
                serde_json::from_str(&text).unwrap_or_else(|error| {
                    panic!("message file {} is not valid: {error}", path.display())
                })
            })
            .collect()
    }

    /// Makes the server answer every recipient with `reply` (e.g. `"554 5.7.1 rejected
    /// by policy"`) from the next one on, or, with `None`, accept them again.
    pub fn refuse(&self, reply: Option<&str>) {
        let path = self.dir.path().join("refuse");
        match reply {
            Some(reply) => fs::write(&path, format!("{reply}\n")).expect("writing the refusal"),
            None => match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => panic!("removing the refusal: {error}"),
            },
        }
    }

    /// Makes the server answer RCPT TO `address` with `reply` (e.g. `"550 5.7.1 rejected
    /// by policy"`) from the next message on, or, with `None`, accept it again. Other
    /// recipients keep their own replies.
    pub fn refuse_recipient(&self, address: &str, reply: Option<&str>) {
        let path = self.dir.path().join("recipients");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => panic!("reading the recipient refusals: {error}"),
        };
        let mut lines: Vec<String> = text
            .lines()
            .filter(|line| {
                line.split('\t')
                    .next()
                    .is_some_and(|listed| !listed.eq_ignore_ascii_case(address))
            })
            .map(str::to_owned)
            .collect();
        if let Some(reply) = reply {
            lines.push(format!("{address}\t{reply}"));
        }
        // Written whole under a temporary name, then renamed: the sink never reads half.
        let temporary = self.dir.path().join(".recipients.tmp");
        fs::write(&temporary, lines.join("\n") + "\n").expect("writing the recipient refusals");
        fs::rename(&temporary, &path).expect("replacing the recipient refusals");
    }

    /// Kills the server and waits until it is gone, so its port refuses connections.
    /// Does nothing when it is already stopped.
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process
                .child
                .kill()
                .await
                .expect("killing the SMTP sink process");
        }
    }

    /// Starts the server again on the same port with the same received messages,
    /// stopping it first if it still runs.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            match spawn_sink(self.dir.path(), self.port).await {
                Ok(process) => {
                    self.process = Some(process);
                    return;
                }
                Err(failure) if failure.retryable => {
                    last_failure = failure.reason;
                    // The port is fixed here, so give whatever holds it time to let go.
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(failure) => panic!("{}", failure.reason),
            }
        }
        panic!(
            "the SMTP sink did not restart on port {} in {START_ATTEMPTS} attempts; last: {last_failure}",
            self.port
        )
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            // `kill_on_drop` would do it too; the explicit kill runs before the
            // temporary directory is removed. Tokio reaps the process afterwards.
            let _ = process.child.start_kill();
        }
    }
}

fn python() -> String {
    std::env::var(PYTHON_OVERRIDE_VAR).unwrap_or_else(|_| DEFAULT_PYTHON.to_owned())
}

/// Spawns the sink on `port` and waits for its ready line.
async fn spawn_sink(dir: &Path, port: u16) -> Result<SinkProcess, StartFailure> {
    let python = python();
    let log_path = dir.join("sink.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("opening the SMTP sink's log file");
    let log_start = log
        .metadata()
        .expect("reading the SMTP sink's log file metadata")
        .len();

    let mut child = Command::new(&python)
        .arg(SINK_SCRIPT)
        .arg("--port")
        .arg(port.to_string())
        .arg("--maildir")
        .arg(dir.join("mail"))
        .arg("--refuse-file")
        .arg(dir.join("refuse"))
        .arg("--recipients-file")
        .arg(dir.join("recipients"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| StartFailure {
            retryable: false,
            reason: format!(
                "spawning the SMTP sink with {python}: {error}; install python3-aiosmtpd \
                 or set {PYTHON_OVERRIDE_VAR} to a python3 that has aiosmtpd"
            ),
        })?;

    let stdout = child.stdout.take().expect("the sink's stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let expected = format!("READY {port}");
    let outcome = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
    if matches!(&outcome, Ok(Ok(Some(line))) if line.trim_end() == expected) {
        return Ok(SinkProcess {
            child,
            _stdout: lines,
        });
    }

    let _ = child.kill().await;
    let stderr = fs::read(&log_path)
        .map(|bytes| String::from_utf8_lossy(&bytes[log_start as usize..]).into_owned())
        .unwrap_or_default();
    let what = match outcome {
        Err(_) => format!("no ready line within {READY_TIMEOUT:?}"),
        Ok(Err(error)) => format!("reading its stdout: {error}"),
        Ok(Ok(None)) => "it exited before it was ready".to_owned(),
        Ok(Ok(Some(line))) => format!("unexpected first line {line:?}"),
    };
    let missing_module = stderr.contains("No module named");
    Err(StartFailure {
        retryable: !missing_module,
        reason: if missing_module {
            format!(
                "the SMTP sink needs aiosmtpd, which {python} cannot import; install \
                 python3-aiosmtpd or set {PYTHON_OVERRIDE_VAR}; stderr:\n{stderr}"
            )
        } else {
            format!("starting the SMTP sink on port {port}: {what}; stderr:\n{stderr}")
        },
    })
}
