//! `auth.mode: jwt`: a token verified with one key whose type fixes the algorithm (HS256 for a
//! secret; RS256, ES256 or EdDSA for a PEM public key), so a token cannot choose its own
//! (`alg: none`, or HS256 signed with the public key, are refused as invalid).

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;
use shared::config::JwtConfig;

use super::Outcome;
use super::grant::{Grant, Rooms};

/// The claims read: `sub` and `exp` are required.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Rooms,
    #[serde(default)]
    publish: Rooms,
}

/// Verifies tokens against one key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
}

impl Verifier {
    /// The verifier `cfg` describes.
    ///
    /// # Errors
    /// The public key file cannot be read or holds no usable key.
    pub fn new(cfg: &JwtConfig) -> Result<Self, String> {
        let (key, algorithm) = if cfg.public_key_file.is_empty() {
            (
                DecodingKey::from_secret(cfg.hs256_secret.as_bytes()),
                Algorithm::HS256,
            )
        } else {
            let pem = std::fs::read(&cfg.public_key_file)
                .map_err(|e| format!("auth.jwt.public_key_file {:?}: {e}", cfg.public_key_file))?;
            public_key(&pem).ok_or_else(|| {
                format!(
                    "auth.jwt.public_key_file {:?}: not an RSA, EC P-256 or Ed25519 public key in PEM",
                    cfg.public_key_file
                )
            })?
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = cfg.leeway_secs;
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not only checked when present.
        let mut required = vec!["exp", "sub"];
        if !cfg.issuer.is_empty() {
            validation.set_issuer(&[&cfg.issuer]);
            required.push("iss");
        }
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&cfg.audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            key,
            validation,
            leeway: cfg.leeway_secs,
        })
    }

    /// The grant a token carries.
    ///
    /// # Errors
    /// [`Outcome::Expired`] past `exp` (plus leeway); [`Outcome::Invalid`] for anything else
    /// wrong: signature, algorithm, issuer, audience, a missing or empty `sub`.
    pub fn verify(&self, token: &str) -> Result<Grant, Outcome> {
        let raw = decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Outcome::Expired,
                _ => Outcome::Invalid,
            })?
            .claims;
        let claims = Claims::deserialize(&raw).map_err(|_| Outcome::Invalid)?;
        if claims.sub.is_empty() {
            return Err(Outcome::Invalid);
        }
        Ok(Grant {
            user: Some(claims.sub),
            rooms: claims.rooms,
            publish: claims.publish,
            // Admitted up to `leeway` past `exp`, so connected until then too.
            expires: Some(claims.exp.saturating_add(self.leeway)),
            claims: raw,
        })
    }
}

/// A PEM public key and the one algorithm it verifies.
fn public_key(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Some((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Some((k, Algorithm::ES256));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Some((k, Algorithm::EdDSA));
    }
    None
}
