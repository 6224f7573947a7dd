//! The watch loop: one kube-rs watcher + reflector per Kubernetes object the wanted services
//! name, and one loop that turns the reflectors' contents into each service's `Discovered` and
//! hands it to the control core when it changed.
//!
//! Failure behaviour (fail static):
//! - A watch that fails keeps its reflector's last contents, so steering goes on with the last
//!   state the API server gave; the service reports `stale` from the first failure on. The
//!   watcher retries with kube-rs' default backoff (client-go's: 0.8 s doubling to 30 s, with
//!   jitter), never in a hot loop.
//! - 410 Gone (the resourceVersion was compacted) makes the watcher relist; the reflector swaps
//!   the new list in whole at its end, and the loop sends only a result that differs from the
//!   last one sent, so an unchanged relist changes nothing and a changed one is one switch.
//! - Recovery is seen when the watcher delivers an event, or, when a resumed watch has nothing to
//!   deliver, when its retry time has passed without a new error and a probe list answers.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{Api, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, ObjectRef, Store},
        utils::Backoff,
        watcher::{self, DefaultBackoff, Event},
        WatchStreamExt,
    },
    Client, Config,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{now_ms, resolve::resolve, Discovered, DiscoveryState, KubernetesConfig, Wanted};
use crate::control::{Command, ControlHandle, Faults};

/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// How often health is checked and results re-evaluated without an event.
const TICK: Duration = Duration::from_secs(1);
/// Time after a watcher's due retry before a probe may declare it recovered.
const RETRY_MARGIN: Duration = Duration::from_secs(1);
/// A probe list slower than this counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait between attempts to build a client (bad kubeconfig, no in-cluster credentials).
const CLIENT_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// The frontend Service itself (field selector `metadata.name`).
    Service,
    /// The EndpointSlices of a backend Service (label selector `kubernetes.io/service-name`).
    Slices,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WatchKey {
    kind: Kind,
    namespace: String,
    name: String,
}

impl WatchKey {
    fn describe(&self) -> String {
        match self.kind {
            Kind::Service => format!("Service {}/{}", self.namespace, self.name),
            Kind::Slices => format!("EndpointSlices of {}/{}", self.namespace, self.name),
        }
    }

    fn list_params(&self) -> ListParams {
        match self.kind {
            Kind::Service => ListParams::default().fields(&format!("metadata.name={}", self.name)),
            Kind::Slices => ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", self.name)),
        }
    }

    fn watcher_config(&self) -> watcher::Config {
        match self.kind {
            Kind::Service => watcher::Config::default().fields(&format!("metadata.name={}", self.name)),
            Kind::Slices => watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", self.name)),
        }
    }
}

/// The watches a service needs: its frontend Service and the slices of its backend Services.
fn keys_of(reference: &KubernetesConfig) -> Vec<WatchKey> {
    let key = |kind, name: &str| WatchKey { kind, namespace: reference.namespace.clone(), name: name.to_string() };
    let mut keys = vec![key(Kind::Service, &reference.frontend), key(Kind::Slices, &reference.stable)];
    if let Some(canary) = &reference.canary {
        keys.push(key(Kind::Slices, canary));
    }
    keys
}

/// What is known of one watch's connection to the API server.
#[derive(Debug, Default)]
struct Health {
    /// The first list has completed: the reflector holds the objects.
    synced: bool,
    /// Unix ms of the first failure since the watch last worked.
    failing_since_ms: Option<u64>,
    last_error: Option<String>,
    /// When the watcher will try again after its last error (set by `ObservedBackoff`).
    retry_due: Option<Instant>,
    /// Errors so far: a probe only counts if none came while it ran.
    errors: u64,
    probing: bool,
}

impl Health {
    fn failed(&mut self, error: String) {
        self.failing_since_ms.get_or_insert_with(now_ms);
        self.last_error = Some(error);
        self.errors += 1;
    }

    fn recovered(&mut self) {
        self.failing_since_ms = None;
        self.last_error = None;
    }
}

fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(PoisonError::into_inner)
}

/// kube-rs' default watcher backoff, recording when the next retry is due: after that time
/// without a new error, the retry has not failed.
struct ObservedBackoff {
    inner: DefaultBackoff,
    health: Arc<Mutex<Health>>,
}

