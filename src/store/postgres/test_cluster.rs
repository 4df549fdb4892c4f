//! A throwaway PostgreSQL cluster for tests: one per test process, a fresh database per
//! test. Shared by the store's unit tests (`store::postgres`, `#[cfg(test)]`) and the
//! daemon's integration tests (`tests/daemon/harness` includes this file by path), so it
//! names nothing of either crate; each side wraps [`cluster`] with its own `skip`.
//!
//! The cluster is made with the PostgreSQL 15 binaries (`/usr/lib/postgresql/15/bin`, or
//! `DEALSYNC_TEST_PG_BIN`): `initdb` into a new temporary directory, then `pg_ctl start`
//! on 127.0.0.1 at a free port, its Unix socket in the same directory. `initdb` refuses
//! to run as root, so under root both run as the `postgres` user (else `nobody`), which
//! owns the directory. `fsync` and `synchronous_commit` keep their defaults.
//!
//! Authentication: trust for the superuser `postgres` (over the socket and loopback), and
//! a password (SCRAM) for the role [`PASSWORD_ROLE`], which owns every test database, so
//! the tests connect the way a deployment does, with a password.
//!
//! Nothing is left behind: a reaper process (`sh`) holds the read end of a pipe whose
//! write end only this process holds. When the process ends, however it ends (a
//! normal exit, a panic, SIGKILL), the pipe closes, and the reaper stops the cluster
//! (`pg_ctl stop -m immediate`) and removes the directory. The reaper and the server run
//! in process groups of their own, so a Ctrl-C at the terminal reaches neither before
//! the test process is gone.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The role with a password that owns every test database.
pub const PASSWORD_ROLE: &str = "dealsync_tester";
/// Its password.
pub const PASSWORD: &str = "pw-Kx81-secret";

/// A running throwaway cluster.
pub struct Cluster {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// The reaper, holding the write end of its pipe (`stdin`): never waited for, it
    /// outlives this process; the pipe closing at exit stops the cluster.
    _reaper: Mutex<Child>,
}

/// A fresh, empty database in the cluster, owned by [`PASSWORD_ROLE`].
#[derive(Debug, Clone)]
pub struct TestDatabase {
    pub name: String,
    pub port: u16,
}

impl TestDatabase {
    /// `postgres://dealsync_tester:<password>@127.0.0.1:<port>/<name>`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{PASSWORD_ROLE}:{PASSWORD}@127.0.0.1:{}/{}",
            self.port, self.name
        )
    }

    /// libpq-style parameters of a superuser connection to this database (trust auth).
    pub fn admin_params(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.port, self.name
        )
    }

    /// A superuser connection to this database, to arrange and inspect what a test needs.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.admin_params(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|error| {
                    panic!("connecting to test database {}: {error}", self.name)
                });
        tokio::spawn(connection);
        client
    }
}

/// Where the PostgreSQL binaries are.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("DEALSYNC_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// The process's cluster, started on first use. `Err` says why there is none when the
/// binaries are missing (the caller skips the test by its rule); a cluster that fails
/// to start is a panic with the server's log.
pub fn cluster() -> Result<&'static Cluster, String> {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let bin = bin_dir();
            for tool in ["initdb", "pg_ctl", "postgres", "psql"] {
                if !bin.join(tool).is_file() {
                    return Err(format!(
                        "PostgreSQL is not installed: no {} (scripts/test installs the Debian package postgresql; DEALSYNC_TEST_PG_BIN names another directory)",
                        bin.join(tool).display()
                    ));
                }
            }
            Ok(Cluster::start(bin))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The user the server runs as: `None` for the current one; under root `postgres`, or
