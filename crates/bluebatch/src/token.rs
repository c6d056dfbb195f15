//! `bluebatch token`: mints a bearer token for local development, signed with the configured
//! HS256 secret or an RS256 private key, and prints it on stdout. Secrets come from files or
//! environment variables, never from the command line.

use bluebatch_wire::bearer::{self, BearerFile};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The accounts file whose "bearer" section gives the HS256 secret, the tenants and the
    /// account claim (the same file `bluebatch serve` reads).
    #[arg(long, env = "BLUEBATCH_ACCOUNTS_FILE")]
    accounts_file: Option<PathBuf>,
    /// Tenant id (default: the first tenant of the accounts file).
    #[arg(long)]
    tenant: Option<String>,
    /// Issuer (default: https://sts.windows.net/{tenant}/, as Entra's v1 tokens for Batch).
    #[arg(long)]
    issuer: Option<String>,
    /// Audience.
    #[arg(long, default_value = bearer::AUDIENCES[0])]
    audience: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    lifetime: u64,
    /// Subject (sub and oid claims).
    #[arg(long, default_value = "bluebatch-developer")]
    subject: String,
    /// Sign with RS256 using this PEM RSA private key (PKCS#8 or PKCS#1), instead of HS256.
    #[arg(long, conflicts_with_all = ["hs256_secret_file", "hs256_secret_env"])]
    rs256_key_file: Option<PathBuf>,
    /// Key id (kid) for an RS256 token: the kid of the matching key in the server's JWKS.
    #[arg(long, requires = "rs256_key_file")]
    kid: Option<String>,
    /// Sign with HS256 using the secret in this file (default: the accounts file's).
    #[arg(long, conflicts_with = "hs256_secret_env")]
    hs256_secret_file: Option<PathBuf>,
    /// Sign with HS256 using the secret in this environment variable (default: the accounts
    /// file's).
    #[arg(long)]
    hs256_secret_env: Option<String>,
}

/// `account`: the global `--account`, put in the account claim; without it the token acts for
/// its tenant's default account.
pub fn run(args: TokenArgs, account: Option<&str>) -> Result<(), String> {
    let file = match &args.accounts_file {
        Some(path) => BearerFile::read(path)?,
        None => None,
    };
    let (algorithm, key) = if let Some(path) = &args.rs256_key_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let key = EncodingKey::from_rsa_pem(&pem)
            .map_err(|e| format!("{}: not an RSA private key in PEM ({e})", path.display()))?;
        (Algorithm::RS256, key)
    } else {
        let secret = if let Some(path) = &args.hs256_secret_file {
            bearer::read_secret_file(path)?
        } else if let Some(var) = &args.hs256_secret_env {
            bearer::secret_from_env(var)?
        } else {
            file.as_ref()
                .map(BearerFile::hs256_secret)
                .transpose()?
                .flatten()
                .ok_or(
                    "no signing key: give --rs256-key-file, --hs256-secret-file or \
                     --hs256-secret-env, or an accounts file whose \"bearer\" section has \
                     hs256SecretFile or hs256SecretEnv",
                )?
        };
        (Algorithm::HS256, EncodingKey::from_secret(&secret))
    };

    let tenant = args
        .tenant
        .clone()
        .or_else(|| file.as_ref()?.tenants.first().map(|t| t.id.clone()));
    let issuer = match (&args.issuer, &tenant) {
        (Some(iss), _) => iss.clone(),
        (None, Some(t)) => bearer::tenant_issuers(t)[0].clone(),
        (None, None) => {
            return Err(
                "no issuer: give --tenant or --issuer, or an accounts file with \
                        \"bearer\": {\"tenants\": [...]}"
                    .into(),
            );
        }
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = serde_json::json!({
        "aud": args.audience,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + args.lifetime.min(i64::MAX as u64 / 2) as i64,
        "sub": args.subject,
        "oid": args.subject,
        "ver": "1.0",
    });
    if let Some(t) = &tenant {
        claims["tid"] = t.clone().into();
    }
    if let Some(a) = account {
        let claim = file
            .as_ref()
            .map_or(bearer::DEFAULT_ACCOUNT_CLAIM, BearerFile::account_claim);
        claims[claim] = a.into();
    }
    let mut header = Header::new(algorithm);
    header.typ = Some("JWT".into());
    header.kid = args.kid.clone();
    let token =
        jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("signing: {e}"))?;
    println!("{token}");
    Ok(())
}
