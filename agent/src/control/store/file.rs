//! The single-node store: `state.json` and `audit.log` under `agent.state_dir`.
//!
//! - A commit writes the whole state to a new temporary file (created exclusively, never
//!   following a link) and writes it out, appends the audit entry, syncs both, gives the
//!   current `state.json` a second name (a hard link: there is always a `state.json`) and renames
//!   the new file over `state.json`. A crash leaves the old state or the new one, never a torn
//!   file; a failure at any step leaves the old state and takes the audit entry back.
//! - Once the change is applied, before the core answers ([`Store::applied`], or at the next
//!   commit), the replaced state moves to `state.json.prev` (replacing the older one, which
//!   deletes a file: the slowest metadata step) and the directory is synced. Neither can refuse
//!   a change any more (the new state is in place), so neither delays the datapath. Writing the
//!   state out before the audit entry lets the filesystem commit both with the entry's sync, so
//!   the state's own sync usually finds nothing left to do. A stop between the rename and the
//!   settling leaves the second name (`.state.json.prev.<pid>.<nanos>.<n>.tmp`); the next
//!   [`FileStore::open`] makes it `state.json.prev`.
//! - A `state.json` that cannot be read as state (corrupt, truncated, a version this agent does
//!   not know) is moved aside to `state.json.corrupt-<time>` and the agent starts from its config
//!   file alone: refusing to start would leave the node without a kill switch. The previous good
//!   state is in `state.json.prev` for an operator to restore by hand (stop the agent, copy it
//!   over `state.json`, start it).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use serde::{Deserialize, Serialize};

use super::{
    AuditSource, BoxFuture, Commit, Expect, Key, Loaded, Revision, Snapshot, Store, StoreError, Value, Versioned,
};
use crate::{
    audit::{AuditEntry, AuditFile},
    config::ServiceConfig,
    rollout::Rollout,
};

/// File name of the state under `agent.state_dir`.
pub const STATE_FILE: &str = "state.json";
/// The state before the last commit.
pub const BACKUP_FILE: &str = "state.json.prev";
/// Start of the name the replaced state has between a commit and its settling.
const BACKUP_LINK_PREFIX: &str = ".state.json.prev.";

/// `<pid>.<nanos>.<n>`: unique to this process and call.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = jiff::Timestamp::now().subsec_nanosecond();
    format!("{}.{nanos}.{n}", std::process::id())
}
const STATE_VERSION: u32 = 2;

/// `state.json` as written (version 2).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    revision: Revision,
    services: BTreeMap<String, Versioned<ServiceConfig>>,
    #[serde(default)]
    rollouts: BTreeMap<String, Versioned<Rollout>>,
    #[serde(default)]
    file_services: BTreeMap<String, ServiceConfig>,
}

/// `state.json` of agents before revisions (version 1): read once, written back as version 2.
#[derive(Debug, Deserialize)]
struct StateFileV1 {
    services: BTreeMap<String, ServiceConfig>,
    #[serde(default)]
    file_services: BTreeMap<String, ServiceConfig>,
    #[serde(default)]
    rollouts: BTreeMap<String, Rollout>,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// Parses `state.json` of any version this agent reads.
fn parse_state(bytes: &[u8]) -> Result<Snapshot, String> {
    let VersionOnly { version } = serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
    match version {
        1 => {
            let old: StateFileV1 = serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
            let at_one = |value| Versioned { revision: 1, value };
            Ok(Snapshot {
                services: old.services.into_iter().map(|(k, v)| (k, at_one(v))).collect(),
                rollouts: old.rollouts.into_iter().map(|(k, v)| (k, Versioned { revision: 1, value: v })).collect(),
                file_services: old.file_services,
                revision: 1,
            })
        }
        STATE_VERSION => {
            let file: StateFile = serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
            Ok(Snapshot {
                services: file.services,
                rollouts: file.rollouts,
                file_services: file.file_services,
                revision: file.revision,
            })
        }
        other => Err(format!("version {other}, this agent reads versions 1 and {STATE_VERSION}")),
    }
}

fn render_state(snapshot: &Snapshot) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec_pretty(&StateFile {
        version: STATE_VERSION,
        revision: snapshot.revision,
        services: snapshot.services.clone(),
        rollouts: snapshot.rollouts.clone(),
        file_services: snapshot.file_services.clone(),
    })
}

