//! `[storage]`: where the store lives. `path` is a SQLite file (the default); `url`
//! (`postgres://user:password@host:5432/database`) a PostgreSQL database.
//!
//! Invariant: the password of a [`PostgresUrl`] is a [`Secret`]; nothing this module
//! prints (Debug, Display, validation messages) contains it, nor the URL as written.

use super::Secret;
use std::fmt;

/// The port PostgreSQL listens on unless the URL names another.
pub const DEFAULT_POSTGRES_PORT: u16 = 5432;

/// A PostgreSQL database as `storage.url` names it. Display prints `host:port/database`,
/// what every message about the database says; Debug prints the password as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<Secret>,
    /// `?sslmode=`: whether the connection is encrypted and the server verified.
    pub tls: TlsMode,
    /// `?sslrootcert=FILE`: the CA certificates (PEM) the server's certificate must
    /// chain to; without it, the public web roots (as a managed database's are).
    pub root_cert: Option<std::path::PathBuf>,
}

/// `sslmode`, the libpq parameter, as far as dealsync follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Plain TCP (`disable`, and the default when the URL says nothing).
    #[default]
    Disable,
    /// TLS required, the certificate not checked (`require`): encrypted, but anyone
    /// on the path can pose as the server. As libpq does.
    Require,
    /// TLS required, the certificate chained to a trusted root and naming the host
    /// (`verify-full`): what a managed database should be reached with.
    VerifyFull,
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host_port(), self.database)
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.password.is_some() { ":***" } else { "" };
        write!(f, "PostgresUrl(postgres://{}{password}@{self})", self.user)
    }
}

/// `sslmode` and `sslrootcert` from the URL's query; any other parameter, or a mode
/// dealsync does not follow, is refused rather than ignored, so nobody believes a
/// connection is encrypted or verified when it is not.
fn tls_parameters(url: &url::Url) -> Result<(TlsMode, Option<std::path::PathBuf>), String> {
    let (mut tls, mut root_cert) = (TlsMode::Disable, None);
    for (key, value) in url.query_pairs() {
        match (key.as_ref(), value.as_ref()) {
            ("sslmode", "disable") => tls = TlsMode::Disable,
            ("sslmode", "require") => tls = TlsMode::Require,
            ("sslmode", "verify-full") => tls = TlsMode::VerifyFull,
            ("sslmode", mode @ ("allow" | "prefer" | "verify-ca")) => {
                return Err(format!(
                    "sslmode={mode} is not followed by dealsync: use sslmode=verify-full (encrypted, the server's certificate checked), require (encrypted only) or disable"
                ));
            }
            ("sslmode", _) => {
                return Err("sslmode must be disable, require or verify-full".to_owned());
            }
            ("sslrootcert", path) if !path.is_empty() => {
                root_cert = Some(std::path::PathBuf::from(path));
            }
            (other, _) => {
                return Err(format!(
                    "the parameter `{other}` after `?` is not supported: only sslmode and sslrootcert are; remove it"
                ));
            }
        }
    }
    if root_cert.is_some() && tls != TlsMode::VerifyFull {
        return Err("sslrootcert needs sslmode=verify-full (it names the roots the server's certificate is checked against)".to_owned());
    }
    Ok((tls, root_cert))
}

impl PostgresUrl {
    /// `host:port`, an IPv6 address in brackets: what a connection error names.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Parses `postgres://user[:password]@host[:port]/database`. The user and password
    /// are percent-decoded, as libpq does: a password holding `@`, `/`, `?`, `#` or
    /// `%` is written percent-encoded (`%40` for `@`). The error never quotes the text.
    pub fn parse(text: &Secret) -> Result<PostgresUrl, String> {
        let expected = "expected a URL like \"postgres://dealsync:${credential:pg-password}@db.internal:5432/dealsync\"";
        let url = url::Url::parse(text.expose()).map_err(|error| format!("{expected}: {error}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!(
                "{expected}: the scheme must be postgres:// (got {:?}); a SQLite file goes in storage.path",
                url.scheme()
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
            Some(url::Host::Ipv4(address)) => address.to_string(),
            Some(url::Host::Ipv6(address)) => address.to_string(),
            _ => return Err(format!("{expected}: the host is missing")),
        };
        let decode = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
        };
        let user = decode(url.username())
            .map_err(|_| "the user name is not UTF-8 once percent-decoded".to_owned())?;
        if user.is_empty() {
            return Err(format!("{expected}: the user is missing"));
        }
        let password = match url.password() {
            None => None,
            Some(encoded) => {
                Some(Secret::new(decode(encoded).map_err(|_| {
                    "the password is not UTF-8 once percent-decoded".to_owned()
                })?))
            }
        };
        let database = decode(url.path().trim_start_matches('/'))
            .map_err(|_| "the database name is not UTF-8 once percent-decoded".to_owned())?;
        if database.is_empty() || database.contains('/') {
            return Err(format!(
                "{expected}: name one database after the host, e.g. /dealsync"
            ));
        }
        if url.fragment().is_some() {
            return Err(format!("{expected}: remove the part after `#`"));
        }
        let (tls, root_cert) = tls_parameters(&url)?;
        Ok(PostgresUrl {
            host,
            port: url.port().unwrap_or(DEFAULT_POSTGRES_PORT),
            database,
            user,
            password,
            tls,
            root_cert,
        })
    }

