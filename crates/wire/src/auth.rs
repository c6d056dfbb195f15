//! The one authentication entry point: every Batch request passes here and comes out with the
//! account it acts for, or a Batch error. Handlers never see an unauthenticated request.

use crate::server::WireConfig;
use crate::sharedkey::{self, Signed};
use bluebatch_core::error::{BatchError, Code};
use time::OffsetDateTime;

pub fn authenticate(
    req: &Signed<'_>,
    config: &WireConfig,
    now: OffsetDateTime,
) -> Result<String, BatchError> {
    let scheme = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(s, _)| s);
    match scheme {
        Some(s) if s.eq_ignore_ascii_case("Bearer") => {
            Err(BatchError::new(Code::AuthenticationFailed).with(
                "AuthenticationErrorDetail",
                "Bearer tokens are not enabled on this server; use Shared Key.",
            ))
        }
        _ => sharedkey::verify(req, &config.accounts, now),
    }
}