pub struct FileStore {
    dir: PathBuf,
    /// What `state.json` holds.
    state: Snapshot,
    audit: AuditFile,
    /// The last commit's work left for [`FileStore::settle`].
    unsettled: Option<Unsettled>,
}

/// A commit whose new `state.json` is in place, with its backup still to move and the
/// directory still to sync.
struct Unsettled {
    /// A second name of the state the commit replaced (none for the first commit).
    backup: Option<PathBuf>,
}

impl FileStore {
    /// Opens (creating) `state_dir` and its audit log. Reading the state is [`Store::load`].
    /// The state files are made readable by root only (they hold every service and webhook
    /// URL); files an older agent left 0644 are tightened.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(state_dir)?;
        for name in [STATE_FILE, BACKUP_FILE] {
            match fs::set_permissions(state_dir.join(name), fs::Permissions::from_mode(0o600)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        let audit = AuditFile::open(state_dir)?;
        let store = Self { dir: state_dir.to_owned(), state: Snapshot::default(), audit, unsettled: None };
        store.take_up_backup_links()?;
        Ok(store)
    }

    /// Rotates `audit.log` by size (`agent.audit_max_bytes`, `agent.audit_keep`).
    pub fn with_audit_rotation(mut self, rotation: crate::config::AuditRotation) -> Self {
        self.audit.set_rotation(rotation);
        self
    }

    fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn persist_err(&self, source: std::io::Error) -> StoreError {
        StoreError::Persist { path: self.path(), source }
    }

    /// Moves an unreadable `state.json` aside; the name says when.
    fn move_aside(&self, why: &str) -> Result<String, StoreError> {
        let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        let mut aside = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}.{n}"));
            n += 1;
        }
        fs::rename(self.path(), &aside).map_err(|source| self.persist_err(source))?;
        Ok(format!(
            "{} is not usable state ({why}); moved it to {} and started from the config file alone; the state \
             before the last change is in {} (to restore it: stop the agent, copy it over {STATE_FILE}, start it)",
            self.path().display(),
            aside.display(),
            self.dir.join(BACKUP_FILE).display(),
        ))
    }

    /// A fresh temporary file in the state directory, created exclusively and never through a
    /// link, readable by root only.
    fn temporary(&self) -> std::io::Result<(PathBuf, File)> {
        loop {
            let path = self.temporary_name();
            match OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path)
            {
                Ok(file) => return Ok((path, file)),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// A name for a temporary file in the state directory, unique to this process and call.
    fn temporary_name(&self) -> PathBuf {
        self.dir.join(format!(".{STATE_FILE}.{}.tmp", unique_suffix()))
    }

    /// A name for the replaced state's second name until it becomes `state.json.prev`
    /// ([`FileStore::settle`]; one left by a crash is taken up by [`FileStore::open`]).
    fn backup_name(&self) -> PathBuf {
        self.dir.join(format!("{BACKUP_LINK_PREFIX}{}.tmp", unique_suffix()))
    }

    /// A backup link a crash left between a commit and its settling: it holds the state before
    /// the last change, so it becomes `state.json.prev` (the newest, if there were several). A
    /// link to `state.json` itself (the crash came before the rename) is only removed.
    fn take_up_backup_links(&self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let current = match fs::symlink_metadata(self.path()) {
            Ok(meta) => Some((meta.dev(), meta.ino())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        let mut links = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with(BACKUP_LINK_PREFIX) && name.ends_with(".tmp")) {
                continue;
            }
            let meta = fs::symlink_metadata(entry.path())?;
            if !meta.file_type().is_file() {
                continue;
            }
            if current == Some((meta.dev(), meta.ino())) {
                fs::remove_file(entry.path())?;
            } else {
                links.push((meta.modified()?, entry.path()));
            }
        }
        links.sort();
        if let Some((_, newest)) = links.pop() {
            fs::rename(&newest, self.dir.join(BACKUP_FILE))?;
            log::info!(
                "took up {} as {BACKUP_FILE} (left by a stop between a change and its settling)",
                newest.display()
            );
        }
        for (_, older) in links {
            fs::remove_file(older)?;
        }
        Ok(())
    }

    /// Writes `next` as the new `state.json` with `audit` appended to the log: all or nothing.
    fn write(&mut self, next: &Snapshot, audit: Option<&AuditEntry>) -> std::io::Result<()> {
        self.settle();
        let bytes = render_state(next).map_err(std::io::Error::other)?;
        let (tmp, mut file) = self.temporary()?;
        if let Err(err) = file.write_all(&bytes).and_then(|()| write_out(&file)) {
            let _ = fs::remove_file(&tmp);
            return Err(err);
        }
        let audit_len = match audit.map(|entry| self.audit.append_unsynced(entry)).transpose() {
            Ok(len) => len,
            Err(err) => {
                let _ = fs::remove_file(&tmp);
                return Err(err);
            }
        };
        let undo = |store: &mut Self, err: std::io::Error| {
            let _ = fs::remove_file(&tmp);
            if let Some(len) = audit_len {
                if let Err(truncate) = store.audit.truncate_to(len) {
                    log::error!("taking back the audit entry of a failed change: {truncate}");
                }
            }
            err
        };
        let audit_synced = if audit_len.is_some() { self.audit.sync() } else { Ok(()) };
        if let Err(err) = audit_synced.and_then(|()| file.sync_all()) {
            return Err(undo(self, err));
        }
        drop(file);
        let current = self.path();
        // The current state gets a second name, so that the rename below does not drop it; it
        // becomes `state.json.prev` in `settle`. link(2) never replaces an existing name, so a
        // planted file or link there fails it.
        let backup = if current.exists() {
            let link = self.backup_name();
            if let Err(err) = fs::hard_link(&current, &link) {
                return Err(undo(self, err));
            }
            Some(link)
        } else {
            None
        };
        if let Err(err) = fs::rename(&tmp, &current) {
            if let Some(link) = &backup {
                let _ = fs::remove_file(link);
            }
            return Err(undo(self, err));
        }
        self.unsettled = Some(Unsettled { backup });
        Ok(())
    }

    /// Finishes the last commit off the datapath's path: its backup becomes `state.json.prev`
    /// (which removes the older one, the slow part) and the directory is synced. The new state
    /// is in place either way: a failure here only leaves an older `state.json.prev` or weakens
    /// the new state's durability across a power loss; it does not undo the change.
    fn settle(&mut self) {
        let Some(Unsettled { backup }) = self.unsettled.take() else {
            return;
        };
        if let Some(link) = backup {
            if let Err(err) = fs::rename(&link, self.dir.join(BACKUP_FILE)) {
                log::warn!("keeping the previous state as {}: {err}", self.dir.join(BACKUP_FILE).display());
                let _ = fs::remove_file(&link);
            }
        }
        if let Err(err) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            log::warn!("syncing {}: {err}", self.dir.display());
        }
    }
}

