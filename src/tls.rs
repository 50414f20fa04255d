//! TLS, with rustls on `ring` (pingora's `rustls` feature): the one TLS
//! stack of the process.
//!
//! The files are read and checked when the config is loaded, so a bad
//! certificate, key or CA file is a config error (exit 2) naming the file,
//! rather than a panic inside pingora once the listeners start.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use pingora::listeners::tls::TlsSettings;
use pingora::protocols::ALPN;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{
    CertificateDer, ClientHello, CryptoProvider, PrivateKeyDer, ResolvesServerCert, RootCertStore,
};
use rustls_pki_types::pem::{self, PemObject};

use crate::config::TlsFiles;

/// The listeners' certificate and key, read from their files when the
/// proxy starts and again on SIGHUP: a renewed certificate (Let's Encrypt,
/// every 60 to 90 days) takes no restart. Each handshake takes the one
/// current then.
#[derive(Debug)]
pub struct ListenerCertificate {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ListenerCertificate {
    pub fn load(files: &TlsFiles) -> Result<Arc<ListenerCertificate>, String> {
        Ok(Arc::new(ListenerCertificate {
            files: files.clone(),
            current: RwLock::new(Arc::new(
                certified_key(files).map_err(|(_, problem)| problem)?,
            )),
        }))
    }

    /// Reads the files again; on any problem the current certificate
    /// stays, and the problem is returned.
    pub fn reload(&self) -> Result<(), String> {
        let renewed = Arc::new(certified_key(&self.files).map_err(|(_, problem)| problem)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = renewed;
        Ok(())
    }

    /// When the current certificate expires, in Unix seconds; `None` if
    /// its end-entity certificate does not parse as X.509.
    pub fn not_after(&self) -> Option<i64> {
        let current = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (_, parsed) =
            x509_parser::parse_x509_certificate(current.end_entity_cert().ok()?).ok()?;
        Some(parsed.validity().not_after.timestamp())
    }

    /// pingora's settings for a listener with this certificate: TLS 1.2
    /// and 1.3; in ALPN `h2` and `http/1.1` with `http2` (`[server]
    /// http2`), else `http/1.1` alone. A client that offers no ALPN, or
    /// not `h2`, speaks HTTP/1.1.
    pub fn listener_settings(self: &Arc<Self>, http2: bool) -> Result<TlsSettings, String> {
        // The paths stay empty: pingora reads no file once a resolver is set.
        let mut settings = TlsSettings::intermediate("", "").map_err(|e| e.to_string())?;
        settings.set_cert_resolver(self.clone());
        settings.set_alpn(if http2 { ALPN::H2H1 } else { ALPN::H1 });
        Ok(settings)
    }
}

impl ResolvesServerCert for ListenerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// What is wrong with the listeners' files, if anything: the config key
/// of the file at fault (`server.tls_cert` or `server.tls_key`) and the
/// problem.
pub fn listener_problem(files: &TlsFiles) -> Option<(&'static str, String)> {
    certified_key(files).err()
}

/// The listeners' certificate and key, or the config key of the file at
/// fault and why.
fn certified_key(files: &TlsFiles) -> Result<CertifiedKey, (&'static str, String)> {
    certified_key_of(&files.cert, &files.key).map_err(|(part, problem)| {
        let key = match part {
            Part::Cert => "server.tls_cert",
            Part::Key => "server.tls_key",
        };
        (key, problem)
    })
}

/// Which of a certificate's two files is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

/// The certificate chain of `cert` with the key of `key`, which must go
/// with its first certificate; else the file at fault, and why. Used for
/// the listeners and for the PostgreSQL store's client certificate.
pub fn certified_key_of(cert: &Path, key: &Path) -> Result<CertifiedKey, (Part, String)> {
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default()
        .ok_or((Part::Cert, "no TLS crypto provider installed".to_string()))?;
    let certificates = certificates(cert).map_err(|problem| (Part::Cert, problem))?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        (
            Part::Key,
            format!(
                "{}: no private key read: {}; expected a PEM file with one PKCS#8, PKCS#1 or SEC1 key",
                key.display(),
                pem_problem(&e)
            ),
        )
    })?;
    CertifiedKey::from_der(certificates, private_key, provider).map_err(|e| {
        (
            Part::Key,
            format!(
                "{} with {}: not a key for this certificate: {e}",
                key.display(),
                cert.display()
            ),
        )
    })
}