    /// Parses a URL given on the command line (`flag`, e.g. `--to`) exactly as
    /// `storage.url` is read from the config: `${VAR}` and `${credential:NAME}` are
    /// substituted first (credentials from `credentials_dir`, else
    /// `$CREDENTIALS_DIRECTORY`; every one must be readable), then the URL is parsed.
    /// From then on the substituted values and the password are scrubbed from the
    /// process's log lines and final error message, as a config's are.
    pub fn from_argument(
        flag: &str,
        text: &str,
        credentials_dir: Option<std::path::PathBuf>,
    ) -> Result<PostgresUrl, String> {
        use super::interpolate;
        let mut value = toml::Value::Table(toml::map::Map::from_iter([(
            flag.to_owned(),
            toml::Value::String(text.to_owned()),
        )]));
        let options = interpolate::Options {
            credentials_dir,
            defer_credentials: false,
        };
        let done = interpolate::interpolate_with(&mut value, &interpolate::ProcessEnv, &options)
            .map_err(|errors| {
                errors
                    .into_iter()
                    .map(|error| format!("{}: {}", error.key, error.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        let mut secrets = done.substituted;
        let substituted = value
            .get(flag)
            .and_then(toml::Value::as_str)
            .expect("the table holds the flag's string, substituted in place")
            .to_owned();
        let parsed = PostgresUrl::parse(&Secret::new(substituted));
        if let Ok(PostgresUrl {
            password: Some(password),
            ..
        }) = &parsed
        {
            secrets.push(password.expose().to_owned());
        }
        interpolate::remember_for_process(&interpolate::Substituted::new(&secrets));
        parsed.map_err(|message| format!("{flag}: {message}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PostgresUrl, String> {
        PostgresUrl::parse(&Secret::new(text))
    }

    #[test]
    fn a_url_gives_host_port_database_user_and_a_decoded_password() {
        let url = parse("postgres://deal%20sync:p%40ss%2Fw0rd@db.internal:6543/deals").unwrap();
        assert_eq!(url.host, "db.internal");
        assert_eq!(url.port, 6543);
        assert_eq!(url.database, "deals");
        assert_eq!(url.user, "deal sync");
        assert_eq!(url.password.as_ref().unwrap().expose(), "p@ss/w0rd");
        assert_eq!(url.to_string(), "db.internal:6543/deals");
        let plain = parse("postgresql://dealsync@10.0.0.5/dealsync").unwrap();
        assert_eq!((plain.port, plain.password.is_none()), (5432, true));
        assert_eq!(plain.to_string(), "10.0.0.5:5432/dealsync");
        let v6 = parse("postgres://dealsync@[::1]:5433/dealsync").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.host_port()),
            ("::1", "[::1]:5433".to_owned())
        );
    }

    #[test]
    fn sslmode_and_sslrootcert_are_read_and_a_mode_dealsync_does_not_follow_is_refused() {
        let base = "postgres://dealsync@db/deals";
        assert_eq!(parse(base).unwrap().tls, TlsMode::Disable);
        assert_eq!(
            parse(&format!("{base}?sslmode=require")).unwrap().tls,
            TlsMode::Require
        );
        let verified = parse(&format!(
            "{base}?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        ))
        .unwrap();
        assert_eq!(verified.tls, TlsMode::VerifyFull);
        assert_eq!(
            verified.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        for (query, expected) in [
            ("sslmode=prefer", "use sslmode=verify-full"),
            ("sslmode=verify-ca", "use sslmode=verify-full"),
            ("sslmode=bogus", "disable, require or verify-full"),
            ("sslrootcert=/etc/ca.pem", "needs sslmode=verify-full"),
            ("application_name=x", "`application_name`"),
        ] {
            let error = parse(&format!("{base}?{query}")).unwrap_err();
            assert!(error.contains(expected), "{query}: {error}");
        }
    }

    #[test]
    fn debug_display_and_every_refusal_leave_the_password_out() {
        let url = parse("postgres://dealsync:hunter2-secret@db:5432/deals").unwrap();
        let shown = format!("{url:?} {url}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://dealsync:***@db:5432/deals"),
            "{shown}"
        );
        for text in [
            "mysql://dealsync:hunter2-secret@db/deals",
            "postgres://dealsync:hunter2-secret@db:5432/",
            "postgres://dealsync:hunter2-secret@db:5432/deals?sslmode=prefer",
            "postgres://dealsync:hunter2-secret@db:5432/deals?options=-c",
            "postgres://dealsync:hunter2-secret@db:99999/deals",
            "postgres://:hunter2-secret@db/deals",
            "postgres:///deals",
            "hunter2-secret",
        ] {
            let error = parse(text).unwrap_err();
            assert!(!error.contains("hunter2"), "{text}: {error}");
        }
    }
}
