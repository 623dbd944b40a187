//! Attack: another local user reads (or the agent's user snoops on) Proxi's data dir.
//!
//! The data dir used to be created 0755 and `audit.db` 0644, so anyone on the
//! machine could read the trail; now the dir is 0700 and every file in it 0600.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Api, ServerProcess};
use reqwest::StatusCode;
use serde_json::json;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn assert_private(data_dir: &Path) {
    assert_eq!(mode(data_dir), 0o700, "the data dir");
    for name in [
        "audit.db",
        "audit.db-wal",
        "audit.db-shm",
        "proxi.lock",
        "server.json",
    ] {
        assert_eq!(mode(&data_dir.join(name)), 0o600, "{name}");
    }
}

#[tokio::test]
async fn a_new_data_dir_and_its_files_are_private() {
    let parent = tempfile::tempdir().unwrap();
    let data_dir = parent.path().join("nested").join("data");
    let server = ServerProcess::start(&data_dir, &[]);
    let (status, body) = Api::new(&server.url)
        .execute("list_services", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_private(&data_dir);
}

#[tokio::test]
async fn files_an_older_version_left_readable_are_made_private() {
    let parent = tempfile::tempdir().unwrap();
    let data_dir = parent.path().join("data");
    drop(ServerProcess::start(&data_dir, &[]));
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let server = ServerProcess::start(&data_dir, &[]);
    let (status, body) = Api::new(&server.url)
        .execute("list_services", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_private(&data_dir);
}
