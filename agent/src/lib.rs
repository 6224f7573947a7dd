//! sockshift agent: loads the socket-layer canary programs, owns their maps, serves the control
//! API. `main.rs` wires these modules; the CLI talks to the API through `client`.

pub mod api;
pub mod audit;
pub mod bpf_sys;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod datapath;
pub mod discovery;
pub mod metrics;
pub mod paths;
pub mod rollout;
pub mod state;
pub mod terminate;