impl Iterator for ObservedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.inner.next();
        lock(&self.health).retry_due = delay.map(|d| Instant::now() + d);
        delay
    }
}

impl Backoff for ObservedBackoff {
    fn reset(&mut self) {
        self.inner.reset();
    }
}

enum Objects {
    Service(Store<Service>),
    Slices(Store<EndpointSlice>),
}

struct Watch {
    objects: Objects,
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_watch(client: &Client, key: &WatchKey, changed: &mpsc::UnboundedSender<WatchKey>) -> Watch {
    let health = Arc::new(Mutex::new(Health::default()));
    let (objects, task) = match key.kind {
        Kind::Service => {
            let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
            let (store, writer) = reflector::store();
            let stream = watcher::watcher(api, key.watcher_config())
                .backoff(ObservedBackoff { inner: DefaultBackoff::default(), health: health.clone() })
                .reflect(writer);
            (Objects::Service(store), tokio::spawn(drive(stream, key.clone(), health.clone(), changed.clone())))
        }
        Kind::Slices => {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &key.namespace);
            let (store, writer) = reflector::store();
            let stream = watcher::watcher(api, key.watcher_config())
                .backoff(ObservedBackoff { inner: DefaultBackoff::default(), health: health.clone() })
                .reflect(writer);
            (Objects::Slices(store), tokio::spawn(drive(stream, key.clone(), health.clone(), changed.clone())))
        }
    };
    Watch { objects, health, task }
}

