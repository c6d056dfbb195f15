//! bluebatch-core: the domain model and the Batch rules, as pure functions over a [`Clock`].
//! Nothing here knows about HTTP, storage or SSH.

pub mod account;
pub mod clock;
pub mod crypt;
pub mod error;
pub mod model;
pub mod pools;
pub mod sshkey;
pub mod timefmt;
pub mod users;

pub use account::NodeAccount;
pub use clock::{Clock, ServiceClock};
pub use error::{BatchError, Code, Result};
