//! The embedded transactional store (redb) that holds the desired state.
//!
//! One file, `<dir>/netctl.redb`, with the tables `networks` (name → JSON), `sandboxes`
//! (name → JSON), `endpoints` (id → JSON) and `meta` (`schema_version` → 1). Every planned
//! operation is committed in one durable write transaction: all of its changes or none.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{Change, State};

/// The schema this build writes and understands.
pub const SCHEMA_VERSION: u64 = 1;
/// The file inside the state directory.
pub const FILE_NAME: &str = "netctl.redb";

const NETWORKS: TableDefinition<&str, &str> = TableDefinition::new("networks");
const SANDBOXES: TableDefinition<&str, &str> = TableDefinition::new("sandboxes");
const ENDPOINTS: TableDefinition<&str, &str> = TableDefinition::new("endpoints");
const SERVICES: TableDefinition<&str, &str> = TableDefinition::new("services");
/// Address pools handed to Docker by the IPAM plugin, by pool id.
const POOLS: TableDefinition<&str, &str> = TableDefinition::new("pools");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEMA_KEY: &str = "schema_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {dir}: {source}; check its parent's permissions")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path} is already open in another process; stop the other netctl agent first")]
    InUse { path: PathBuf },
    #[error(
        "cannot open store {path}: {source}; if the file is damaged, move it aside \
         (netctl then starts with an empty state)"
    )]
    Open {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error(
        "store {path} has schema version {found}, but this netctl understands only up to \
         {supported}; run a newer netctl, or move the file aside to start empty"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("store {path}: {source}")]
    Db {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error(
        "store {path}: table {table}, key {key:?}: cannot decode the record: {reason}; the \
         file is damaged or was written by an incompatible netctl; move it aside to start empty"
    )]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("store {path}: cannot encode a record: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The store of one node's desired state.
pub struct Store {
    db: Database,
    path: PathBuf,
    /// Test hook: fail a commit after this many changes have been written (usize::MAX: never).
    #[cfg(test)]
    fail_after: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens or creates `<dir>/netctl.redb` (creating dir with mode 0700).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.clone() },
            e => StoreError::Open {
                path: path.clone(),
                source: Box::new(e.into()),
            },
        })?;
        let store = Store {
            db,
            path,
            #[cfg(test)]
            fail_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
        };
        store.init()?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    /// Creates the tables and the schema version, or checks the version of an existing file.
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let found = meta
                .get(SCHEMA_KEY)
                .map_err(|e| self.db_err(e))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .map_err(|e| self.db_err(e))?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::SchemaTooNew {
                        path: self.path.clone(),
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
            }
            for def in [NETWORKS, SANDBOXES, ENDPOINTS, SERVICES, POOLS] {
                txn.open_table(def).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Reads the whole desired state.
    pub fn load(&self) -> Result<State, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let mut state = State::default();
        for (key, n) in self.read_table::<crate::model::Network>(&txn, NETWORKS, "networks")? {
            self.check_key("networks", &key, &n.name)?;
            state.networks.insert(key, n);
        }
        for (key, s) in self.read_table::<crate::model::Sandbox>(&txn, SANDBOXES, "sandboxes")? {
            self.check_key("sandboxes", &key, &s.name)?;
            state.sandboxes.insert(key, s);
        }
        for (key, e) in self.read_table::<crate::model::Endpoint>(&txn, ENDPOINTS, "endpoints")? {
            self.check_key("endpoints", &key, &e.id)?;
            state.endpoints.insert(key, e);
        }
        for (key, sv) in self.read_table::<crate::model::Service>(&txn, SERVICES, "services")? {
            self.check_key("services", &key, &sv.name)?;
            state.services.insert(key, sv);
        }
        for (key, p) in self.read_table::<crate::model::Pool>(&txn, POOLS, "pools")? {
            self.check_key("pools", &key, &p.id)?;
            state.pools.insert(key, p);
        }
        Ok(state)
    }

    fn check_key(&self, table: &'static str, key: &str, inner: &str) -> Result<(), StoreError> {
        if key == inner {
            Ok(())
        } else {
            Err(StoreError::Corrupt {
                path: self.path.clone(),
                table,
                key: key.to_string(),
                reason: format!("the record is named {inner:?}"),
            })
        }
    }

    fn read_table<T: DeserializeOwned>(
        &self,
        txn: &redb::ReadTransaction,
        def: TableDefinition<&str, &str>,
        table: &'static str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = txn.open_table(def).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let key = k.value().to_string();
            let rec = serde_json::from_str(v.value()).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                table,
                key: key.clone(),
                reason: e.to_string(),
            })?;
            out.push((key, rec));
        }
        Ok(out)
    }

    fn encode<T: Serialize>(&self, v: &T) -> Result<String, StoreError> {
        serde_json::to_string(v).map_err(|source| StoreError::Encode {
            path: self.path.clone(),
            source,
        })
    }

    /// Applies all changes in ONE write transaction (durable commit before returning).
    /// On error nothing is written.
    pub fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(redb::Durability::Immediate);
        // An error below drops `txn` uncommitted, which aborts it.
        {
            let mut networks = txn.open_table(NETWORKS).map_err(|e| self.db_err(e))?;
            let mut sandboxes = txn.open_table(SANDBOXES).map_err(|e| self.db_err(e))?;
            let mut endpoints = txn.open_table(ENDPOINTS).map_err(|e| self.db_err(e))?;
            let mut services = txn.open_table(SERVICES).map_err(|e| self.db_err(e))?;
            let mut pools = txn.open_table(POOLS).map_err(|e| self.db_err(e))?;
            for (i, c) in changes.iter().enumerate() {
                #[cfg(test)]
                if i >= self.fail_after.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(StoreError::Db {
                        path: self.path.clone(),
                        source: Box::new(redb::Error::Io(std::io::Error::other(
                            "injected failure",
                        ))),
                    });
                }
                let _ = i;
                match c {
                    Change::PutNetwork(n) => {
                        let v = self.encode(n)?;
                        networks
                            .insert(n.name.as_str(), v.as_str())
                            .map_err(|e| self.db_err(e))?;
                    }
                    Change::DeleteNetwork(name) => {
                        networks.remove(name.as_str()).map_err(|e| self.db_err(e))?;
                    }
                    Change::PutSandbox(s) => {
                        let v = self.encode(s)?;
                        sandboxes
                            .insert(s.name.as_str(), v.as_str())
                            .map_err(|e| self.db_err(e))?;
                    }
                    Change::DeleteSandbox(name) => {
                        sandboxes
                            .remove(name.as_str())
                            .map_err(|e| self.db_err(e))?;
                    }
                    Change::PutEndpoint(e) => {
                        let v = self.encode(e)?;
                        endpoints
                            .insert(e.id.as_str(), v.as_str())
                            .map_err(|e| self.db_err(e))?;
                    }
                    Change::DeleteEndpoint(id) => {
                        endpoints.remove(id.as_str()).map_err(|e| self.db_err(e))?;
                    }
                    Change::PutService(sv) => {
                        let v = self.encode(sv)?;
                        services
                            .insert(sv.name.as_str(), v.as_str())
                            .map_err(|e| self.db_err(e))?;
                    }
                    Change::DeleteService(name) => {
                        services.remove(name.as_str()).map_err(|e| self.db_err(e))?;
                    }
                    Change::PutPool(p) => {
                        let v = self.encode(p)?;
                        pools
                            .insert(p.id.as_str(), v.as_str())
                            .map_err(|e| self.db_err(e))?;
                    }
                    Change::DeletePool(id) => {
                        pools.remove(id.as_str()).map_err(|e| self.db_err(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Connect, CreateNetwork, HostNet};

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("netctl-store-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A state with two networks, two sandboxes and three endpoints, built by planning.
    fn sample(store: &Store) -> State {
        let host = HostNet::default();
        let mut st = State::default();
        let mut plans = Vec::new();
        for (name, subnet) in [("front", Some("10.1.0.0/24")), ("back", None)] {
            let req = CreateNetwork {
                name: name.into(),
                subnet: subnet.map(Into::into),
                aux_addresses: vec!["router=10.1.0.200".into()]
                    .into_iter()
                    .filter(|_| subnet.is_some())
                    .collect(),
                options: vec!["foo=bar".into()],
                ..Default::default()
            };
            let c = st
                .plan_create_network(&req, &host, "2024-01-01T00:00:00Z")
                .unwrap();
            st.apply(&c);
            plans.push(c);
        }
        for sb in ["a", "b"] {
            let c = st
                .plan_create_sandbox(sb, &host, "2024-01-01T00:00:01Z")
                .unwrap();
            st.apply(&c);
            plans.push(c);
        }
        for (net, sb) in [("front", "a"), ("back", "a"), ("front", "b")] {
            let req = Connect {
                network: net.into(),
                sandbox: sb.into(),
                ip: None,
                aliases: vec!["web".into()],
            };
            let c = st.plan_connect(&req).unwrap();
            st.apply(&c);
            plans.push(c);
        }
        for c in &plans {
            store.commit(c).unwrap();
        }
        st
    }

    #[test]
    fn round_trip_across_reopen() {
        let dir = Scratch::new("roundtrip");
        let st = {
            let store = Store::open(&dir.0).unwrap();
            assert_eq!(store.load().unwrap(), State::default());
            sample(&store)
        };
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let store = Store::open(&dir.0).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded, st);
        assert_eq!(loaded.networks.len(), 2);
        assert_eq!(loaded.endpoints.len(), 3);

        // Deletes persist too.
        let mut st = loaded;
        let c = st.plan_remove_sandbox("a").unwrap();
        store.commit(&c).unwrap();
        st.apply(&c);
        drop(store);
        let store = Store::open(&dir.0).unwrap();
        assert_eq!(store.load().unwrap(), st);
        assert_eq!(st.endpoints.len(), 1);
    }

    #[test]
    fn commit_is_atomic() {
        let dir = Scratch::new("atomic");
        let store = Store::open(&dir.0).unwrap();
        let before = sample(&store);
        assert_eq!(store.load().unwrap(), before);

        // Removing sandbox "a" is three changes (two endpoints, the sandbox); fail after two.
        let changes = before.plan_remove_sandbox("a").unwrap();
        assert_eq!(changes.len(), 3);
        store
            .fail_after
            .store(2, std::sync::atomic::Ordering::SeqCst);
        let err = store.commit(&changes).unwrap_err();
        assert!(err.to_string().contains("netctl.redb"), "{err}");
        assert_eq!(
            store.load().unwrap(),
            before,
            "nothing of the failed commit is visible"
        );

        // Still usable, and the same changes commit fully when nothing fails.
        store
            .fail_after
            .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        store.commit(&changes).unwrap();
        let mut after = before.clone();
        after.apply(&changes);
        drop(store);
        let store = Store::open(&dir.0).unwrap();
        assert_eq!(store.load().unwrap(), after);
        assert!(!after.sandboxes.contains_key("a"));
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = Scratch::new("schema");
        drop(Store::open(&dir.0).unwrap());
        {
            let db = Database::create(dir.0.join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(&dir.0).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 2, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("netctl.redb") && msg.contains("schema version 2"),
            "{msg}"
        );
    }

    #[test]
    fn second_open_is_refused_while_in_use() {
        let dir = Scratch::new("inuse");
        let _first = Store::open(&dir.0).unwrap();
        match Store::open(&dir.0) {
            Err(e @ StoreError::InUse { .. }) => {
                assert!(e.to_string().contains("netctl.redb"))
            }
            other => panic!("expected InUse, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_record_names_table_and_key() {
        let dir = Scratch::new("corrupt");
        drop(Store::open(&dir.0).unwrap());
        {
            let db = Database::create(dir.0.join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(NETWORKS)
                .unwrap()
                .insert("n1", "{not json")
                .unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&dir.0).unwrap();
        let msg = store.load().unwrap_err().to_string();
        assert!(msg.contains("networks") && msg.contains("\"n1\""), "{msg}");
    }
}