/// Runs one watch: the reflector has applied each event by the time it comes out here; this
/// only keeps the health and tells the loop which watch changed.
async fn drive<K>(
    stream: impl Stream<Item = watcher::Result<Event<K>>>,
    key: WatchKey,
    health: Arc<Mutex<Health>>,
    changed: mpsc::UnboundedSender<WatchKey>,
) {
    futures_util::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        let notify = {
            let mut health = lock(&health);
            match item {
                // A (re)list in progress: the reflector still serves the previous contents and
                // swaps the new ones in at InitDone.
                Ok(Event::Init | Event::InitApply(_)) => false,
                Ok(Event::InitDone) => {
                    health.synced = true;
                    health.recovered();
                    true
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => {
                    health.recovered();
                    true
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    log::info!("{}: resourceVersion expired (410 Gone), relisting", key.describe());
                    false
                }
                Err(err) => {
                    let first = health.failing_since_ms.is_none();
                    let text = error_chain(&err);
                    if first {
                        log::warn!("{}: {text}; keeping the last state and retrying", key.describe());
                    }
                    health.failed(text);
                    first
                }
            }
        };
        if notify && changed.send(key.clone()).is_err() {
            return;
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Probes a failing watch whose retry is overdue without a new error: if the API server answers
/// a list with the same selector, the watcher's retry worked and the watch is current again.
fn maybe_probe(client: &Client, key: &WatchKey, watch: &Watch, changed: &mpsc::UnboundedSender<WatchKey>) {
    let errors_before = {
        let mut health = lock(&watch.health);
        let overdue = health.retry_due.is_some_and(|due| Instant::now() > due + RETRY_MARGIN);
        if health.failing_since_ms.is_none() || health.probing || !overdue {
            return;
        }
        health.probing = true;
        health.errors
    };
    let (client, key, health, changed) = (client.clone(), key.clone(), watch.health.clone(), changed.clone());
    tokio::spawn(async move {
        let params = key.list_params().limit(1);
        let answered = match key.kind {
            Kind::Service => {
                let api: Api<Service> = Api::namespaced(client, &key.namespace);
                tokio::time::timeout(PROBE_TIMEOUT, api.list_metadata(&params)).await.is_ok_and(|r| r.is_ok())
            }
            Kind::Slices => {
                let api: Api<EndpointSlice> = Api::namespaced(client, &key.namespace);
                tokio::time::timeout(PROBE_TIMEOUT, api.list_metadata(&params)).await.is_ok_and(|r| r.is_ok())
            }
        };
        let mut health = lock(&health);
        health.probing = false;
        if answered && health.errors == errors_before && health.failing_since_ms.is_some() {
            log::info!("{}: the API server answers again and the watch resumed", key.describe());
            health.recovered();
            drop(health);
            let _ = changed.send(key);
        }
    });
}

/// The result for one service from what the watches hold now.
fn evaluate(
    reference: &KubernetesConfig,
    client_error: Option<&str>,
    watches: &HashMap<WatchKey, Watch>,
) -> Discovered {
    let waiting = |message: String| Discovered {
        reference: reference.clone(),
        state: DiscoveryState::Waiting,
        message: Some(message),
        stale_since_ms: None,
        groups: Vec::new(),
        listed: false,
    };
    let keys = keys_of(reference);
    let mut stale_since_ms: Option<u64> = None;
    let mut stale_why = Vec::new();
    for key in &keys {
        let Some(watch) = watches.get(key) else {
            return waiting(match client_error {
                Some(err) => format!("no Kubernetes API client: {err}"),
                None => "connecting to the Kubernetes API server".to_string(),
            });
        };
        let health = lock(&watch.health);
        if !health.synced {
            return waiting(match &health.last_error {
                Some(err) => format!("cannot list {} from the Kubernetes API server: {err}", key.describe()),
                None => format!("listing {} from the Kubernetes API server", key.describe()),
            });
        }
        if let Some(since) = health.failing_since_ms {
            stale_since_ms = Some(stale_since_ms.map_or(since, |s| s.min(since)));
            stale_why.push(format!("{}: {}", key.describe(), health.last_error.as_deref().unwrap_or("failing")));
        }
    }
    let service = match &watches[&keys[0]].objects {
        Objects::Service(store) => store.get(&ObjectRef::new(&reference.frontend).within(&reference.namespace)),
        Objects::Slices(_) => None,
    };
    let slices = |key: Option<&WatchKey>| match key.map(|k| &watches[k].objects) {
        Some(Objects::Slices(store)) => store.state(),
        _ => Vec::new(),
    };
    let stable = slices(keys.get(1));
    let canary = slices(keys.get(2));
    let stable_refs: Vec<&EndpointSlice> = stable.iter().map(|s| s.as_ref()).collect();
    let canary_refs: Vec<&EndpointSlice> = canary.iter().map(|s| s.as_ref()).collect();
    let (state, mut messages, groups) = match resolve(reference, service.as_deref(), &stable_refs, &canary_refs) {
        Ok(resolved) => (DiscoveryState::Synced, resolved.notes, resolved.groups),
        Err((state, message)) => (state, vec![message], Vec::new()),
    };
    let state = if stale_since_ms.is_some() {
        messages.insert(
            0,
            format!("the API server does not answer ({}); steering with the last state it gave", stale_why.join("; ")),
        );
        DiscoveryState::Stale
    } else {
        state
    };
    Discovered {
        reference: reference.clone(),
        state,
        message: (!messages.is_empty()).then(|| messages.join("; ")),
        stale_since_ms,
        groups,
        listed: true,
    }
}

/// Why no Kubernetes client could be built (reported in each service's status).
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("no in-cluster service account ({0}); outside a pod set agent.kubeconfig or KUBECONFIG")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds the client: `agent.kubeconfig`, else `KUBECONFIG`, else the in-cluster service account.
async fn make_client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match (kubeconfig, std::env::var_os("KUBECONFIG")) {
        (Some(path), _) => {
            let error = |source| ClientError::Kubeconfig { path: path.to_owned(), source };
            let file = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.map_err(error)?
        }
        (None, Some(env)) => Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .map_err(|source| ClientError::Kubeconfig { path: PathBuf::from(env), source })?,
        (None, None) => Config::incluster()?,
    };
    Ok(Client::try_from(config)?)
}

/// The discovery loop. `wanted` says which services to build (the control core publishes it);
/// `Command::SetDiscovered` is its one way into the core, sent only when a service's result
/// changed. Until some service has a `kubernetes` table it builds no client and opens no
/// connection. Returns when `cancel` is cancelled or the core is gone. `fault`: see [`Faults`].
pub async fn run(
    mut wanted: watch::Receiver<Wanted>,
    kubeconfig: Option<PathBuf>,
    control: ControlHandle,
    cancel: CancellationToken,
    fault: bool,
) {
    let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<WatchKey>();
    let mut client: Option<Client> = None;
    let mut client_error: Option<String> = None;
    let mut next_client_attempt = Instant::now();
    let mut watches: HashMap<WatchKey, Watch> = HashMap::new();
    let mut sent: HashMap<String, Discovered> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if fault {
            panic!("fault injection ({}): task kubernetes-discovery panics", Faults::ENV);
        }
        let services = wanted.borrow_and_update().clone();
        if client.is_none() && !services.is_empty() && Instant::now() >= next_client_attempt {
            match make_client(kubeconfig.as_deref()).await {
                Ok(made) => {
                    log::info!("Kubernetes discovery: client ready for {} services", services.len());
                    client = Some(made);
                    client_error = None;
                }
                Err(err) => {
                    let err = error_chain(&err);
                    if client_error.as_ref() != Some(&err) {
                        log::error!("Kubernetes discovery: {err}; retrying every {}s", CLIENT_RETRY.as_secs());
                    }
                    client_error = Some(err);
                    next_client_attempt = Instant::now() + CLIENT_RETRY;
                }
            }
        }
        if let Some(client) = &client {
            let needed: HashSet<WatchKey> = services.values().flat_map(keys_of).collect();
            watches.retain(|key, _| needed.contains(key));
            for key in needed {
                watches.entry(key.clone()).or_insert_with(|| start_watch(client, &key, &changed_tx));
            }
            for (key, watch) in &watches {
                maybe_probe(client, key, watch, &changed_tx);
            }
        }
        sent.retain(|name, _| services.contains_key(name));
        for (name, reference) in &services {
            let result = evaluate(reference, client_error.as_deref(), &watches);
            if sent.get(name) == Some(&result) {
                continue;
            }
            log_transition(name, sent.get(name), &result);
            let command = Command::SetDiscovered { name: name.clone(), discovered: Box::new(result.clone()) };
            tokio::select! {
                () = cancel.cancelled() => return,
                delivered = control.tell(command) => if delivered.is_err() { return },
            }
            sent.insert(name.clone(), result);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = wanted.changed() => if changed.is_err() { return },
            Some(_) = changed_rx.recv() => {
                // Several watches may have moved at once: one evaluation for all of them.
                while changed_rx.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
        }
    }
}

fn log_transition(name: &str, before: Option<&Discovered>, after: &Discovered) {
    if before.map(|b| (b.state, &b.message)) == Some((after.state, &after.message)) {
        return;
    }
    let counts = |pick: fn(&crate::config::PortGroup) -> usize| after.groups.iter().map(pick).sum::<usize>();
    let summary = format!(
        "{} frontends, {} stable and {} canary endpoints",
        counts(|g| g.frontends.len()),
        counts(|g| g.stable.len()),
        counts(|g| g.canary.len())
    );
    let message = after.message.as_deref().unwrap_or("");
    match after.state {
        DiscoveryState::Synced => log::info!("service {name}: kubernetes synced: {summary} {message}"),
        DiscoveryState::Stale => log::warn!("service {name}: kubernetes stale: {message}"),
        DiscoveryState::Waiting => log::warn!("service {name}: kubernetes waiting: {message}"),
        DiscoveryState::Refused => log::error!("service {name}: kubernetes refused: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_watches_its_three_objects() {
        let reference = KubernetesConfig {
            namespace: "shop".into(),
            frontend: "web".into(),
            stable: "web-stable".into(),
            canary: Some("web-canary".into()),
            ports: vec![],
        };
        let keys = keys_of(&reference);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].list_params().field_selector.as_deref(), Some("metadata.name=web"));
        assert_eq!(keys[1].list_params().label_selector.as_deref(), Some("kubernetes.io/service-name=web-stable"));
        assert_eq!(keys[2].describe(), "EndpointSlices of shop/web-canary");
    }

    #[test]
    fn the_backoff_records_when_the_retry_is_due() {
        let health = Arc::new(Mutex::new(Health::default()));
        let mut backoff = ObservedBackoff { inner: DefaultBackoff::default(), health: health.clone() };
        let delay = backoff.next().expect("the default backoff never gives up");
        assert!(delay >= Duration::from_millis(100), "no hot loop: {delay:?}");
        assert!(lock(&health).retry_due.is_some());
    }
}
