//! `TestDaemon`: the real `dealsync` binary on a fresh SQLite file and a free port.
//!
//! The harness writes `[storage]` and `[server]` (temp dir, 127.0.0.1 only) ahead of
//! the test's own config text, starts the binary, and waits for `/readyz`. Logs are
//! captured and printed when a test fails; `TEST_LOG=1` streams them.

use super::{eventually, free_port};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A config comment that keeps the harness from opening `/metrics`.
pub const KEEP_METRICS_AUTH_DEFAULT: &str = "# metrics_auth: the default\n";

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config_path: PathBuf,
    pub db_path: PathBuf,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    env: Vec<(String, String)>,
    /// The file-mode creation mask the binary runs under (`None`: the test's own).
    umask: Option<u32>,
    body: String,
    /// The `[storage]` lines instead of the SQLite file (`url = …`: a replica on
    /// PostgreSQL).
    storage: Option<String>,
    pub http: reqwest::Client,
}

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_dealsync")
}

impl TestDaemon {
    /// Writes a config (harness header + `body`) and starts the daemon; waits until ready.
    pub async fn start(body: &str) -> TestDaemon {
        Self::start_with_env(body, &[]).await
    }

    pub async fn start_with_env(body: &str, env: &[(&str, &str)]) -> TestDaemon {
        Self::start_with(body, env, None).await
    }

    /// Starts the daemon under the file-mode creation mask `umask` (e.g. 0o022).
    pub async fn start_with_umask(body: &str, umask: u32) -> TestDaemon {
        Self::start_with(body, &[], Some(umask)).await
    }

    /// Starts a replica whose store is the PostgreSQL database `storage` names (the
    /// `[storage]` lines, e.g. `url = "postgres://…"`), with `env` set; waits until ready.
    pub async fn start_on(storage: &str, body: &str, env: &[(&str, &str)]) -> TestDaemon {
        Self::start_configured(body, env, None, Some(storage.to_owned())).await
    }

    async fn start_with(body: &str, env: &[(&str, &str)], umask: Option<u32>) -> TestDaemon {
        Self::start_configured(body, env, umask, None).await
    }