/// Writes `file`'s pages to disk and waits for them (`sync_file_range`), without the journal
/// commit a sync makes: the commit that syncs the audit entry then carries the file's block
/// allocation too, and the file's own sync has little left to do. Its error counts: the wait
/// reports a write-back error to this descriptor, and the later sync would not see it again.
/// A filesystem that does not support the call (`EINVAL`, `ESPIPE`, `ENOSYS`) leaves it all to
/// the sync.
fn write_out(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range reads no memory of this process; the descriptor is open.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS) => Ok(()),
        _ => Err(err),
    }
}

impl Drop for FileStore {
    /// A commit the core never reported applied (it stops) still gets its backup and sync.
    fn drop(&mut self) {
        self.settle();
    }
}

impl Store for FileStore {
    async fn load(&mut self) -> Result<Loaded, StoreError> {
        let mut recovered = Vec::new();
        let snapshot = match fs::read(self.path()) {
            Ok(bytes) => match parse_state(&bytes) {
                Ok(snapshot) => snapshot,
                Err(why) => {
                    recovered.push(self.move_aside(&why)?);
                    Snapshot::default()
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(err) => {
                recovered.push(self.move_aside(&format!("reading it: {err}"))?);
                Snapshot::default()
            }
        };
        self.state = snapshot.clone();
        Ok(Loaded { snapshot, recovered })
    }

    async fn commit(&mut self, commit: Commit) -> Result<Revision, StoreError> {
        for write in &commit.writes {
            let found = match &write.key {
                Key::Service(name) => self.state.services.get(name).map(|v| v.revision),
                Key::Rollout(name) => self.state.rollouts.get(name).map(|v| v.revision),
            };
            let matches = match write.expect {
                Expect::Absent => found.is_none(),
                Expect::At(revision) => found == Some(revision),
            };
            if !matches {
                return Err(StoreError::Conflict {
                    key: write.key.clone(),
                    expected: write.expect,
                    found: found.unwrap_or(0),
                    // Only this agent writes the file: nothing to adopt.
                    current: Vec::new(),
                });
            }
        }
        let revision = self.state.revision + 1;
        let mut next = self.state.clone();
        next.revision = revision;
        for write in commit.writes {
            match (write.key, write.value) {
                (Key::Service(name), Value::Service(Some(value))) => {
                    next.services.insert(name, Versioned { revision, value });
                }
                (Key::Service(name), Value::Service(None)) => {
                    next.services.remove(&name);
                }
                (Key::Rollout(name), Value::Rollout(Some(value))) => {
                    next.rollouts.insert(name, Versioned { revision, value: *value });
                }
                (Key::Rollout(name), Value::Rollout(None)) => {
                    next.rollouts.remove(&name);
                }
                (key, value) => {
                    return Err(self.persist_err(std::io::Error::other(format!("{key} cannot hold {value:?}"))));
                }
            }
        }
        if let Some(file_services) = commit.file_services {
            next.file_services = file_services;
        }
        self.write(&next, commit.audit.as_ref()).map_err(|source| self.persist_err(source))?;
        self.state = next;
        Ok(revision)
    }

    async fn applied(&mut self, _snapshot: &Snapshot, _problems: &[String]) -> Result<(), StoreError> {
        self.settle();
        Ok(())
    }

    fn take_changes(&mut self) -> Option<tokio::sync::mpsc::Receiver<super::RemoteChange>> {
        None
    }

    fn audit_source(&self) -> Arc<dyn AuditSource> {
        Arc::new(FileAudit { path: self.audit.path().to_owned() })
    }

    async fn audit_refusal(&mut self, entry: AuditEntry) -> Result<(), StoreError> {
        self.audit.append(&entry).map(|_| ()).map_err(|source| self.persist_err(source))
    }
}

/// Reads `audit.log` off the runtime's workers.
struct FileAudit {
    path: PathBuf,
}

impl AuditSource for FileAudit {
    fn tail(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        let path = self.path.clone();
        Box::pin(async move {
            let read = tokio::task::spawn_blocking({
                let path = path.clone();
                move || crate::audit::tail(&path, limit)
            })
            .await
            .map_err(|join| std::io::Error::other(join.to_string()))
            .and_then(|r| r);
            read.map_err(|source| StoreError::AuditRead { path, source })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Affinity, control::store::Write};

    fn service(name: &str, percent: f64) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            frontends: vec!["127.1.0.1:80".into()],
            stable: vec![],
            canary: vec![],
            canary_percent: percent,
            affinity: Affinity::Connection,
            max_operator_percent: 100.0,
            cohorts: vec![],
            kubernetes: None,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sockshift-filestore-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn put(name: &str, percent: f64, expect: Expect) -> Commit {
        Commit {
            writes: vec![Write {
                key: Key::Service(name.into()),
                expect,
                value: Value::Service(Some(service(name, percent))),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn commits_compare_revisions_and_survive_reopening() {
        let dir = dir("cas");
        let mut store = FileStore::open(&dir).unwrap();
        assert_eq!(block_on(store.load()).unwrap().snapshot, Snapshot::default());
        let r1 = block_on(store.commit(put("a", 5.0, Expect::Absent))).unwrap();
        assert!(matches!(block_on(store.commit(put("a", 6.0, Expect::Absent))), Err(StoreError::Conflict { .. })));
        assert!(matches!(block_on(store.commit(put("a", 6.0, Expect::At(r1 + 7)))), Err(StoreError::Conflict { .. })));
        block_on(store.applied(&store.state.clone(), &[])).unwrap();
        let r2 = block_on(store.commit(put("a", 6.0, Expect::At(r1)))).unwrap();
        assert!(r2 > r1);
        assert_eq!(
            parse_state(&fs::read(dir.join(STATE_FILE)).unwrap()).unwrap().services["a"].value.canary_percent,
            6.0,
            "the new state is in place when the commit returns, before the core applies it"
        );
        block_on(store.applied(&store.state.clone(), &[])).unwrap();
        assert_eq!(temporary_names(&dir), Vec::<String>::new(), "no temporary name is left once applied");
        let mut reopened = FileStore::open(&dir).unwrap();
        let loaded = block_on(reopened.load()).unwrap();
        assert!(loaded.recovered.is_empty());
        assert_eq!(loaded.snapshot.services["a"], Versioned { revision: r2, value: service("a", 6.0) });
        let backup = parse_state(&fs::read(dir.join(BACKUP_FILE)).unwrap()).unwrap();
        assert_eq!(backup.services["a"].value.canary_percent, 5.0, "the backup holds the state before the last change");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What `state.json.prev` holds, by the percent of service `a`.
    fn backup_percent(dir: &Path) -> f64 {
        parse_state(&fs::read(dir.join(BACKUP_FILE)).unwrap()).unwrap().services["a"].value.canary_percent
    }

    fn temporary_names(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect()
    }

    /// The backup moves after the apply (`applied`), or at the next commit, or when the store is
    /// dropped; one left by a crash between the rename and the settling is taken up at the next
    /// start, so `state.json.prev` is always the state before the last change.
    #[test]
    fn the_backup_settles_after_the_apply_and_survives_a_crash_before_it() {
        let dir = dir("settle");
        let mut store = FileStore::open(&dir).unwrap();
        block_on(store.load()).unwrap();
        let r1 = block_on(store.commit(put("a", 1.0, Expect::Absent))).unwrap();
        block_on(store.applied(&store.state.clone(), &[])).unwrap();
        let r2 = block_on(store.commit(put("a", 2.0, Expect::At(r1)))).unwrap();
        assert!(!dir.join(BACKUP_FILE).exists(), "the backup waits for the apply");
        assert_eq!(temporary_names(&dir).len(), 1, "the replaced state has a second name meanwhile");
        // No `applied` after r2 (a datapath refusal's revert path): the next commit settles it.
        let r3 = block_on(store.commit(put("a", 3.0, Expect::At(r2)))).unwrap();
        assert_eq!(backup_percent(&dir), 1.0, "r2's backup (the state at r1) settled at the next commit");
        drop(store);
        assert_eq!(backup_percent(&dir), 2.0, "dropping the store settles r3's backup");
        assert_eq!(temporary_names(&dir), Vec::<String>::new());

        // A crash after the rename, before the settling: the link stays behind.
        let mut store = FileStore::open(&dir).unwrap();
        block_on(store.load()).unwrap();
        block_on(store.commit(put("a", 4.0, Expect::At(r3)))).unwrap();
        std::mem::forget(store);
        assert_eq!(backup_percent(&dir), 2.0);
        assert_eq!(temporary_names(&dir).len(), 1);
        // A crash between the link and the rename: a second name of `state.json` itself.
        fs::hard_link(dir.join(STATE_FILE), dir.join(format!("{BACKUP_LINK_PREFIX}1.2.3.tmp"))).unwrap();
        let mut store = FileStore::open(&dir).unwrap();
        let loaded = block_on(store.load()).unwrap();
        assert_eq!(loaded.snapshot.services["a"].value.canary_percent, 4.0);
        assert_eq!(backup_percent(&dir), 3.0, "the link the crash left is the state before the last change");
        assert_eq!(temporary_names(&dir), Vec::<String>::new(), "the link to state.json itself is removed");
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_state_is_moved_aside_and_a_version_one_state_is_read() {
        let dir = dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), b"{\"version\": 2, \"revision\": 3, \"servi").unwrap();
        let mut store = FileStore::open(&dir).unwrap();
        let loaded = block_on(store.load()).unwrap();
        assert_eq!(loaded.snapshot, Snapshot::default());
        assert!(loaded.recovered[0].contains("corrupt-"), "{:?}", loaded.recovered);
        assert!(!dir.join(STATE_FILE).exists());
        let aside: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("state.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);

        let v1 = serde_json::json!({ "version": 1, "services": { "a": service("a", 7.0) }, "file_services": {} });
        fs::write(dir.join(STATE_FILE), v1.to_string()).unwrap();
        let loaded = block_on(FileStore::open(&dir).unwrap().load()).unwrap();
        assert_eq!(loaded.snapshot.services["a"].value.canary_percent, 7.0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
