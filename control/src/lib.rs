//! The `sluice` control plane as a library: configuration (TOML -> validated tables), the
//! control thread, log sinks, the admin API and reports. The binary (`main.rs`) is only its
//! command line; the fuzz targets in `fuzz/` feed untrusted text to [`config`] through
//! here. The data plane lives in `sluice-engine`; this crate never touches a socket on the
//! relay path.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod discovery;
pub mod dns;
pub mod health;
pub mod instance;
pub mod logger;
pub mod metrics;
pub mod notify;
pub mod privileges;
pub mod process;
pub mod records;
pub mod report;
pub mod run;
pub mod sinks;
pub mod upgrade;
pub mod zones;