    async fn start_configured(
        body: &str,
        env: &[(&str, &str)],
        umask: Option<u32>,
        storage: Option<String>,
    ) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut daemon = TestDaemon {
            config_path: dir.path().join("dealsync.toml"),
            db_path: dir.path().join("dealsync.db"),
            dir,
            port: 0,
            child: None,
            logs: Arc::new(Mutex::new(String::new())),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            umask,
            body: body.to_owned(),
            storage,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        };
        daemon.launch().await;
        daemon
    }

    /// The config text the harness adds in front of the test's own.
    ///
    /// `/metrics` is open (`metrics_auth = "none"`) so that tests can read counters
    /// without a token, unless the test's own text mentions `metrics_auth` (set it, or
    /// include [`KEEP_METRICS_AUTH_DEFAULT`] to test the default).
    pub fn header(&self, body: &str) -> String {
        let metrics_auth = if body.contains("metrics_auth") {
            ""
        } else {
            "metrics_auth = \"none\"\n"
        };
        let storage = match &self.storage {
            Some(lines) => lines.clone(),
            None => format!("path = \"{}\"", self.db_path.display()),
        };
        format!(
            "[storage]\n{storage}\n\n[server]\nlisten = \"127.0.0.1:{}\"\npublic_url = \"http://127.0.0.1:{}\"\nshutdown_timeout = \"5s\"\n{metrics_auth}\n",
            self.port, self.port
        )
    }

    /// Rewrites the config file with a new body (same storage and port).
    pub fn write_config(&self, body: &str) {
        std::fs::write(&self.config_path, format!("{}{body}", self.header(body))).expect("config");
    }

    async fn launch(&mut self) {
        for attempt in 0..5 {
            self.port = free_port();
            let body = self.body.clone();
            self.write_config(&body);
            self.spawn();
            let ready = self.wait_ready(Duration::from_secs(20)).await;
            if ready {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() && self.logs().contains("Address already in use") && attempt < 4 {
                continue;
            }
            panic!("dealsync did not become ready; logs:\n{}", self.logs());
        }
    }

    fn spawn(&mut self) {
        // With a umask, a shell sets it and then becomes the binary (same pid).
        let mut command = match self.umask {
            Some(umask) => {
                let mut shell = Command::new("/bin/sh");
                shell
                    .arg("-c")
                    .arg(format!("umask {umask:03o} && exec \"$0\" \"$@\""))
                    .arg(binary());
                shell
            }
            None => Command::new(binary()),
        };
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("--log-level")
            .arg("debug")
            .arg("run")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawning dealsync");
        let stream = std::env::var_os("TEST_LOG").is_some();
        for pipe in [
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = self.logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if stream {
                        eprintln!("[dealsync] {line}");
                    }
                    if let Ok(mut logs) = logs.lock() {
                        logs.push_str(&line);
                        logs.push('\n');
                    }
                }
            });
        }
        self.child = Some(child);
    }

    async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false;
            }
            if let Ok(response) = self.http.get(self.url("/readyz")).send().await
                && response.status().is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// GET, returning status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    /// Sends a signal by name (`TERM`, `HUP`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "dealsync did not exit within {timeout:?}; logs:\n{}",
                self.logs()
            ),
        }
    }

    /// SIGKILL, then the same config and database again.
    pub async fn kill_and_restart(&mut self) {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(10)).await;
        self.spawn();
        assert!(
            self.wait_ready(Duration::from_secs(20)).await,
            "dealsync did not become ready after restart; logs:\n{}",
            self.logs()
        );
    }

    /// Starts the daemon again (after it exited) with a new body and the current paths.
    pub async fn kill_and_restart_with_config(&mut self, body: &str) {
        if let Some(child) = self.child.as_mut()
            && child.try_wait().ok().flatten().is_none()
        {
            self.signal("KILL");
            self.wait_exit(Duration::from_secs(10)).await;
        }
        self.body = body.to_owned();
        self.write_config(body);
        self.spawn();
        assert!(
            self.wait_ready(Duration::from_secs(20)).await,
            "dealsync did not become ready after restart; logs:\n{}",
            self.logs()
        );
    }

    /// Starts the daemon again (same config and database) after it was stopped or killed.
    pub async fn start_again(&mut self) {
        self.spawn();
        assert!(
            self.wait_ready(Duration::from_secs(20)).await,
            "dealsync did not become ready after a restart; logs:\n{}",
            self.logs()
        );
    }

    /// Waits until the logs contain `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        eventually(
            &format!("log line containing {needle:?}"),
            timeout,
            || async { self.logs().contains(needle).then_some(()) },
        )
        .await
    }

    /// Opens the daemon's SQLite file for assertions (read-only use).
    pub fn db(&self) -> rusqlite::Connection {
        let db = rusqlite::Connection::open(&self.db_path).expect("open db");
        db.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        db
    }

    /// Opens the daemon's SQLite file read-only, for probes while the daemon writes it.
    pub fn db_read_only(&self) -> rusqlite::Connection {
        open_read_only(&self.db_path)
    }

    /// Opens the webhook inbox file (beside the database) read-only.
    pub fn inbox_read_only(&self) -> rusqlite::Connection {
        open_read_only(&dealsync::store::inbox_path(&self.db_path))
    }

    /// Counts rows for `sql` (a `SELECT count(*) …`) on a read-only connection.
    pub fn count_read_only(&self, sql: &str) -> i64 {
        self.db_read_only()
            .query_row(sql, [], |row| row.get(0))
            .expect(sql)
    }

    /// Counts rows for `sql` (a `SELECT count(*) …`).
    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |row| row.get(0)).expect(sql)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("TEST_LOG").is_none() {
            eprintln!("---- dealsync logs ----\n{}\n---- end ----", self.logs());
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn open_read_only(path: &std::path::Path) -> rusqlite::Connection {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|error| panic!("opening {} read-only: {error}", path.display()));
    db.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    db
}

/// Starts `dealsync --config CONFIG auth CONNECTION` (its own callback port, 20 s to
/// complete) and reads its output up to the authorize URL it prints, the one under
/// `auth_url`. Returns the running command, the rest of its output (kept open so that
/// it can go on writing) and that URL.
pub async fn start_auth(
    config: &std::path::Path,
    connection: &str,
    auth_url: &str,
) -> (
    Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    url::Url,
) {
    let mut child = Command::new(binary())
        .args(["--config", config.to_str().unwrap(), "auth", connection])
        .args(["--port", "0", "--timeout", "20s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting dealsync auth");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let authorize = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the URL is printed");
        if let Some(rest) = line.trim().strip_prefix(auth_url) {
            break url::Url::parse(&format!("http://x/{rest}")).unwrap();
        }
    };
    (child, lines, authorize)
}

/// Runs the binary with arguments (not as a daemon) and returns (code, stdout, stderr).
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(binary());
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().await.expect("running dealsync");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `run_cli` with the variables in `unset` removed from what the binary inherits (e.g.
/// `CREDENTIALS_DIRECTORY`, so a test sees a shell outside the service).
pub async fn run_cli_without(
    args: &[&str],
    env: &[(&str, &str)],
    unset: &[&str],
) -> (i32, String, String) {
    let mut command = Command::new(binary());
    command.args(args);
    for name in unset {
        command.env_remove(name);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().await.expect("running dealsync");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
