//! bluebatch-wire: the Azure Batch wire protocol over HTTP. Routing ([`endpoint`]), Shared Key
//! ([`sharedkey`]), query and header checks, OData JSON and Batch errors. It parses requests into
//! typed commands for the service and renders the outcomes; it holds no state of its own.

pub mod accounts;
pub mod agents;
pub mod auth;
pub mod bearer;
pub mod conditions;
pub mod conn;
pub mod console;
mod controls;
pub mod dto;
pub mod endpoint;
mod handlers;
mod hashing;
pub mod odata;
pub mod percent;
pub mod query;
pub mod respond;
pub mod server;
pub mod sharedkey;
pub mod unserved;

pub use accounts::{Accounts, DEV_ACCOUNT, DEV_KEY};
pub use axum::http;
pub use conn::HttpLimits;
pub use server::{App, CONTROL_PREFIX, WireConfig, router, serve, serve_tls};
