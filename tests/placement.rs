//! The placement record's file store (`berth controller --nodes FILE`) on a real disk: the
//! store contract, two stores on one directory racing, what a crash mid-write leaves.
//! BerthVolumes keep the same contract on a real API server in tests/kube.rs.

mod common;

use std::sync::Arc;

use berth::placement::{FileStore, PlacementStore};
use common::placement::{contract, no_lost_update, record};

#[tokio::test]
async fn the_file_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&FileStore::open(dir.path()).unwrap()).await;
}

/// Two stores on one directory stand for two controllers on one disk: each holds its own
/// file descriptions, so only the flock orders them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_file_stores_on_one_directory_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn PlacementStore>> = (0..2)
        .map(|_| Arc::new(FileStore::open(dir.path()).unwrap()) as Arc<dyn PlacementStore>)
        .collect();
    no_lost_update(stores, 200).await;
}

#[tokio::test]
async fn a_crash_mid_write_leaves_the_old_record_and_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let r = record("pvc-crash", "node-a");
    let v = store.create(&r).await.unwrap();
    // What a writer killed between its temp file and the rename leaves.
    let temp = dir.path().join(format!(".{}.json.1-1.tmp", r.volume_id));
    std::fs::write(&temp, b"{\"version\":\"half").unwrap();
    let reopened = FileStore::open(dir.path()).unwrap();
    assert!(!temp.exists(), "the crash's temp file is removed at open");
    assert_eq!(reopened.get(&r.id().unwrap()).await.unwrap(), Some(v));
}

#[tokio::test]
async fn a_record_with_a_foreign_id_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let mut r = record("pvc", "node-a");
    r.volume_id = "../../etc/passwd".into();
    let e = store.create(&r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, [".lock"], "only the lock file");
}
