//! The audit log of accepted changes and refused requests: what an entry holds, and the
//! append-only file the file store keeps it in (one JSON object per line under `state_dir`),
//! rotated by size (`audit.log.1` is the newest old file, up to `audit.log.<keep>`).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{AuditRotation, Role};

pub const AUDIT_FILE: &str = "audit.log";

/// One accepted change, or one refused request (`refused` set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// When the change was accepted (or the request refused), RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Name of the token that made it (`anonymous` without `[agent.auth]`; empty for a refused
    /// request that presented no valid token).
    pub token: String,
    /// The token's role; null for a refused request without a valid token.
    pub role: Option<Role>,
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
    /// Set on a refused request: why (`no_token`, `unknown_token`, `forbidden`,
    /// `unsupported_media_type`, `host_not_allowed`). At most 10 refusals a second are written;
    /// all are counted in `sockshift_api_denied_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The client's address, on a refused request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Refusals not written since the previous refusal entry (over the rate limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusals_left_out: Option<u64>,
    /// Cluster mode: the node whose API accepted the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl AuditEntry {
    /// An entry stamped now.
    pub fn now(
        token: &str,
        role: impl Into<Option<Role>>,
        method: &str,
        route: &str,
        before: serde_json::Value,
        after: serde_json::Value,
    ) -> Self {
        Self {
            time: rfc3339_now(),
            token: token.to_string(),
            role: role.into(),
            method: method.to_string(),
            route: route.to_string(),
            before,
            after,
            refused: None,
            peer: None,
            refusals_left_out: None,
            node: None,
        }
    }
}

/// Now as RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// The append-only file. Only the core's thread appends; readers open the files themselves.
/// Created 0600: entries hold service definitions and webhook URLs.
pub struct AuditFile {
    path: PathBuf,
    file: File,
    rotation: AuditRotation,
}

/// `audit.log.<n>` next to `path`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)?;
    // A file left by an older agent may be 0644.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

impl AuditFile {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(AUDIT_FILE);
        let file = open_append(&path)?;
        Ok(Self { path, file, rotation: AuditRotation::default() })
    }

    pub fn set_rotation(&mut self, rotation: AuditRotation) {
        self.rotation = rotation;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and syncs it, rotating first when the entry would take the file past
    /// `max_bytes`. Returns the file's length before the append, so that a change that fails
    /// later can take its entry back with [`AuditFile::truncate_to`].
    pub fn append(&mut self, entry: &AuditEntry) -> std::io::Result<u64> {
        let before = self.append_unsynced(entry)?;
        if let Err(err) = self.sync() {
            let _ = self.truncate_to(before);
            return Err(err);
        }
        Ok(before)
    }

    /// [`AuditFile::append`] without the sync: the caller calls [`AuditFile::sync`] (and takes
    /// the entry back with [`AuditFile::truncate_to`] if that fails). The file store writes the
    /// entry and the new state first and syncs them after, so the filesystem can commit both in
    /// one journal transaction.
    pub fn append_unsynced(&mut self, entry: &AuditEntry) -> std::io::Result<u64> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut before = self.file.metadata()?.len();
        if before > 0 && before + line.len() as u64 > self.rotation.max_bytes {
            self.rotate()?;
            before = 0;
        }
        if let Err(err) = self.file.write_all(&line) {
            // A partial line would be skipped by readers, but it is noise: take it back.
            let _ = self.truncate_to(before);
            return Err(err);
        }
        Ok(before)
    }

    /// Syncs what was appended (data and the file's length).
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// `audit.log` becomes `audit.log.1` (older ones shift up, the oldest beyond `keep` goes)
    /// and a new `audit.log` is started.
    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.rotation.keep.max(1);
        match std::fs::remove_file(rotated(&self.path, keep)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        for n in (1..keep).rev() {
            match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        if let Some(dir) = self.path.parent() {
            if let Err(err) = File::open(dir).and_then(|d| d.sync_all()) {
                log::warn!("syncing {} after rotating the audit log: {err}", dir.display());
            }
        }
        log::info!("audit log rotated: {} is now {}", self.path.display(), rotated(&self.path, 1).display());
        Ok(())
    }

    /// Cuts the file back to `len` bytes (undoing appends after it).
    pub fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_data()
    }
}

/// Longest line a reader accepts: an entry holds at most two 64 KiB bodies and some JSON
/// around them; a longer line was not written by the agent and is skipped.
const MAX_LINE_BYTES: usize = 512 * 1024;
/// How much a reader reads at a time, from the end backwards.
const READ_CHUNK: usize = 64 * 1024;

