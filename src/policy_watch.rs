//! What triggers a policy reload besides `POST /policy/reload`: `SIGHUP`, and with
//! `serve --watch` a change of the policy file.
//!
//! The watcher polls the file's identity (device, inode, size, modification time)
//! rather than subscribing to change events: one `stat` per interval, no extra
//! crate, and an editor that replaces the file by renaming over it is seen like one
//! that writes in place. A change is acted on only once the identity has stayed the
//! same for one more interval (debounce), so a file caught half-written is not
//! loaded; and if it were, the reload would be refused and the old policy kept.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::gateway::{Gateway, ReloadError, ReloadTrigger};
use crate::principal::Principal;

/// How often `serve --watch` looks at the policy file.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: u64,
    modified_seconds: i64,
    modified_nanos: i64,
}

/// The identity of the file at `path` now; `None` while it does not exist or cannot be read.
fn identity(path: &Path) -> Option<FileIdentity> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileIdentity {
        device: metadata.dev(),
        inode: metadata.ino(),
        size: metadata.size(),
        modified_seconds: metadata.mtime(),
        modified_nanos: metadata.mtime_nsec(),
    })
}

/// Reloads on behalf of Proxi itself and logs the outcome (the record is written
/// by the gateway either way).
async fn reload(gateway: &Gateway, trigger: ReloadTrigger) {
    match gateway.reload_policy(&Principal::system(), trigger).await {
        Ok(report) => tracing::info!(
            trigger = trigger.as_str(),
            policy_hash = %report.policy_hash,
            changed = report.changed,
            "policy reloaded"
        ),
        Err(ReloadError::Refused { problems }) => tracing::warn!(
            trigger = trigger.as_str(),
            ?problems,
            "policy reload refused; the old policy stays in force"
        ),
        Err(error) => tracing::warn!(trigger = trigger.as_str(), %error, "policy reload failed"),
    }
}

/// Reloads the policy on every `SIGHUP` until the gateway is dropped. Fails only
/// if the signal handler cannot be installed.
pub fn spawn_sighup_reloader(gateway: &Arc<Gateway>) -> std::io::Result<JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let gateway = Arc::downgrade(gateway);
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            reload(&gateway, ReloadTrigger::Signal).await;
        }
    }))
}

/// Watches `path` every `interval` and reloads once a change has settled; ends
/// when the gateway is dropped.
pub fn spawn_file_watcher(
    gateway: &Arc<Gateway>,
    path: PathBuf,
    interval: Duration,
) -> JoinHandle<()> {
    let gateway: Weak<Gateway> = Arc::downgrade(gateway);
    // Taken now, not when the task first runs: a change made after this returns is seen.
    let mut loaded = identity(&path);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = loaded;
        loop {
            ticks.tick().await;
            let now = identity(&path);
            let settled = now == seen;
            seen = now;
            if !settled || now == loaded || now.is_none() {
                continue;
            }
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            loaded = now;
            reload(&gateway, ReloadTrigger::Watch).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_changes_with_a_rewrite_and_a_rename_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("policy.json");
        assert_eq!(identity(&path), None);
        std::fs::write(&path, "{}").expect("write");
        let first = identity(&path).expect("exists");
        std::fs::write(&path, "{ }").expect("write");
        let second = identity(&path).expect("exists");
        assert_ne!(first, second, "size differs");
        let other = dir.path().join("new.json");
        std::fs::write(&other, "{ }").expect("write");
        std::fs::rename(&other, &path).expect("rename");
        assert_ne!(identity(&path).expect("exists").inode, second.inode);
    }
}
