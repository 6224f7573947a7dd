//! A Kubernetes API-server double for the discovery tests. No real API server can be installed
//! on the test machines, so the agent's real client code (kube-rs' watcher and reflector) is
//! tested against this instead: it is NOT a live cluster.
//!
//! It speaks the API server's wire protocol for the two resources discovery uses, as the
//! Kubernetes API reference and "API concepts" describe them:
//! - `GET /api/v1/[namespaces/{ns}/]services` and
//!   `GET /apis/discovery.k8s.io/v1/[namespaces/{ns}/]endpointslices`, listing with a
//!   collection `resourceVersion`, `limit`/`continue` paging (with `remainingItemCount`),
//!   `resourceVersion`/`resourceVersionMatch`, `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`) and `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!`);
//! - the same paths with `?watch=1`: a chunked stream of newline-delimited JSON events
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`, resuming after a
//!   `resourceVersion` from its event history, translating label changes into ADDED/DELETED as
//!   the API server does, `allowWatchBookmarks` (a BOOKMARK every `BOOKMARK_EVERY`) and
//!   `timeoutSeconds`;
//! - 410 Gone: a watch from a compacted resourceVersion gets an ERROR event carrying a `Status`
//!   with code 410 (reason `Expired`), and a list with an expired `continue` token or an
//!   `Exact` compacted resourceVersion gets HTTP 410 with that `Status`;
//! - bearer-token authentication (401 `Status` without it), JSON `Status` errors otherwise.
//!
//! Objects are k8s-openapi's types serialized as the API server would (with `apiVersion`,
//! `kind`, `metadata.resourceVersion`, `uid`, `creationTimestamp`).
//!
//! Not covered: other resources and verbs (sockshift only lists and watches these two), TLS
//! (plain HTTP on loopback; in-cluster HTTPS is kube-rs' own tested path), protobuf, streaming
//! lists (`sendInitialEvents`), consistent paging snapshots (later pages are cut from the
//! current state, not the first page's), admission and RBAC (the manifest test checks RBAC).
//!
//! `stop` makes the server disappear (listener closed, every open watch connection cut) and
//! `restart` brings it back on the same port, optionally compacted so that resuming watches get
//! 410 Gone and relist.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use futures_util::stream;
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// How often a watch that asked for bookmarks gets one (the real server: about a minute).
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(1);
/// The bearer token the kubeconfig carries and the double requires.
pub const TOKEN: &str = "kube-double-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn from_object(object: &Value) -> Self {
        match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            other => panic!("the double serves Services and EndpointSlices, not {other:?}"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// One change, as the history keeps it for resuming watches.
#[derive(Debug, Clone)]
struct Change {
    resource_version: u64,
    kind: Kind,
    /// The object before (None: created) and after (None: deleted; the event then carries the
    /// object as it was last, with the deletion's resourceVersion).
    before: Option<Value>,
    after: Option<Value>,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// Oldest resourceVersion a watch may resume after (etcd compaction).
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Arc<Change>>,
    /// When each change was first written to a watch stream.
    sent_at: HashMap<u64, Instant>,
    /// Request paths with their queries, in order.
    requests: Vec<String>,
    /// 410 Gone answers given (events and HTTP).
    gone_sent: u64,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The double: its own runtime per "server life", so `stop` can cut every connection at once.
pub struct KubeDouble {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<tokio::runtime::Runtime>>,
}

impl KubeDouble {
    /// Starts on a free loopback port.
    pub fn start() -> Self {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared { store: Mutex::new(Store::default()), changes });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the double");
        let addr = listener.local_addr().unwrap();
        let double = Self { addr, shared, server: Mutex::new(None) };
        double.serve(listener);
        double
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(listener, router(shared)).await;
        });
        *self.server.lock().unwrap() = Some(runtime);
    }

    /// The server disappears: the listener closes (connections are refused) and every open
    /// connection, watches included, is cut.
    pub fn stop(&self) {
        if let Some(runtime) = self.server.lock().unwrap().take() {
            runtime.shutdown_background();
        }
    }

    /// The server comes back on the same address. With `compact`, every resourceVersion up to
    /// now is compacted, as etcd does over a long outage: resuming watches get 410 Gone.
    pub fn restart(&self, compact: bool) {
        if compact {
            let mut store = self.shared.store();
            store.compacted = store.resource_version;
        }
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&self.addr.into()).expect("rebind the double's address");
        socket.listen(128).unwrap();
        self.serve(socket.into());
    }

    /// A kubeconfig pointing at the double (plain HTTP on loopback, bearer token).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\n\
             users:\n- name: sockshift\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: sockshift\n\
             current-context: double\n",
            self.addr
        );
        std::fs::write(path, text).unwrap();
    }

    /// Creates or replaces an object (a k8s-openapi Service or EndpointSlice); returns the
    /// resourceVersion of the change.
    pub fn apply(&self, object: &impl serde::Serialize) -> u64 {
        let mut object = serde_json::to_value(object).unwrap();
        let kind = Kind::from_object(&object);
        let namespace = object["metadata"]["namespace"].as_str().expect("metadata.namespace").to_string();
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let mut store = self.shared.store();
        store.resource_version += 1;
        let rv = store.resource_version;
        let key = (kind, namespace.clone(), name.clone());
        let before = store.objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = before
            .as_ref()
            .map(|b| b["metadata"]["uid"].clone())
            .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{rv:012}")));
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        store.objects.insert(key, object.clone());
        self.record(&mut store, Change { resource_version: rv, kind, before, after: Some(object) })
    }

    /// Deletes an object; returns the resourceVersion of the deletion.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut store = self.shared.store();
        let before = store
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind:?} {namespace}/{name} to delete"));
        store.resource_version += 1;
        let rv = store.resource_version;
        self.record(&mut store, Change { resource_version: rv, kind, before: Some(before), after: None })
    }

    fn record(&self, store: &mut Store, change: Change) -> u64 {
        let change = Arc::new(change);
        store.history.push(change.clone());
        // No receiver (no watch open, or the server is down) is fine: history has it.
        let _ = self.shared.changes.send(change.clone());
        change.resource_version
    }

    /// When the change with this resourceVersion was first written to a watch stream.
    pub fn sent_at(&self, resource_version: u64) -> Option<Instant> {
        self.shared.store().sent_at.get(&resource_version).copied()
    }

    /// Request paths and queries received so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store().requests.clone()
    }

    /// 410 Gone answers given so far.
    pub fn gone_sent(&self) -> u64 {
        self.shared.store().gone_sent
    }
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// Which collection a path names.
fn collection(path: &str) -> Option<(Kind, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "services"] => Some((Kind::Service, None)),
        ["api", "v1", "namespaces", ns, "services"] => Some((Kind::Service, Some(ns.to_string()))),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => Some((Kind::EndpointSlice, None)),
        ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => {
            Some((Kind::EndpointSlice, Some(ns.to_string())))
        }
        _ => None,
    }
}

/// A `Status` object, as the API server answers errors.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response {
    let status_code = StatusCode::from_u16(code).unwrap();
    (status_code, [(header::CONTENT_TYPE, "application/json")], status(code, reason, message).to_string())
        .into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    shared.store().requests.push(uri.to_string());
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if bearer != Some(&format!("Bearer {TOKEN}")) {
        return status_response(401, "Unauthorized", "Unauthorized");
    }
    let Some((kind, namespace)) = collection(uri.path()) else {
        return status_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({})", uri.path()),
        );
    };
    let selector = match Selector::parse(&query) {
        Ok(selector) => selector,
        Err(message) => return status_response(400, "BadRequest", &message),
    };
    let filter = Filter { kind, namespace, selector };
    if matches!(query.get("watch").map(String::as_str), Some("1" | "true")) {
        if query.get("sendInitialEvents").is_some_and(|v| v == "true") {
            return status_response(400, "BadRequest", "the double does not implement streaming lists");
        }
        watch(shared, filter, &query)
    } else {
        list(&shared, &filter, &query)
    }
}

fn list(shared: &Shared, filter: &Filter, query: &HashMap<String, String>) -> Response {
    let mut store = shared.store();
    if query.get("resourceVersionMatch").is_some_and(|m| m == "Exact") {
        let rv: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        if rv < store.compacted {
            store.gone_sent += 1;
            return status_response(410, "Expired", &format!("too old resource version: {rv} ({})", store.compacted));
        }
    }
    let items: Vec<&Value> =
        store.objects.iter().filter(|(k, v)| k.0 == filter.kind && filter.matches(v)).map(|(_, v)| v).collect();
    let (list_rv, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (store.resource_version, 0),
        Some(token) => {
            let parsed =
                token.split_once('.').and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            match parsed {
                Some((rv, offset)) if rv >= store.compacted => (rv, offset),
                Some(_) => {
                    store.gone_sent += 1;
                    return status_response(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    );
                }
                None => return status_response(400, "BadRequest", "invalid continue token"),
            }
        }
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let page: Vec<Value> = items.iter().skip(offset).take(limit).map(|v| (*v).clone()).collect();
    let next = offset + page.len();
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if next < items.len() {
        metadata["continue"] = json!(format!("{list_rv}.{next}"));
        metadata["remainingItemCount"] = json!(items.len() - next);
    }
    let body = json!({
        "kind": format!("{}List", filter.kind.name()),
        "apiVersion": filter.kind.api_version(),
        "metadata": metadata,
        "items": page,
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// One event line of a watch stream.
fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// What a watch has left to send.
struct WatchState {
    shared: Arc<Shared>,
    filter: Filter,
    /// Events ready to go, with the resourceVersion whose send time they mark.
    queue: std::collections::VecDeque<(Bytes, Option<u64>)>,
    live: broadcast::Receiver<Arc<Change>>,
    /// Changes up to this one are already queued.
    seen: u64,
    bookmarks: bool,
    next_bookmark: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

fn watch(shared: Arc<Shared>, filter: Filter, query: &HashMap<String, String>) -> Response {
    let mut queue = std::collections::VecDeque::new();
    let (live, seen) = {
        let mut store = shared.store();
        // Subscribed under the lock that orders changes: nothing falls between history and live.
        let live = shared.changes.subscribe();
        let rv = query.get("resourceVersion").filter(|v| !v.is_empty() && v.as_str() != "0");
        match rv.map(|v| v.parse::<u64>()) {
            None => {
                // "Start at most recent": synthetic ADDED events for what exists now.
                for (key, object) in &store.objects {
                    if key.0 == filter.kind && filter.matches(object) {
                        queue.push_back((event_line("ADDED", object), None));
                    }
                }
                (live, store.resource_version)
            }
            Some(Err(_)) => return status_response(400, "BadRequest", "invalid resourceVersion"),
            Some(Ok(rv)) if rv < store.compacted => {
                store.gone_sent += 1;
                let gone = status(410, "Expired", &format!("too old resource version: {rv} ({})", store.compacted));
                queue.push_back((event_line("ERROR", &gone), None));
                let body = Body::from_stream(stream::iter(queue.into_iter().map(|(b, _)| Ok::<_, Infallible>(b))));
                return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
            Some(Ok(rv)) => {
                for change in store.history.iter().filter(|c| c.resource_version > rv) {
                    if let Some(event) = filter.event_for(change) {
                        queue.push_back(event);
                    }
                }
                (live, store.resource_version)
            }
        }
    };
    let now = tokio::time::Instant::now();
    let state = WatchState {
        shared,
        filter,
        queue,
        live,
        seen,
        bookmarks: query.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
        next_bookmark: now + BOOKMARK_EVERY,
        deadline: query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(|s| now + Duration::from_secs(s)),
        done: false,
    };
    let events = stream::unfold(state, |mut state| async move {
        loop {
            if let Some((line, rv)) = state.queue.pop_front() {
                if let Some(rv) = rv {
                    state.shared.store().sent_at.entry(rv).or_insert_with(Instant::now);
                }
                return Some((Ok::<_, Infallible>(line), state));
            }
            if state.done {
                return None;
            }
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            let bookmark_at = if state.bookmarks { state.next_bookmark } else { far };
            let deadline = state.deadline.unwrap_or(far);
            tokio::select! {
                change = state.live.recv() => match change {
                    Ok(change) if change.resource_version > state.seen => {
                        state.seen = change.resource_version;
                        if let Some(event) = state.filter.event_for(&change) {
                            state.queue.push_back(event);
                        }
                    }
                    Ok(_) => {}
                    // Fell behind or closed: a real server ends the watch; the client resumes.
                    Err(_) => state.done = true,
                },
                _ = tokio::time::sleep_until(bookmark_at) => {
                    state.next_bookmark = tokio::time::Instant::now() + BOOKMARK_EVERY;
                    let rv = state.shared.store().resource_version;
                    let bookmark = json!({
                        "kind": state.filter.kind.name(),
                        "apiVersion": state.filter.kind.api_version(),
                        "metadata": { "resourceVersion": rv.to_string() },
                    });
                    state.queue.push_back((event_line("BOOKMARK", &bookmark), None));
                }
                _ = tokio::time::sleep_until(deadline) => state.done = true,
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(events)).into_response()
}

/// A watch's or list's scope.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    selector: Selector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace {
            if meta["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        self.selector.matches(object)
    }

    /// The event a change is for this watch, as the API server derives it: an object that
    /// starts matching the selectors is ADDED, one that stops matching is DELETED.
    fn event_for(&self, change: &Change) -> Option<(Bytes, Option<u64>)> {
        if change.kind != self.kind {
            return None;
        }
        let was = change.before.as_ref().is_some_and(|o| self.matches(o));
        let is = change.after.as_ref().is_some_and(|o| self.matches(o));
        let rv = change.resource_version;
        let (kind, object) = match (was, is) {
            (false, true) => ("ADDED", change.after.clone()?),
            (true, true) => ("MODIFIED", change.after.clone()?),
            (true, false) => {
                let mut last = change.after.clone().or_else(|| change.before.clone())?;
                last["metadata"]["resourceVersion"] = json!(rv.to_string());
                ("DELETED", last)
            }
            (false, false) => return None,
        };
        Some((event_line(kind, &object), Some(rv)))
    }
}

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Field and label selectors.
#[derive(Debug, Default)]
struct Selector {
    fields: Vec<(String, bool, String)>,
    labels: Vec<Requirement>,
}

impl Selector {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let mut selector = Selector::default();
        for term in query.get("fieldSelector").map(|s| s.split(',')).into_iter().flatten().filter(|t| !t.is_empty()) {
            let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if key != "metadata.name" && key != "metadata.namespace" {
                return Err(format!("field label not supported: {key}"));
            }
            selector.fields.push((key.to_string(), equal, value.to_string()));
        }
        if let Some(text) = query.get("labelSelector") {
            for term in split_terms(text) {
                selector.labels.push(parse_requirement(term.trim())?);
            }
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let fields_ok = self.fields.iter().all(|(key, equal, value)| {
            let actual = match key.as_str() {
                "metadata.name" => meta["name"].as_str(),
                _ => meta["namespace"].as_str(),
            };
            (actual == Some(value.as_str())) == *equal
        });
        let label = |key: &str| meta["labels"][key].as_str();
        fields_ok
            && self.labels.iter().all(|r| match r {
                Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
                Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
                Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                Requirement::Exists(k) => label(k).is_some(),
                Requirement::NotExists(k) => label(k).is_none(),
            })
    }
}

/// Splits a label selector on the commas outside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms.into_iter().filter(|t| !t.trim().is_empty()).collect()
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or(format!("invalid set in {term:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(Requirement::NotIn(k.trim().into(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(Requirement::In(k.trim().into(), set(rest)?));
    }
    if term.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
        return Ok(Requirement::Exists(term.to_string()));
    }
    Err(format!("unable to parse requirement: {term:?}"))
}

/// A ClusterIP Service as the API server stores it (`spec.clusterIP`, `clusterIPs`,
/// `ipFamilies`, `ipFamilyPolicy`, ports with protocol and targetPort). `ports` are
/// (name, port, targetPort); a targetPort that parses as a number is a number, else a name.
/// `cluster_ips` of `["None"]` makes it headless.
pub fn service(namespace: &str, name: &str, cluster_ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
    let families: Vec<String> = cluster_ips
        .iter()
        .filter(|ip| **ip != "None")
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" }.to_string())
        .collect();
    Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: cluster_ips.first().map(|ip| ip.to_string()),
            cluster_ips: Some(cluster_ips.iter().map(|ip| ip.to_string()).collect()),
            ip_family_policy: Some(if families.len() > 1 { "RequireDualStack" } else { "SingleStack" }.into()),
            ip_families: Some(families),
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port, target)| ServicePort {
                        name: (!port_name.is_empty()).then(|| port_name.to_string()),
                        port: *port,
                        protocol: Some("TCP".into()),
                        target_port: Some(match target.parse::<i32>() {
                            Ok(number) => IntOrString::Int(number),
                            Err(_) => IntOrString::String(target.to_string()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            session_affinity: Some("None".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An endpoint of a slice: its address and readiness (a not-ready endpoint may be terminating).
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    pub address: &'a str,
    pub ready: bool,
    pub terminating: bool,
}

impl<'a> Pod<'a> {
    pub fn ready(address: &'a str) -> Self {
        Self { address, ready: true, terminating: false }
    }
    pub fn not_ready(address: &'a str) -> Self {
        Self { address, ready: false, terminating: false }
    }
    pub fn terminating(address: &'a str) -> Self {
        Self { address, ready: false, terminating: true }
    }
}

/// An EndpointSlice as the EndpointSlice controller writes it for `service`: labelled
/// `kubernetes.io/service-name` and managed-by, one address family, conditions
/// ready/serving/terminating, ports named after the Service's ports with resolved numbers.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    family: &str,
    ports: &[(&str, i32)],
    pods: &[Pod<'_>],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".to_string(), service.to_string()),
                ("endpointslice.kubernetes.io/managed-by".to_string(), "endpointslice-controller.k8s.io".to_string()),
            ])),
            ..Default::default()
        },
        address_type: family.into(),
        ports: Some(
            ports
                .iter()
                .map(|(port_name, port)| EndpointPort {
                    name: Some(port_name.to_string()),
                    port: Some(*port),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        endpoints: pods
            .iter()
            .map(|pod| Endpoint {
                addresses: vec![pod.address.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(pod.ready),
                    serving: Some(pod.ready || pod.terminating),
                    terminating: Some(pod.terminating),
                }),
                node_name: Some("node-1".into()),
                ..Default::default()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_parse_and_match_like_the_api_server() {
        let slice = serde_json::to_value(endpoint_slice("shop", "web-abc", "web", "IPv4", &[], &[])).unwrap();
        let matches = |pairs: &[(&str, &str)]| Selector::parse(&query(pairs)).unwrap().matches(&slice);
        assert!(matches(&[("labelSelector", "kubernetes.io/service-name=web")]));
        assert!(matches(&[("labelSelector", "kubernetes.io/service-name in (api, web)")]));
        assert!(!matches(&[("labelSelector", "kubernetes.io/service-name notin (web)")]));
        assert!(matches(&[("labelSelector", "kubernetes.io/service-name,!missing")]));
        assert!(!matches(&[("labelSelector", "kubernetes.io/service-name!=web")]));
        assert!(matches(&[("fieldSelector", "metadata.name=web-abc,metadata.namespace==shop")]));
        assert!(!matches(&[("fieldSelector", "metadata.name!=web-abc")]));
        assert!(Selector::parse(&query(&[("fieldSelector", "spec.clusterIP=1.2.3.4")])).is_err());
    }

    #[test]
    fn objects_carry_the_api_shape() {
        let svc =
            serde_json::to_value(service("shop", "web", &["10.96.0.10", "fd00::10"], &[("http", 80, "http")])).unwrap();
        assert_eq!(svc["apiVersion"], "v1");
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["spec"]["clusterIPs"], json!(["10.96.0.10", "fd00::10"]));
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
        let slice = serde_json::to_value(endpoint_slice(
            "shop",
            "s",
            "web",
            "IPv4",
            &[("http", 8080)],
            &[Pod::terminating("10.0.0.1")],
        ))
        .unwrap();
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(slice["endpoints"][0]["conditions"], json!({"ready": false, "serving": true, "terminating": true}));
    }
}