/// `nobody` where there is no such user.
fn server_user() -> Option<&'static str> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if !root {
        return None;
    }
    let has_postgres = Command::new("id")
        .args(["-u", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    Some(if has_postgres { "postgres" } else { "nobody" })
}

/// `program args…`, run as `user` when one is given (`runuser -u user --`).
fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn run(what: &str, command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn uid_gid(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .unwrap_or_else(|error| panic!("id {flag} {user}: {error}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("id {flag} {user} printed no number"))
    };
    (id("-u"), id("-g"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0 always works")
        .port()
}

/// `data/server.crt` and `data/server.key` (owned by the server's user, 0600), a
/// certificate for 127.0.0.1 and localhost signed by a fresh CA, whose certificate goes
/// to [`Cluster::ca_certificate`].
fn write_certificates(data: &Path, dir: &Path, user: Option<&str>) {
    use std::os::unix::fs::PermissionsExt;
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "dealsync test CA");
    let ca = ca.self_signed(&ca_key).expect("the CA certificate");
    let key = rcgen::KeyPair::generate().expect("a server key");
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server parameters")
            .signed_by(&key, &ca, &ca_key)
            .expect("the server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("writing ca.pem");
    for (name, text) in [
        ("server.crt", server.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = data.join(name);
        std::fs::write(&path, text).unwrap_or_else(|error| panic!("writing {name}: {error}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|error| panic!("chmod {name}: {error}"));
        if let Some(user) = user {
            let (uid, gid) = uid_gid(user);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .unwrap_or_else(|error| panic!("chown {name} to {user}: {error}"));
        }
    }
}

impl Cluster {
    /// The PEM file of the CA that signed the server's certificate (for
    /// `sslrootcert`).
    #[allow(dead_code)]
    pub fn ca_certificate(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn start(bin: PathBuf) -> Cluster {
        let user = server_user();
        let dir = tempfile::Builder::new()
            .prefix("dealsync-pg-")
            .tempdir()
            .expect("creating a temporary directory")
            .keep();
        if let Some(user) = user {
            let (uid, gid) = uid_gid(user);
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|error| panic!("chown {} to {user}: {error}", dir.display()));
        }
        let data = dir.join("data");
        // The reaper first, so that even a failed start leaves nothing behind.
        let reaper = Self::reaper(user, &bin, &dir);
        run(
            "initdb",
            as_user(user, &bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .args(["--locale=C"]),
        );
        let append = |file: &str, text: &str| {
            let path = data.join(file);
            let mut handle = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap_or_else(|error| panic!("opening {}: {error}", path.display()));
            handle
                .write_all(text.as_bytes())
                .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
        };
        // TLS on, with a certificate for 127.0.0.1 from a CA of the test's own: plain
        // clients are served as before, `sslmode=verify-full` clients check it.
        write_certificates(&data, &dir, user);
        append(
            "postgresql.conf",
            &format!(
                "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\nssl = on\n",
                dir.display()
            ),
        );
        // The first matching line wins: the password role must authenticate over TCP.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n"
            ),
        )
        .expect("writing pg_hba.conf");
        // A port free a moment ago may be taken by the time the server binds it.
        let mut attempt = 0;
        let port = loop {
            attempt += 1;
            let port = free_port();
            let status = as_user(user, &bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {port}"))
                .arg("start")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .status()
                .expect("running pg_ctl start");
            if status.success() {
                break port;
            }
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            assert!(attempt < 5, "pg_ctl start failed ({status}):\n{log}");
        };
        let cluster = Cluster {
            port,
            dir,
            bin,
            _reaper: Mutex::new(reaper),
        };
        cluster.psql(
            "postgres",
            &format!("CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'"),
        );
        cluster
    }

    /// Starts the process that stops the cluster and removes `dir` once this process
    /// is gone, reading its stdin, a pipe, until it closes.
    fn reaper(user: Option<&str>, bin: &Path, dir: &Path) -> Child {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"cat >/dev/null; "$@" >/dev/null 2>&1; rm -rf "$DEALSYNC_PG_DIR""#)
            .arg("dealsync-pg-reaper");
        if let Some(user) = user {
            command.args(["runuser", "-u", user, "--"]);
        }
        command
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .env("DEALSYNC_PG_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting the cluster's reaper")
    }

    /// Runs `sql` as the superuser in `database`, over the Unix socket.
    pub fn psql(&self, database: &str, sql: &str) {
        run(
            &format!("psql {sql:?}"),
            Command::new(self.bin.join("psql"))
                .arg("-h")
                .arg(&self.dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    database,
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]),
        );
    }

    /// Creates a fresh database with a name no other test of any process uses.
    pub fn create_database(&self) -> TestDatabase {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {name} OWNER {PASSWORD_ROLE}"),
        );
        TestDatabase {
            name,
            port: self.port,
        }
    }
}

/// A TCP relay on 127.0.0.1 in front of the cluster: a client pointed at its port
/// reaches the server until [`Relay::cut`], which closes the port and every relayed
/// connection, as a network partition or a server restart does to that client only;
/// [`Relay::restore`] listens on the same port again. (Used by the store's tests; the
/// daemon tests include this file too.)
#[allow(dead_code)]
pub struct Relay {
    port: u16,
    target: u16,
    running: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[allow(dead_code)]
impl Relay {
    /// Starts relaying to the cluster's port `target`.
    pub async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay {
            port,
            target,
            running: Mutex::new(None),
        };
        relay.serve(listener);
        relay
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        *self.running.lock().unwrap() = Some(task);
    }

    /// Closes the port and every connection through it.
    pub async fn cut(&self) {
        let task = self.running.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.serve(listener);
    }
}
