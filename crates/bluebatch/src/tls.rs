//! HTTPS beside HTTP: `bluebatch serve --tls` serves the same service on `--tls-port` with a
//! certificate of the user's (`--tls-cert`, `--tls-key`) or one generated into the data
//! directory. URLs the server writes on that listener use `https`.
//!
//! The generated certificate is issued by a local CA made for this data directory only: its
//! certificate is `tls/ca.pem` (the file to trust), its private key is discarded once the server
//! certificate is signed, so nothing else can ever be issued under it. The server certificate
//! (`tls/cert.pem`, with the CA after it) and key (`tls/key.pem`, mode 0600) cover 127.0.0.1, ::1
//! and localhost. They are reused at every start; delete the `tls` directory to make new ones.
//! (A CA plus a leaf, rather than one self-signed certificate, satisfies both OpenSSL's strict
//! mode, the default since Python 3.13, and webpki, which refuses a CA certificate as a server's.)

use bluebatch_wire::{App, WireConfig};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct TlsArgs {
    /// Also serve the Batch API over HTTPS, on --tls-port (HTTP stays on --port).
    #[arg(long, env = "BLUEBATCH_TLS")]
    tls: bool,
    /// Port for HTTPS (0 picks a free one).
    #[arg(long, default_value_t = 8522, env = "BLUEBATCH_TLS_PORT")]
    tls_port: u16,
    /// PEM certificate chain for HTTPS (server certificate first). Implies --tls. Without it,
    /// a certificate for 127.0.0.1, ::1 and localhost is generated into DATA_DIR/tls.
    #[arg(long, requires = "tls_key", env = "BLUEBATCH_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, requires = "tls_cert", env = "BLUEBATCH_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

/// The certificate and key to serve, and what to tell clients.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The generated CA certificate clients must trust (None for a user's certificate).
    ca: Option<PathBuf>,
}

fn load(cert: &Path, key: &Path) -> Result<Material, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Material {
        chain,
        key,
        ca: None,
    })
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = if private { 0o600 } else { 0o644 };
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(at)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(text.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(at)
}

/// Generates the local CA and the server certificate into `dir` (unless they exist) and loads
/// them.
fn generated(dir: &Path) -> Result<Material, String> {
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    if !(ca_path.exists() && cert_path.exists() && key_path.exists()) {
        generate(dir, &ca_path, &cert_path, &key_path)?;
    }
    let mut m = load(&cert_path, &key_path)?;
    m.ca = Some(ca_path);
    Ok(m)
}

fn generate(dir: &Path, ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<(), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| format!("generating the TLS certificate: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let now = time::OffsetDateTime::now_utc();
    let serial = || {
        let mut s = rand::random::<[u8; 16]>();
        s[0] &= 0x7f; // a positive INTEGER
        rcgen::SerialNumber::from_slice(&s)
    };

    let mut ca = CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("bluebatch local CA {}", now.unix_timestamp()),
    );
    ca.distinguished_name
        .push(DnType::OrganizationName, "bluebatch (development only)");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(10 * 365);
    ca.serial_number = Some(serial());
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let mut leaf = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(err)?;
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = ca.not_before;
    leaf.not_after = now + time::Duration::days(5 * 365);
    leaf.serial_number = Some(serial());
    let leaf_key = KeyPair::generate().map_err(err)?;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &Issuer::new(ca, ca_key))
        .map_err(err)?;

    write(key_path, &leaf_key.serialize_pem(), true)?;
    write(
        cert_path,
        &format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        false,
    )?;
    write(ca_path, &ca_cert.pem(), false)
}

fn server_config(m: Material) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(m.chain, m.key)
        .map_err(|e| format!("TLS certificate and key: {e}"))?;
    // The HTTP listener speaks HTTP/1.1 only; so does this one.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What `--tls` serves, loaded (or generated) before the listeners start.
pub struct Prepared {
    config: Arc<ServerConfig>,
    /// The generated CA certificate clients must trust (None for a user's certificate).
    ca: Option<PathBuf>,
    /// `sha256:` and the lowercase hex SHA-256 of the CA certificate's DER: the last
    /// certificate of the served chain (the generated CA, or the last of `--tls-cert`'s chain).
    /// Agents pin it at join (`bluebatch join-token create` prints it).
    pub ca_fingerprint: String,
}

/// `sha256:` and 64 lowercase hex digits: the SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// When asked for (`--tls` or `--tls-cert`), loads the user's certificate or generates one;
/// `None` without HTTPS.
pub fn prepare(args: &TlsArgs, data_dir: &Path) -> Result<Option<Prepared>, String> {
    if !args.tls && args.tls_cert.is_none() {
        return Ok(None);
    }
    let material = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => load(cert, key)?,
        _ => generated(&data_dir.join("tls"))?,
    };
    let ca = material.ca.clone();
    let ca_fingerprint = fingerprint(
        material
            .chain
            .last()
            .expect("load() refuses an empty chain")
            .as_ref(),
    );
    let config = server_config(material)?;
    Ok(Some(Prepared {
        config,
        ca,
        ca_fingerprint,
    }))
}

/// With `prepared` ([`prepare`]), starts the HTTPS listener for the same service as `app`
/// (with `https` in the URLs it writes), prints where it listens and how to trust its
/// certificate, and serves until `stop` changes or its sender is dropped. Returns the server's
/// task.
pub async fn start(
    args: &TlsArgs,
    prepared: Option<Prepared>,
    host: IpAddr,
    app: &App,
    mut stop: tokio::sync::watch::Receiver<()>,
) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>, String> {
    let Some(Prepared {
        config,
        ca,
        ca_fingerprint,
    }) = prepared
    else {
        return Ok(None);
    };

    let listener = std::net::TcpListener::bind((host, args.tls_port))
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|e| format!("listening on {host}:{}: {e}", args.tls_port))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let https = Arc::new(App {
        service: app.service.clone(),
        config: WireConfig {
            scheme: "https",
            ..app.config.clone()
        },
    });
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| format!("HTTPS on {addr}: {e}"))?;

    println!("bluebatch listening on https://{addr}");
    println!(
        "console: https://{addr}{}/",
        bluebatch_wire::console::PREFIX
    );
    match &ca {
        Some(ca) => {
            let ca = ca.display();
            println!("tls: generated certificate for 127.0.0.1, ::1, localhost; CA: {ca}");
            println!("trust it (Python SDK, az CLI): export REQUESTS_CA_BUNDLE={ca}");
            println!("trust it (Node.js SDK): export NODE_EXTRA_CA_CERTS={ca}");
            println!("trust it (curl): curl --cacert {ca} https://{addr}/…");
        }
        None => {
            if let Some(cert) = &args.tls_cert {
                println!("tls: certificate {}", cert.display());
            }
        }
    }
    println!("tls: CA fingerprint (agents pin it) {ca_fingerprint}");

    // The same accept loop and connection limits as the HTTP listener (bluebatch_wire::conn);
    // the TLS handshake counts within the head deadline.
    Ok(Some(tokio::spawn(bluebatch_wire::serve_tls(
        listener,
        https,
        config,
        async move {
            let _ = stop.changed().await;
        },
    ))))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_is_sha256_hex_of_the_der() {
        // SHA-256 of the empty string.
        assert_eq!(
            super::fingerprint(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