/// The last `limit` entries of the audit log at `path` (continuing into the rotated files
/// when it holds fewer), oldest first. The files are read backwards from their end, so the cost
/// follows `limit`, not the log's size. Lines that do not parse (written by hand, or cut by a
/// crash) are skipped, never taken as the end.
pub fn tail(path: &Path, limit: usize) -> std::io::Result<Vec<AuditEntry>> {
    let mut newest_first = Vec::with_capacity(limit.min(1024));
    let mut n = 0;
    while newest_first.len() < limit {
        let file_path = if n == 0 { path.to_owned() } else { rotated(path, n) };
        let file = match File::open(&file_path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
            Err(err) => return Err(err),
        };
        read_backwards(file, limit, &mut newest_first)?;
        n += 1;
        if n > crate::config::MAX_AUDIT_KEEP {
            break;
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

fn take(line: &[u8], out: &mut Vec<AuditEntry>) {
    if let Ok(entry) = serde_json::from_slice::<AuditEntry>(line) {
        out.push(entry);
    }
}

/// Adds the entries of `file`, last first, to `out` until it holds `limit`.
fn read_backwards(mut file: File, limit: usize, out: &mut Vec<AuditEntry>) -> std::io::Result<()> {
    let mut end = file.seek(SeekFrom::End(0))?;
    // The bytes of the line being assembled, which started before what was read so far.
    let mut partial: Vec<u8> = Vec::new();
    let mut too_long = false;
    let mut chunk = vec![0u8; READ_CHUNK];
    while end > 0 && out.len() < limit {
        let start = end.saturating_sub(READ_CHUNK as u64);
        let len = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..len])?;
        end = start;
        let mut rest = &chunk[..len];
        while let Some(newline) = rest.iter().rposition(|b| *b == b'\n') {
            let tail = &rest[newline + 1..];
            if !too_long && partial.len() + tail.len() <= MAX_LINE_BYTES {
                let mut line = tail.to_vec();
                line.extend_from_slice(&partial);
                take(&line, out);
                if out.len() >= limit {
                    return Ok(());
                }
            }
            partial.clear();
            too_long = false;
            rest = &rest[..newline];
        }
        if !too_long {
            if partial.len() + rest.len() > MAX_LINE_BYTES {
                too_long = true;
                partial.clear();
            } else {
                let mut joined = rest.to_vec();
                joined.extend_from_slice(&partial);
                partial = joined;
            }
        }
    }
    if end == 0 && !too_long && !partial.is_empty() && out.len() < limit {
        take(&partial, out);
    }
    Ok(())
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
        assert_eq!(tail(file.path(), 0).unwrap().len(), 0);
        assert_eq!(
            last.iter().map(|e| e.after.clone()).collect::<Vec<_>>(),
            [serde_json::json!(3), serde_json::json!(4)]
        );
        assert_eq!(tail(file.path(), 100).unwrap().len(), 5, "the bad line is skipped, later ones kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;

    fn entry(n: usize) -> AuditEntry {
        AuditEntry::now("t", Role::Operator, "PUT", &format!("/v1/services/s{n}"), serde_json::Value::Null, n.into())
    }

    #[test]
    fn rotation_keeps_n_files_and_reads_continue_across_them() {
        let dir = std::env::temp_dir().join(format!("sockshift-audit-rotation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut file = AuditFile::open(&dir).unwrap();
        let line = serde_json::to_vec(&entry(100)).unwrap().len() as u64 + 1;
        // Four entries per file.
        file.set_rotation(AuditRotation { max_bytes: line * 4 + 2, keep: 2 });
        for n in 100..120 {
            file.append(&entry(n)).unwrap();
        }
        assert!(dir.join("audit.log.1").exists() && dir.join("audit.log.2").exists());
        assert!(!dir.join("audit.log.3").exists(), "only `keep` rotated files");
        for name in ["audit.log", "audit.log.1", "audit.log.2"] {
            let mode = std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
            assert!(std::fs::metadata(dir.join(name)).unwrap().len() <= line * 4 + 2);
        }
        let all = tail(file.path(), 1000).unwrap();
        let numbers: Vec<u64> = all.iter().map(|e| e.after.as_u64().unwrap()).collect();
        assert_eq!(numbers, (108..120).collect::<Vec<_>>(), "the last 3 files, oldest first");
        let last5: Vec<u64> = tail(file.path(), 5).unwrap().iter().map(|e| e.after.as_u64().unwrap()).collect();
        assert_eq!(last5, [115, 116, 117, 118, 119]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backwards_reads_handle_long_files_bad_lines_and_huge_lines() {
        let dir = std::env::temp_dir().join(format!("sockshift-audit-backwards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut file = AuditFile::open(&dir).unwrap();
        file.set_rotation(AuditRotation { max_bytes: u64::MAX, keep: 1 });
        for n in 0..3000 {
            file.append(&entry(n)).unwrap();
            if n == 2990 {
                let mut raw = OpenOptions::new().append(true).open(file.path()).unwrap();
                raw.write_all(b"not json at all\n").unwrap();
                raw.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).unwrap();
                raw.write_all(b"\n\xff\xfe\n").unwrap();
            }
        }
        let last = tail(file.path(), 20).unwrap();
        let numbers: Vec<u64> = last.iter().map(|e| e.after.as_u64().unwrap()).collect();
        assert_eq!(numbers, (2980..3000).collect::<Vec<_>>(), "bad lines skipped, entries on both sides kept");
        assert_eq!(tail(file.path(), 1000).unwrap().len(), 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
