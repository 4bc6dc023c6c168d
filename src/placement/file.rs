//! [`PlacementStore`] on the controller's disk, for `berth controller --nodes FILE`: one
//! JSON file per volume, written crash-safely (temp file, fsync, rename, fsync directory).
//!
//! Every conditional write holds an exclusive `flock` on the directory's lock file while it
//! compares and writes, so two stores on one directory (two controller processes by
//! mistake, or a restarted one beside its predecessor) still swap exactly. Each write gets a
//! fresh random version, never a counter: a record deleted and made again cannot be mistaken
//! for the one a slow writer read.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Page, PlacementStore, Versioned, VolumePlacement};
use crate::{
    error::{Error, Result},
    storage::VolumeId,
    util::fsutil,
};

/// What each file holds.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: String,
    record: VolumePlacement,
}

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: Arc<PathBuf>,
}

const LOCK: &str = ".lock";

impl FileStore {
    /// Opens (and makes) the store in `dir`, removing what a crash mid-write left there.
    pub fn open(dir: &Path) -> Result<FileStore> {
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        let store = FileStore {
            dir: Arc::new(dir.to_owned()),
        };
        // Writers hold the lock while a temp file exists, so under it every temp is stale.
        store.locked(fsutil::remove_stale_temps)?;
        Ok(store)
    }

    fn path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Runs `f` holding the store's exclusive lock (blocking).
    fn locked<T>(&self, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
        let path = self.dir.join(LOCK);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("open", &path))?;
        let _lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io("flock", &path)(e.into()))?;
        f(&self.dir)
    }

    fn read(&self, id: &VolumeId) -> Result<Option<Versioned>> {
        Ok(
            fsutil::read_json::<Stored>(&self.path(id))?.map(|s| Versioned {
                record: s.record,
                version: s.version,
            }),
        )
    }

    fn write(&self, record: &VolumePlacement) -> Result<Versioned> {
        let stored = Stored {
            version: uuid::Uuid::new_v4().simple().to_string(),
            record: record.clone(),
        };
        fsutil::write_json(&self.path(&record.id()?), &stored)?;
        Ok(Versioned {
            record: stored.record,
            version: stored.version,
        })
    }

    /// Runs blocking file work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(FileStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .expect("placement store task panicked")
    }
}

fn conflict(id: &VolumeId, reason: &str) -> Error {
    Error::Conflict {
        what: format!("placement of {id}"),
        reason: reason.to_string(),
    }
}

#[async_trait]
impl PlacementStore for FileStore {
    async fn get(&self, id: &VolumeId) -> Result<Option<Versioned>> {
        let id = id.clone();
        // Unlocked: a rename replaces a record whole, so a read sees one version or the next.
        self.blocking(move |s| s.read(&id)).await
    }

    async fn create(&self, record: &VolumePlacement) -> Result<Versioned> {
        let record = record.clone();
        self.blocking(move |s| {
            let id = record.id()?;
            s.locked(|_| match s.read(&id)? {
                Some(_) => Err(conflict(&id, "a record of this volume exists")),
                None => s.write(&record),
            })
        })
        .await
    }

    async fn replace(&self, record: &VolumePlacement, version: &str) -> Result<Versioned> {
        let (record, version) = (record.clone(), version.to_string());
        self.blocking(move |s| {
            let id = record.id()?;
            s.locked(|_| match s.read(&id)? {
                Some(cur) if cur.version == version => s.write(&record),
                Some(_) => Err(conflict(&id, "the record changed since it was read")),
                None => Err(conflict(&id, "the record was deleted since it was read")),
            })
        })
        .await
    }

    async fn delete(&self, id: &VolumeId, version: &str) -> Result<()> {
        let (id, version) = (id.clone(), version.to_string());
        self.blocking(move |s| {
            s.locked(|_| match s.read(&id)? {
                Some(cur) if cur.version == version => fsutil::remove_file_durable(&s.path(&id)),
                Some(_) => Err(conflict(&id, "the record changed since it was read")),
                None => Ok(()),
            })
        })
        .await
    }

    async fn list(&self, start: Option<&str>, limit: usize) -> Result<Page> {
        // A token is a volume id this store handed out; anything else is not a place to
        // resume from (ABORTED, as CSI's listings answer a token they did not issue).
        if let Some(t) = start
            && VolumeId::parse(t).is_none()
        {
            return Err(Error::BadToken(t.to_string()));
        }
        let start = start.map(str::to_string);
        let limit = limit.max(1);
        self.blocking(move |s| {
            let mut ids: Vec<VolumeId> = std::fs::read_dir(s.dir.as_path())
                .map_err(Error::io("list", s.dir.as_path()))?
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    VolumeId::parse(name.strip_suffix(".json")?)
                })
                .filter(|id| start.as_deref().is_none_or(|st| id.as_str() > st))
                .collect();
            ids.sort();
            let more = ids.len() > limit;
            ids.truncate(limit);
            let mut records = Vec::with_capacity(ids.len());
            for id in &ids {
                // Deleted between listing and reading: simply not listed.
                records.extend(s.read(id)?);
            }
            let next = more.then(|| ids.last().map(|id| id.to_string())).flatten();
            Ok(Page { records, next })
        })
        .await
    }
}
