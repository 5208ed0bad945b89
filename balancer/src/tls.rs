//! HTTPS/WSS on the public listener (`balancer.tls`): TLS 1.2 and 1.3 through pingora's rustls
//! listener, with the certificate re-read when its files change.
//!
//! The certificate is checked before it is served: at start a chain that is expired or not yet
//! valid, or a key that does not belong to it, stops the balancer with a message naming the
//! file; while running, such a replacement is refused with a warning and the current one is
//! kept. New connections get the newest certificate; open ones continue on theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::listeners::tls::{Acceptor, TlsSettings};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{ClientHello, CryptoProvider, ResolvesServerCert};
use shared::config::TlsConfig;

/// How often the files are looked at for a change.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Why a certificate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file is missing or unreadable, or holds no certificate or key.
    #[error("{path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The leaf certificate is outside its validity period.
    #[error("{path}: the certificate {reason}")]
    NotValidNow {
        /// The certificate file.
        path: String,
        /// Expired or not yet valid, with the date.
        reason: String,
    },
    /// The key does not belong to the leaf certificate.
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
}

/// Loads and checks a certificate chain and its key.
///
/// # Errors
/// See [`CertError`].
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, CertError> {
    pingora_rustls::install_default_crypto_provider();
    let cert_name = cert_path.display().to_string();
    let key_name = key_path.display().to_string();
    let unreadable = |path: &str, reason: String| CertError::Unreadable {
        path: path.to_owned(),
        reason,
    };
    for (path, name) in [(cert_path, &cert_name), (key_path, &key_name)] {
        std::fs::metadata(path).map_err(|e| unreadable(name, e.to_string()))?;
    }
    let (certs, key) = pingora_rustls::load_certs_and_key_files(&cert_name, &key_name)
        .map_err(|e| unreadable(&cert_name, e.to_string()))?
        .ok_or_else(|| {
            unreadable(
                &cert_name,
                format!("no PEM certificate here, or no PEM private key in {key_name}"),
            )
        })?;
    check_validity(&certs[0], &cert_name)?;
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls_ring_provider()));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| unreadable(&key_name, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|_| CertError::KeyMismatch {
        cert: cert_name.clone(),
        key: key_name.clone(),
    })?;
    Ok(Arc::new(certified))
}

fn rustls_ring_provider() -> CryptoProvider {
    pingora_rustls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .map(|p| (**p).clone())
        .expect("installed just now")
}

fn check_validity(leaf: &pingora_rustls::CertificateDer<'_>, path: &str) -> Result<(), CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| CertError::Unreadable {
            path: path.to_owned(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    let reason = if now > validity.not_after {
        format!("expired on {}", validity.not_after)
    } else if now < validity.not_before {
        format!("is not valid before {}", validity.not_before)
    } else {
        return Ok(());
    };
    Err(CertError::NotValidNow {
        path: path.to_owned(),
        reason,
    })
}

/// The certificate new connections get: swapped when its files change.
#[derive(Debug)]
pub struct Certificate {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS for the public listener: the acceptor its connections' handshakes go through (in
/// [`crate::proxy::front`], under the head timeout, failures counted), and the watcher that
/// reloads the certificate.
///
/// # Errors
/// The certificate cannot be served (see [`load`]).
pub fn listener(cfg: &TlsConfig) -> Result<(Arc<Acceptor>, Watcher), CertError> {
    let files = Files {
        cert: PathBuf::from(&cfg.cert_file),
        key: PathBuf::from(&cfg.key_file),
    };
    let first = load(&files.cert, &files.key)?;
    let certificate = Arc::new(Certificate {
        current: ArcSwap::new(first),
    });
    // The paths are only a placeholder: a resolver, once set, is what serves.
    let mut settings = TlsSettings::intermediate(&cfg.cert_file, &cfg.key_file)
        .expect("plain settings cannot fail");
    settings.set_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
    let stamp = files.stamp();
    Ok((
        Arc::new(settings.build()),
        Watcher {
            files,
            certificate,
            stamp,
        },
    ))
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    /// What changes when either file is replaced or rewritten.
    fn stamp(&self) -> Option<(SystemTime, u64, SystemTime, u64)> {
        let c = std::fs::metadata(&self.cert).ok()?;
        let k = std::fs::metadata(&self.key).ok()?;
        Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
    }
}

/// Re-reads the certificate when its files change.
pub struct Watcher {
    files: Files,
    certificate: Arc<Certificate>,
    stamp: Option<(SystemTime, u64, SystemTime, u64)>,
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut seen = self.stamp;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            let stamp = self.files.stamp();
            if stamp.is_none() || stamp == seen {
                continue;
            }
            seen = stamp;
            match load(&self.files.cert, &self.files.key) {
                Ok(new) => {
                    self.certificate.current.store(new);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded: new connections use it");
                }
                // A half-written pair is caught here too: the next write changes the stamp.
                Err(e) => {
                    tracing::warn!("TLS certificate not reloaded, the current one stays: {e}")
                }
            }
        }
    }
}
