//! sockshift agent: loads the socket-layer canary programs, owns their maps, serves the control
//! API. `main.rs` only wires: the CLI (`cli`) parses and dispatches, the daemon (`daemon`) runs
//! the agent around its control core (`control`), which owns the desired state, its store and
//! the datapath (`datapath`); `api` is the HTTP edge and `client` the way the CLI reaches it.

pub mod api;
pub mod audit;
pub mod bpf_sys;
pub mod caps;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod discovery;
pub mod gates;
pub mod metrics;
pub mod outbound;
pub mod paths;
pub mod rollout;
pub mod state;
pub mod terminate;
pub mod webhook;
