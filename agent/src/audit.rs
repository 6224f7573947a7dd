//! The audit log of accepted changes: what an entry holds, and the append-only file the file
//! store keeps it in (one JSON object per line under `state_dir`).

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::Role;

pub const AUDIT_FILE: &str = "audit.log";

/// One accepted change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// When the change was accepted, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Name of the token that made it (`anonymous` without `[agent.auth]`).
    pub token: String,
    pub role: Role,
    /// HTTP method of the request.
    pub method: String,
    /// Path of the request, e.g. `/v1/services/web/canary`.
    pub route: String,
    /// The service (or rollout state) before the change; null when there was none.
    #[schema(value_type = Object, nullable)]
    pub before: serde_json::Value,
    /// The service (or rollout state) after the change; null when it was removed.
    #[schema(value_type = Object, nullable)]
    pub after: serde_json::Value,
    /// Cluster mode: the node whose API accepted the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl AuditEntry {
    /// An entry stamped now.
    pub fn now(
        token: &str,
        role: Role,
        method: &str,
        route: &str,
        before: serde_json::Value,
        after: serde_json::Value,
    ) -> Self {
        Self {
            time: rfc3339_now(),
            token: token.to_string(),
            role,
            method: method.to_string(),
            route: route.to_string(),
            before,
            after,
            node: None,
        }
    }
}

/// Now as RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// The append-only file. Only the core's thread appends; readers open the file themselves.
pub struct AuditFile {
    path: PathBuf,
    file: File,
}

impl AuditFile {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(AUDIT_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and syncs it. Returns the file's length before the append, so that a
    /// change that fails later can take its entry back with [`AuditFile::truncate_to`].
    pub fn append(&mut self, entry: &AuditEntry) -> std::io::Result<u64> {
        let before = self.file.metadata()?.len();
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if let Err(err) = self.file.write_all(&line).and_then(|()| self.file.sync_data()) {
            // A partial line would hide every later entry from readers that stop at it.
            let _ = self.truncate_to(before);
            return Err(err);
        }
        Ok(before)
    }

    /// Cuts the file back to `len` bytes (undoing appends after it).
    pub fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_data()
    }
}

/// The last `limit` entries of the audit file at `path`, oldest first. Lines that do not parse
/// (written by hand, or cut by a crash) are skipped, not taken as the end.
pub fn tail(path: &Path, limit: usize) -> std::io::Result<Vec<AuditEntry>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut entries = std::collections::VecDeque::with_capacity(limit.min(1024));
    for line in BufReader::new(file).split(b'\n') {
        let Ok(entry) = serde_json::from_slice::<AuditEntry>(&line?) else { continue };
        if entries.len() == limit {
            entries.pop_front();
        }
        if limit > 0 {
            entries.push_back(entry);
        }
    }
    Ok(entries.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
        assert!(t.parse::<jiff::Timestamp>().is_ok(), "{t}");
    }

    #[test]
    fn tail_skips_bad_lines_and_keeps_the_last() {
        let dir = std::env::temp_dir().join(format!("sockshift-audit-test-{}", std::process::id()));
        let mut file = AuditFile::open(&dir).unwrap();
        let entry = |n: u32| {
            AuditEntry::now("t", Role::Release, "PUT", &format!("/v1/services/s{n}"), serde_json::Value::Null, n.into())
        };
        for n in 0..3 {
            file.append(&entry(n)).unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(file.path()).unwrap().write_all(b"{not json\n").unwrap();
        file.append(&entry(3)).unwrap();
        let len = file.append(&entry(9)).unwrap();
        file.truncate_to(len).unwrap(); // entry 9 taken back
        file.append(&entry(4)).unwrap();
        let last = tail(file.path(), 2).unwrap();
        assert_eq!(
            last.iter().map(|e| e.after.clone()).collect::<Vec<_>>(),
            [serde_json::json!(3), serde_json::json!(4)]
        );
        assert_eq!(tail(file.path(), 100).unwrap().len(), 5, "the bad line is skipped, later ones kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
