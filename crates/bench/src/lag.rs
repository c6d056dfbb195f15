//! The node-protocol lag (issue 15, item 4).

use crate::{Report, Settings};

pub async fn measure(_s: &Settings, _rep: &mut Report) -> Result<(), String> {
    Ok(())
}
