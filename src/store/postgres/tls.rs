//! TLS to the server, as `storage.url`'s `sslmode` asks (`config::storage::TlsMode`):
//! `disable` plain TCP; `require` encrypted without checking the certificate (libpq's
//! meaning); `verify-full` encrypted, the certificate chained to a trusted root
//! (`sslrootcert`, else the public web roots) and naming the host.
//!
//! Invariants:
//! - A mode is never downgraded: with `require` or `verify-full` a server that does not
//!   speak TLS is refused (`SslMode::Require`), and with `verify-full` a certificate
//!   that does not verify fails the connection, naming the cause.
//! - rustls with ring, as the HTTP client and the mailer: no OpenSSL.

use crate::config::PostgresUrl;
use crate::config::storage::TlsMode;
use crate::store::{Result, StoreError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Sets `config`'s `sslmode` from `url` and returns the connector every connection
/// (the pool's and the listener's) uses.
pub(super) fn connector(
    url: &PostgresUrl,
    config: &mut tokio_postgres::Config,
) -> Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| StoreError::Task(format!("setting up TLS: {error}")))?;
    let client = match url.tls {
        TlsMode::Disable => {
            config.ssl_mode(SslMode::Disable);
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
        TlsMode::Require => {
            config.ssl_mode(SslMode::Require);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth()
        }
        TlsMode::VerifyFull => {
            config.ssl_mode(SslMode::Require);
            builder
                .with_root_certificates(roots(url)?)
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(client))
}

/// The roots a `verify-full` server's certificate must chain to: the PEM file
/// `sslrootcert` names, else the public web roots.
fn roots(url: &PostgresUrl) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let Some(path) = &url.root_cert else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let unreadable = |cause: String| {
        StoreError::Task(format!(
            "reading storage.url's sslrootcert {}: {cause}; give a PEM file of the CA certificates the server's certificate chains to",
            path.display()
        ))
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| unreadable(error.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| unreadable(error.to_string()))?;
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(unreadable("it holds no certificate".to_owned()));
    }
    Ok(roots)
}

/// `sslmode=require`: any certificate is accepted (libpq does the same); the handshake
/// signatures are still checked, so the session is encrypted to whoever answered.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Database, Options, test_cluster, test_database};
    use crate::config::{PostgresUrl, Secret};

    /// Whether the connection `url` names is encrypted, as the server sees it.
    async fn encrypted(url: &str) -> Result<bool, String> {
        let url = PostgresUrl::parse(&Secret::new(url)).map_err(|error| error.to_string())?;
        let database = Database::connect(&url, &Options::default())
            .await
            .map_err(|error| crate::telemetry::error_chain(&error))?;
        let client = database.client().await.map_err(|error| error.to_string())?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|error| error.to_string())?;
        Ok(row.get(0))
    }

    /// Against the test cluster, which speaks TLS with a certificate for 127.0.0.1
    /// from a CA of its own (PostgreSQL only: the SQLite store has no connection).
    #[tokio::test]
    async fn sslmode_encrypts_and_verify_full_checks_the_servers_certificate() {
        let Some(database) =
            test_database("sslmode_encrypts_and_verify_full_checks_the_servers_certificate")
        else {
            return;
        };
        let ca = test_cluster::cluster().unwrap().ca_certificate();
        let url = database.url();
        assert_eq!(encrypted(&url).await, Ok(false), "plain TCP by default");
        assert_eq!(
            encrypted(&format!("{url}?sslmode=disable")).await,
            Ok(false)
        );
        assert_eq!(
            encrypted(&format!("{url}?sslmode=require")).await,
            Ok(true),
            "encrypted, the certificate not checked"
        );
        assert_eq!(
            encrypted(&format!(
                "{url}?sslmode=verify-full&sslrootcert={}",
                ca.display()
            ))
            .await,
            Ok(true),
            "encrypted, the certificate chained to the given CA and naming 127.0.0.1"
        );
        // The public roots do not know the test's CA: refused, naming why.
        let refused = encrypted(&format!("{url}?sslmode=verify-full"))
            .await
            .unwrap_err();
        assert!(
            refused.contains("127.0.0.1:") && refused.to_lowercase().contains("certificate"),
            "{refused}"
        );
        assert!(
            !refused.contains(super::super::test_cluster::PASSWORD),
            "{refused}"
        );
        // A root file that is no certificate is named, with what to give.
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("roots.pem");
        std::fs::write(&bogus, "not a certificate\n").unwrap();
        let refused = encrypted(&format!(
            "{url}?sslmode=verify-full&sslrootcert={}",
            bogus.display()
        ))
        .await
        .unwrap_err();
        assert!(
            refused.contains("roots.pem") && refused.contains("PEM file"),
            "{refused}"
        );
    }
}
