//! Append-only audit log of accepted changes: one JSON object per line under `state_dir`.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

pub const AUDIT_FILE: &str = "audit.log";

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl AuditLog {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(AUDIT_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { path, file: Mutex::new(Some(file)) })
    }

    /// Records one accepted change; written and synced before the API answers.
    pub fn record(&self, who: &str, role: &str, method: &str, route: &str, before: Value, after: Value) {
        let entry = json!({
            "time": rfc3339_now(),
            "token": who,
            "role": role,
            "method": method,
            "route": route,
            "before": before,
            "after": after,
        });
        let mut guard = self.file.lock().expect("audit lock");
        if let Some(file) = guard.as_mut() {
            let line = format!("{entry}\n");
            if let Err(err) = file.write_all(line.as_bytes()).and_then(|_| file.sync_data()) {
                log::error!("writing the audit log {}: {err}", self.path.display());
            }
        }
    }

    /// The last `limit` entries, oldest first.
    pub fn tail(&self, limit: usize) -> std::io::Result<Vec<Value>> {
        let file = File::open(&self.path)?;
        let mut entries: Vec<Value> = BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect();
        let skip = entries.len().saturating_sub(limit);
        Ok(entries.split_off(skip))
    }
}

/// Now as RFC 3339 UTC with milliseconds.
fn rfc3339_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339() {
        let t = super::rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }
}