/// Checks that `path` holds CA certificates the upstream's certificate can
/// be verified against; returns how many. The file is read as pingora
/// reads it when the proxy starts (`Connector::new`, which panics on a
/// file it refuses: one with anything but certificates, a key say), so
/// that `check` and `run` agree.
pub fn check_ca_file(path: &Path) -> Result<usize, String> {
    Ok(ca_roots(path)?.len())
}

/// The CA certificates of `path`, read as [`check_ca_file`] reads them
/// (the PostgreSQL store's `sslrootcert` too).
pub fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    certificates(path)?;
    let mut roots = RootCertStore::empty();
    pingora::tls::load_ca_file_into_store(path, &mut roots).map_err(|e| {
        format!(
            "{}: not usable as CA certificates: {e}; expected a PEM file of certificates only",
            path.display()
        )
    })?;
    Ok(roots)
}

/// Checks that the system's CAs load, as pingora loads them when the
/// proxy starts with `[upstream] tls = true` and no `ca_file` (and panics
/// if they do not): `SSL_CERT_FILE`/`SSL_CERT_DIR` when set, else the
/// system's bundle. Returns how many.
pub fn check_system_cas() -> Result<usize, String> {
    let roots = system_roots()
        .map_err(|problem| format!("{problem}, or give the app's CA in upstream.ca_file"))?;
    Ok(roots.len())
}

/// The system's CAs, as [`check_system_cas`] reads them; the error ends
/// where the caller can add its own way out.
pub fn system_roots() -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    pingora::tls::load_platform_certs_incl_env_into_store(&mut roots).map_err(|e| {
        format!("the system's CAs cannot be loaded: {e}; fix SSL_CERT_FILE/SSL_CERT_DIR")
    })?;
    Ok(roots)
}

/// What pingora's connector is given as its CA file when the upstream
/// speaks plain HTTP: no CA at all. pingora builds its TLS connector
/// whatever the upstream speaks, and without a CA file loads the system's,
/// panicking when `SSL_CERT_FILE`/`SSL_CERT_DIR` name nothing readable:
/// a plain-HTTP proxy must not depend on them.
pub const NO_CA_FILE: &str = "/dev/null";

/// A PEM file's problem in words. The crate's own message shows a section's
/// label as a list of byte values ("missing section end marker: [67, 69, …]").
fn pem_problem(error: &pem::Error) -> String {
    // At most 80 characters of what the file holds: by characters, since
    // the file may hold anything and a byte count can split one.
    let text = |bytes: &[u8]| -> String {
        String::from_utf8_lossy(bytes)
            .trim()
            .chars()
            .take(80)
            .collect()
    };
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "the file ends before the line \"-----END {}-----\" (cut short?)",
            text(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed PEM section start {:?}", text(line))
        }
        other => other.to_string(),
    }
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let unreadable = |e: pem::Error| format!("{}: {}", path.display(), pem_problem(&e));
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certificates.is_empty() {
        return Err(format!(
            "{}: no certificate found; expected PEM (\"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_problems_read_as_words_and_any_bytes_are_cut_safely() {
        let cut = pem::Error::MissingSectionEnd {
            end_marker: b"CERTIFICATE".to_vec(),
        };
        assert_eq!(
            pem_problem(&cut),
            "the file ends before the line \"-----END CERTIFICATE-----\" (cut short?)"
        );
        // Not UTF-8, and a multi-byte character across the 80th byte.
        let mut line = b"-----BEGIN ".to_vec();
        line.extend("é".repeat(100).as_bytes());
        line.extend([0xff, 0xfe]);
        let problem = pem_problem(&pem::Error::IllegalSectionStart { line });
        assert!(
            problem.starts_with("malformed PEM section start \"-----BEGIN éé"),
            "{problem}"
        );
        assert_eq!(problem.chars().filter(|&c| c == 'é').count(), 80 - 11);
    }
}
