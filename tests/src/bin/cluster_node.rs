//! sockshift-cluster-node: one simulated node's etcd presence in its own process, so that the
//! cluster tests can SIGKILL it (a crash, not a polite shutdown). It prints one line per event:
//! `registered <lease>`, `leader <node> <revision> <lease>`, `lease-lost <lease>`,
//! `lease-acquired <lease>`.

use std::{io::Write, time::Duration};

use agent::cluster::{ClusterConfig, ClusterStore, Election, LeaseEvent, NodeSession, NodeStatus};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    /// etcd client endpoints, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    node: String,
    /// Lease TTL, seconds.
    #[arg(long, default_value_t = 2)]
    ttl: u64,
    #[command(subcommand)]
    command: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Publish the node's status under its lease, then keep it alive until killed.
    Register,
    /// Register, then campaign for leadership on the lease and hold it until killed.
    Campaign,
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = ClusterConfig::new(args.endpoints);
    config.node = Some(args.node.clone());
    config.prefix = args.prefix;
    config.lease_ttl_seconds = args.ttl;
    let settings = config.validate()?;
    let store = ClusterStore::connect(&settings).await?;
    let status = NodeStatus {
        node: args.node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        applied_revision: 0,
        at_unix_ms: agent::cluster::unix_ms(),
        healthy: true,
        detail: String::new(),
    };
    let mut session = NodeSession::start(&store, status).await?;
    let lease = session.lease().expect("a lease right after start");
    say(format!("registered {lease:x}"));
    if let Role::Campaign = args.command {
        let election = Election::new(&store);
        let leadership = loop {
            match election.campaign(lease).await {
                Ok(leadership) => break leadership,
                Err(err) => {
                    eprintln!("campaign: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        say(format!("leader {} {} {:x}", leadership.node, leadership.revision, leadership.lease));
    }
    while let Some(event) = session.next_event().await {
        match event {
            LeaseEvent::Lost { lease, .. } => say(format!("lease-lost {lease:x}")),
            LeaseEvent::Acquired { lease } => say(format!("lease-acquired {lease:x}")),
        }
    }
    Ok(())
}
