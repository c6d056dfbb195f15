//! The agent's trust in the service: the SHA-256 fingerprint of the service's CA certificate,
//! pinned at join (the second line of the join-token file) and kept in the state directory.
//!
//! A server is accepted only when the chain it presents contains a certificate with the pinned
//! fingerprint and its leaf chains to that certificate (signatures and validity checked by
//! webpki). Names are not checked: hosts reach the service by whatever address they have, and
//! the pin already names the one CA that may have issued the certificate. A self-signed server
//! certificate may be pinned itself.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// `sha256:` + 64 lowercase hex digits of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses a fingerprint as `join-token create` prints it (`sha256:` + 64 hex digits; upper
/// case and `:` between bytes are accepted too) into its normal form.
pub fn parse_fingerprint(text: &str) -> Result<String, String> {
    let t = text.trim();
    let hex = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .ok_or_else(|| format!("{t:?} is not a CA fingerprint (sha256: and 64 hex digits)"))?;
    let hex: String = hex.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{t:?} is not a CA fingerprint (sha256: and 64 hex digits)"
        ));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

#[derive(Debug)]
pub struct PinnedVerifier {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    pub fn new(pin: String, provider: &CryptoProvider) -> Self {
        PinnedVerifier {
            pin,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if fingerprint(end_entity) == self.pin {
            // The pinned certificate is the server's own (self-signed): it is the identity.
            let _ = ParsedCertificate::try_from(end_entity)?;
            return Ok(ServerCertVerified::assertion());
        }
        let Some(at) = intermediates
            .iter()
            .position(|c| fingerprint(c) == self.pin)
        else {
            return Err(Error::General(format!(
                "the service's certificate chain does not contain the pinned CA ({})",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(intermediates[at].clone())
            .map_err(|e| Error::General(format!("the pinned CA certificate: {e}")))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != at)
            .map(|(_, c)| c.clone())
            .collect();
        let leaf = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &others,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A rustls client configuration that trusts only the pinned CA.
pub fn client_config(pin: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedVerifier::new(pin.to_string(), &provider));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_to_one_form() {
        let f = fingerprint(b"x");
        assert!(f.starts_with("sha256:") && f.len() == 71);
        assert_eq!(parse_fingerprint(&f).unwrap(), f);
        assert_eq!(parse_fingerprint(&f.to_ascii_uppercase()).unwrap(), f);
        assert!(parse_fingerprint("-").is_err());
        assert!(parse_fingerprint("sha256:abcd").is_err());
    }

    struct Ca {
        cert: rcgen::Certificate,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::new(vec!["service.example".to_string()]).unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        p.signed_by(&key, issuer).unwrap().der().clone()
    }

    fn check(
        pin: &str,
        leaf: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
    ) -> Result<(), Error> {
        let provider = rustls::crypto::ring::default_provider();
        let v = PinnedVerifier::new(pin.to_string(), &provider);
        // A name the certificate does not carry: names are not what is checked.
        let name = ServerName::try_from("198.18.0.1").unwrap();
        v.verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn only_a_leaf_issued_by_the_pinned_ca_passes() {
        let good = ca("pinned");
        let evil = ca("other");
        let pin = fingerprint(good.cert.der());
        let good_leaf = leaf(&good.issuer);
        let evil_leaf = leaf(&evil.issuer);
        // The leaf of the pinned CA, whatever address the host used.
        check(&pin, &good_leaf, &[good.cert.der().clone()]).unwrap();
        // Another CA's chain.
        assert!(check(&pin, &evil_leaf, &[evil.cert.der().clone()]).is_err());
        // Another CA's leaf with the pinned CA's certificate appended: not signed by it.
        assert!(check(&pin, &evil_leaf, &[good.cert.der().clone()]).is_err());
        // No CA in the chain at all.
        assert!(check(&pin, &good_leaf, &[]).is_err());
        // A self-signed server certificate pinned itself.
        let own = good.cert.der().clone();
        check(&pin, &own, &[]).unwrap();
    }
}
