//! TLS to PostgreSQL, as libpq's `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` in the store URL ask (README, "TLS"), on the process's one
//! rustls (ring).
//!
//! tokio-postgres reads `sslmode` `disable`, `prefer` and `require` only,
//! and refuses the other three: all four are taken off the URL here,
//! tokio-postgres is told `require` (or `disable`), and the connector made
//! here verifies the server and presents the client's certificate.
//!
//! ```
//! use session_proxy::store::postgres::tls::{PostgresTls, SslMode};
//!
//! let (url, tls) =
//!     PostgresTls::from_url("postgres://app@db.internal/app?sslmode=verify-full").unwrap();
//! assert_eq!(url, "postgres://app@db.internal/app");
//! assert_eq!(tls.mode, SslMode::VerifyFull);
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::SingleCertAndKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What is asked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// `disable`, `allow`, `prefer`, or no `sslmode`: no TLS. libpq's
    /// `prefer` tries TLS without verifying it, which stops no attacker on
    /// the path (README, deviations).
    Plain,
    /// `require` without `sslrootcert`: TLS, any certificate.
    Unverified,
    /// `verify-ca`, or `require` with `sslrootcert`: a chain to one of the
    /// CAs, for any name.
    VerifyCa,
    /// `verify-full`: a chain to one of the CAs, for the name in `host`.
    VerifyFull,
}

/// The store URL's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTls {
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file of CAs; `None` for the system's CAs.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`: the certificate the client presents when
    /// the server asks for one (`cert` authentication in pg_hba.conf).
    pub client_cert: Option<ClientCert>,
}

/// The client's certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PostgresTls {
    /// Takes `sslmode` and `sslrootcert` off a `postgres://` URL; returns
    /// the URL left for tokio-postgres, and the settings. libpq's
    /// `key=value` form is left whole: tokio-postgres reads its `sslmode`.
    /// Errors name the setting, never the URL, which may hold a password.
    pub fn from_url(url: &str) -> Result<(String, PostgresTls), String> {
        let Some((base, query)) = split_query(url) else {
            return Ok((url.to_owned(), key_value_settings(url)));
        };
        let (mut sslmode, mut root_cert, mut cert, mut private_key) = (None, None, None, None);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = || percent_decode_str(value).decode_utf8_lossy().into_owned();
            match &*percent_decode_str(key).decode_utf8_lossy() {
                "sslmode" => sslmode = Some(value()),
                "sslrootcert" => root_cert = Some(value()).filter(|path| !path.is_empty()),
                "sslcert" => cert = Some(value()).filter(|path| !path.is_empty()),
                "sslkey" => private_key = Some(value()).filter(|path| !path.is_empty()),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        // libpq 16: the system's CAs sign certificates for any name, so
        // with them only the name tells the server from anyone else's.
        let system = root_cert.as_deref() == Some("system");
        let mode = match sslmode.as_deref() {
            None if system => SslMode::VerifyFull,
            None | Some("disable" | "allow" | "prefer") => SslMode::Plain,
            Some("require") if root_cert.is_some() => SslMode::VerifyCa,
            Some("require") => SslMode::Unverified,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("verify-full") => SslMode::VerifyFull,
            Some(other) => {
                return Err(format!(
                    "sslmode: expected disable, allow, prefer, require, verify-ca or verify-full, found {other:?}"
                ))
            }
        };
        if system && mode != SslMode::VerifyFull {
            return Err(
                "sslrootcert=system takes sslmode=verify-full (as in libpq): any name is signed by some system CA"
                    .into(),
            );
        }
        let root_cert = root_cert.filter(|_| !system).map(PathBuf::from);
        let client_cert = match (cert, private_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientCert {
                cert: cert.into(),
                key: key.into(),
            }),
            (Some(_), None) => return Err(client_cert_half("sslcert", "sslkey")),
            (None, Some(_)) => return Err(client_cert_half("sslkey", "sslcert")),
        };
        // libpq would send it under `prefer`'s TLS; here `prefer` is plain,
        // and a certificate never sent would only show as a refused login.
        if client_cert.is_some() && mode == SslMode::Plain {
            let asked = match &sslmode {
                Some(sslmode) => format!("sslmode={sslmode}"),
                None => "no sslmode".to_owned(),
            };
            return Err(format!(
                "sslcert: a client certificate is sent over TLS only, and with {asked} this proxy \
                 speaks none (README, \"TLS\"); set sslmode=verify-full (with sslrootcert, the \
                 server's CA)"
            ));
        }
        Ok((
            rest,
            PostgresTls {
                mode,
                root_cert,
                client_cert,
            },
        ))
    }

    /// What tokio-postgres is told: the verification is the connector's.
    pub fn negotiated(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Plain => tokio_postgres::config::SslMode::Disable,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The connector, with the CAs read (none for `Plain` and
    /// `Unverified`) and the client's certificate and key. Errors name
    /// `sslrootcert`, `sslcert` or `sslkey`, the file, and the problem.
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::Plain | SslMode::Unverified => Arc::new(Relaxed {
                chain: None,
                provider: provider.clone(),
            }),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = match &self.root_cert {
                    Some(path) => crate::tls::ca_roots(path)
                        .map_err(|problem| format!("sslrootcert: {problem}"))?,
                    None => crate::tls::system_roots().map_err(|problem| {
                        format!("{problem}, or name the server's CA in sslrootcert")
                    })?,
                };
                let chain =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("sslrootcert: {e}"))?;
                match self.mode {
                    SslMode::VerifyCa => Arc::new(Relaxed {
                        chain: Some(chain),
                        provider: provider.clone(),
                    }),
                    _ => chain,
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let identity = client.certified_key()?;
                builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(identity)))
            }
        };
        // As libpq 17 sends; PostgreSQL 17 asks it of sslnegotiation=direct.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustlsConnect::new(config))
    }
}

