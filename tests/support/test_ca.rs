//! A test CA, made for each test that needs TLS, and the PEM files of the
//! certificates it signs.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::TempDir;

/// A CA of the test's own, and the PEM files of certificates it signed.
pub struct TestCa {
    pub dir: TempDir,
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "session-proxy test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = TempDir::new("tls");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        TestCa { dir, cert, key }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `names` (DNS names or IP addresses), as
    /// `(cert.pem, key.pem)` paths.
    pub fn issue(&self, tag: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_until(tag, names, (4096, 1, 1))
    }

    /// The same, valid until the start of `(year, month, day)`, UTC.
    pub fn issue_until(
        &self,
        tag: &str,
        names: &[&str],
        (year, month, day): (i32, u8, u8),
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_path = self.dir.path().join(format!("{tag}.pem"));
        let key_path = self.dir.path().join(format!("{tag}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A client that trusts this CA only, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.cert.der().to_vec()))
            .unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}
