//! TLS to the database with rustls (the ring provider, as the rest of the tree).

use crate::options::{PgOptions, SslMode};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The connector for `opts.sslmode`, or `None` for `disable`.
pub(crate) fn connector(opts: &PgOptions) -> Result<Option<MakeRustlsConnect>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let verify_chain = match opts.sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer => false,
        // libpq: require with a CA file behaves as verify-ca.
        SslMode::Require => opts.sslrootcert.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    let config = if verify_chain {
        let file = opts
            .sslrootcert
            .as_ref()
            .ok_or_else(|| format!("sslmode={} needs sslrootcert=FILE", opts.sslmode.as_str()))?;
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(file)
            .map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "sslrootcert {} holds no PEM certificate",
                file.display()
            ));
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
        if opts.sslmode == SslMode::VerifyFull {
            builder.with_webpki_verifier(webpki).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient(Some(webpki), provider())))
                .with_no_client_auth()
        }
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient(None, provider())))
            .with_no_client_auth()
    };
    Ok(Some(MakeRustlsConnect::new(config)))
}

/// verify-ca (`Some` chain verifier: the chain must lead to the CA, the name is not checked) and
/// prefer/require without a CA file (`None`: encrypted, the certificate not verified, as libpq).
#[derive(Debug)]
struct Lenient(
    Option<Arc<WebPkiServerVerifier>>,
    Arc<rustls::crypto::CryptoProvider>,
);

type Der<'a> = CertificateDer<'a>;
type Dss = DigitallySignedStruct;
type Signed = Result<HandshakeSignatureValid, Error>;

impl Lenient {
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.1.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(chain) = &self.0 else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &Der<'_>, d: &Dss) -> Signed {
        rustls::crypto::verify_tls12_signature(m, c, d, self.algorithms())
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &Der<'_>, d: &Dss) -> Signed {
        rustls::crypto::verify_tls13_signature(m, c, d, self.algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