impl ClientCert {
    /// The chain and its key, read and paired now; the key file must be
    /// private, as libpq requires.
    fn certified_key(&self) -> Result<rustls::sign::CertifiedKey, String> {
        private_key_file(&self.key).map_err(|problem| format!("sslkey: {problem}"))?;
        crate::tls::certified_key_of(&self.cert, &self.key).map_err(|(part, problem)| match part {
            crate::tls::Part::Cert => format!("sslcert: {problem}"),
            crate::tls::Part::Key => format!("sslkey: {problem}"),
        })
    }
}

fn client_cert_half(set: &str, missing: &str) -> String {
    format!(
        "{set} is set and {missing} is not; a client certificate takes both, \
         sslcert (the certificate chain, PEM) and sslkey (its private key, PEM)"
    )
}

/// libpq's rule for the key file: no access for group or others when the
/// current user owns it (u=rw, 0600, or less), at most group read when
/// root owns it (u=rw,g=r, 0640, or less).
fn private_key_file(path: &Path) -> Result<(), String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{}: not a file", path.display()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mode = metadata.mode() & 0o7777;
    let ours_and_shared = metadata.uid() == euid && mode & 0o077 != 0;
    let roots_and_shared = metadata.uid() == 0 && mode & 0o037 != 0;
    if ours_and_shared || roots_and_shared {
        return Err(format!(
            "{}: private key file has group or world access (mode {mode:04o}); file must have \
             permissions u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) \
             or less if owned by root: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// A `postgres://` URL before its query, and the query; split where
/// tokio-postgres splits it: at the first `?` after the credentials.
fn split_query(url: &str) -> Option<(&str, &str)> {
    let rest = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))?;
    let start = url.len() - rest.len() + rest.find('@').map_or(0, |at| at + 1);
    Some(match url[start..].find('?') {
        Some(at) => (&url[..start + at], &url[start + at + 1..]),
        None => (url, ""),
    })
}

/// `require` in a `key=value` string is TLS, unverified; an unreadable
/// string is left for tokio-postgres to refuse.
fn key_value_settings(url: &str) -> PostgresTls {
    let required = tokio_postgres::Config::from_str(url)
        .is_ok_and(|config| config.get_ssl_mode() == tokio_postgres::config::SslMode::Require);
    PostgresTls {
        mode: if required {
            SslMode::Unverified
        } else {
            SslMode::Plain
        },
        root_cert: None,
        client_cert: None,
    }
}

/// What libpq's weaker modes check: `require` without `sslrootcert`
/// (`chain: None`) takes any certificate; `verify-ca` the chain as
/// `verify-full` checks it, for any name. The handshake's signatures are
/// checked against the certificate's key in both.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // rustls checks the name last, once the chain is good.
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> Result<(String, SslMode, Option<PathBuf>), String> {
        PostgresTls::from_url(url).map(|(rest, tls)| (rest, tls.mode, tls.root_cert))
    }

    #[test]
    fn no_sslmode_and_prefer_stay_plain() {
        for url in [
            "postgres://u@h/db",
            "postgres://u@h/db?sslmode=prefer",
            "postgres://u@h/db?sslmode=allow",
            "postgres://u@h/db?sslmode=disable",
        ] {
            assert_eq!(settings(url).unwrap().1, SslMode::Plain, "{url}");
        }
    }

    #[test]
    fn require_verifies_only_with_a_root_cert() {
        let (rest, mode, root) = settings("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), mode, root),
            ("postgres://u@h/db", SslMode::Unverified, None)
        );
        let (_, mode, root) =
            settings("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!((mode, root), (SslMode::VerifyCa, Some("/ca.pem".into())));
    }

    #[test]
    fn the_tls_keys_leave_the_url_and_the_others_stay() {
        let (rest, mode, root) = settings(
            "postgresql://u:p%3Fw@h:5433/db?application_name=a&sslrootcert=%2Fetc%2Fca%20x.pem&sslmode=verify-full&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://u:p%3Fw@h:5433/db?application_name=a&connect_timeout=3"
        );
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root, Some("/etc/ca x.pem".into()));
    }

    #[test]
    fn the_query_starts_after_the_credentials() {
        // tokio-postgres takes a raw `?` in a password as the password's.
        let (rest, mode, _) = settings("postgres://u:pa?ss@h/db?sslmode=verify-ca").unwrap();
        assert_eq!(
            (rest.as_str(), mode),
            ("postgres://u:pa?ss@h/db", SslMode::VerifyCa)
        );
    }

    #[test]
    fn system_root_certs_take_verify_full() {
        let (_, mode, root) = settings("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!((mode, root), (SslMode::VerifyFull, None));
        let error = settings("postgres://h/db?sslrootcert=system&sslmode=require").unwrap_err();
        assert!(error.contains("verify-full"), "{error}");
    }

    #[test]
    fn an_unknown_sslmode_is_named_and_the_url_is_not() {
        let error = settings("postgres://u:secret@h/db?sslmode=verify_full").unwrap_err();
        assert!(error.starts_with("sslmode: expected"), "{error}");
        assert!(error.contains("\"verify_full\""), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn sslcert_and_sslkey_leave_the_url_together() {
        let (rest, tls) = PostgresTls::from_url(
            "postgres://u@h/db?sslmode=verify-full&sslcert=%2Fc%20x.pem&application_name=a&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h/db?application_name=a");
        assert_eq!(
            tls.client_cert,
            Some(ClientCert {
                cert: "/c x.pem".into(),
                key: "/k.pem".into()
            })
        );
    }

    #[test]
    fn one_of_sslcert_and_sslkey_alone_is_named() {
        let error =
            settings("postgres://u:secret@h/db?sslmode=require&sslcert=/c.pem").unwrap_err();
        assert!(
            error.starts_with("sslcert is set and sslkey is not"),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
        let error = settings("postgres://h/db?sslmode=require&sslkey=/k.pem").unwrap_err();
        assert!(
            error.starts_with("sslkey is set and sslcert is not"),
            "{error}"
        );
    }

    #[test]
    fn a_client_certificate_takes_a_mode_that_speaks_tls() {
        for mode in ["", "&sslmode=prefer", "&sslmode=disable"] {
            let url = format!("postgres://h/db?sslcert=/c.pem&sslkey=/k.pem{mode}");
            let error = settings(&url).unwrap_err();
            assert!(error.contains("sslmode=verify-full"), "{url}: {error}");
        }
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = format!("postgres://h/db?sslcert=/c.pem&sslkey=/k.pem&sslmode={mode}");
            assert!(settings(&url).is_ok(), "{url}");
        }
    }

    #[test]
    fn key_value_strings_go_to_tokio_postgres_whole() {
        let (rest, mode, _) = settings("host=h dbname=db sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), mode),
            ("host=h dbname=db sslmode=require", SslMode::Unverified)
        );
        assert_eq!(settings("host=h dbname=db").unwrap().1, SslMode::Plain);
    }
}
