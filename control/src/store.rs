//! The embedded store (redb): sandboxes and snapshots survive restarts. The
//! file is created 0600 because it holds injected header values.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use crate::model::{SandboxRecord, SnapshotRecord, WarmRecord};

const SANDBOXES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sandboxes");
const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const WARM: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("warm");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("store: {0}")]
    Db(String),
    /// A record could not be (de)serialised.
    #[error("store record: {0}")]
    Codec(#[from] serde_json::Error),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The store. Every write is its own durable transaction.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (creating if needed) `dir/tollgate.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(db_err)?;
        let path = dir.join("tollgate.redb");
        let db = Database::create(&path).map_err(db_err)?;
        restrict(&path);
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(SANDBOXES).map_err(db_err)?;
        tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.open_table(WARM).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Inserts or replaces a sandbox.
    pub fn put_sandbox(&self, r: &SandboxRecord) -> Result<(), StoreError> {
        self.put(SANDBOXES, &r.id, r)
    }

    /// Removes a sandbox.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.delete(SANDBOXES, id)
    }

    /// A warm sandbox becomes sandbox `r`: one transaction, so a restart
    /// sees either the warm entry or the sandbox, never both or neither.
    pub fn put_sandbox_from_warm(&self, r: &SandboxRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(r)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(SANDBOXES).map_err(db_err)?;
            t.insert(r.id.as_str(), bytes.as_slice()).map_err(db_err)?;
            let mut w = tx.open_table(WARM).map_err(db_err)?;
            w.remove(r.id.as_str()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Records a warm sandbox being built (its resources are released at
    /// the next start if the daemon stops first).
    pub fn put_warm(&self, r: &WarmRecord) -> Result<(), StoreError> {
        self.put(WARM, &r.id, r)
    }

    /// Forgets a released warm sandbox.
    pub fn delete_warm(&self, id: &str) -> Result<(), StoreError> {
        self.delete(WARM, id)
    }

    /// Every warm sandbox.
    pub fn warm(&self) -> Result<Vec<WarmRecord>, StoreError> {
        self.all(WARM)
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.all(SANDBOXES)
    }

    /// Inserts or replaces a snapshot.
    pub fn put_snapshot(&self, r: &SnapshotRecord) -> Result<(), StoreError> {
        self.put(SNAPSHOTS, &r.id, r)
    }

    /// Removes a snapshot.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.delete(SNAPSHOTS, id)
    }

    /// Every snapshot.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.all(SNAPSHOTS)
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(table).map_err(db_err)?;
            t.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    fn delete(&self, table: TableDefinition<'_, &str, &[u8]>, key: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(table).map_err(db_err)?;
            t.remove(key).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }
}

/// Makes a file readable by its owner only.
pub fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot restrict permissions");
    }
}
