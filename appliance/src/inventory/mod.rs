//! The inventory: Servers and their configuration blobs in an embedded redb store.
//!
//! redb commits are copy-on-write with checksummed commit slots and fsync before a commit
//! returns, so a write that was acknowledged survives `kill -9` or a power cut, and a torn
//! write can never be read back. Records are JSON (small, debuggable, forward-compatible
//! with `serde(default)`); two indexes map MACs and UUIDs to server ids.
//!
//! Identity: a machine is its SMBIOS UUID *and* its MACs. Some firmware ships every board
//! with the same UUID; a registration whose UUID is known but whose MACs match none of the
//! servers with that UUID becomes a new server `<uuid>-<mac>`, and all of them are flagged
//! `uuid_conflict`.

pub mod model;

use std::path::Path;

use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use crate::bmc::BmcSettings;
use crate::registration::ValidRegistration;
pub use model::{
    Alarm, AlarmKind, AuditEntry, BootRecord, Claim, CloseReason, Grant, InstalledBy, PowerEvent,
    PowerRecord, Provisioning, Refusal, Requester, SecretKind, SecretUse, Server, Window,
    WindowClose, now, now_ms,
};

const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("configs");
/// Sealed BMC passwords by server id (see `bmc::credentials`).
const BMC_SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("bmc_secrets");
const BY_MAC: TableDefinition<&str, &str> = TableDefinition::new("servers_by_mac");
const BY_UUID: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("servers_by_uuid");
/// Each server's window secret, hashed (see `core::identity`), apart from the record the
/// admin API shows.
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("window_grants");
/// The audit log: entries by sequence number, append-only, the oldest pruned.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Facts about the store itself (migrations done).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Set once every configuration blob is sealed.
const CONFIGS_SEALED: &str = "configs_sealed";

/// Inventory failures.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Boxed: redb's error is large and this one travels through every request path.
    #[error("inventory store: {0}")]
    Store(Box<redb::Error>),
    #[error("server {0:?} not found")]
    NotFound(String),
    #[error("record {id:?} is unreadable: {source}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid registration: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
}

impl InventoryError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InventoryError::Store(_) => "store",
            InventoryError::NotFound(_) => "not_found",
            InventoryError::Corrupt { .. } => "corrupt",
            InventoryError::Invalid(_) => "invalid",
            InventoryError::Conflict(_) => "conflict",
        }
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(impl From<$t> for InventoryError {
        fn from(e: $t) -> Self { InventoryError::Store(Box::new(e.into())) }
    })*};
}
store_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, InventoryError>;

/// The embedded store.
pub struct Inventory {
    db: Database,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inventory")
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<Server> {
    serde_json::from_slice(bytes).map_err(|source| InventoryError::Corrupt {
        id: id.to_string(),
        source,
    })
}

fn encode(s: &Server) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

impl Inventory {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::with_tables(Database::create(path)?)
    }

    /// A store in memory only, gone when dropped (tests of the layers above).
    pub fn in_memory() -> Result<Self> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::with_tables(db)
    }

    fn with_tables(db: Database) -> Result<Self> {
        let txn = db.begin_write()?;
        txn.open_table(SERVERS)?;
        txn.open_table(CONFIGS)?;
        txn.open_table(BMC_SECRETS)?;
        txn.open_table(BY_MAC)?;
        txn.open_multimap_table(BY_UUID)?;
        txn.open_table(GRANTS)?;
        txn.open_table(META)?;
        txn.open_table(AUDIT)?;
        txn.commit()?;
        Ok(Inventory { db })
    }

    /// Every server, ordered by id.
    pub fn list(&self) -> Result<Vec<Server>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SERVERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// One server by id.
    pub fn get(&self, id: &str) -> Result<Server> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SERVERS)?;
        let v = t
            .get(id)?
            .ok_or_else(|| InventoryError::NotFound(id.to_string()))?;
        decode(id, v.value())
    }

    /// The server a booting machine is, from what its firmware says: the MAC decides when
    /// it is known (and agrees with the UUID); else a UUID that only one server has.
    pub fn find_for_boot(&self, uuid: Option<&str>, mac: Option<&str>) -> Result<Option<Server>> {
        let txn = self.db.begin_read()?;
        let servers = txn.open_table(SERVERS)?;
        let load = |id: &str| -> Result<Option<Server>> {
            servers.get(id)?.map(|v| decode(id, v.value())).transpose()
        };
        if let Some(mac) = mac {
            let by_mac = txn.open_table(BY_MAC)?;
            let id = by_mac.get(mac)?.map(|g| g.value().to_string());
            if let Some(id) = id
                && let Some(s) = load(&id)?
                && uuid.is_none_or(|u| u == s.uuid)
            {
                return Ok(Some(s));
            }
        }
        if let Some(uuid) = uuid {
            let by_uuid = txn.open_multimap_table(BY_UUID)?;
            let ids: Vec<String> = by_uuid
                .get(uuid)?
                .map(|g| g.map(|g| g.value().to_string()))
                .collect::<std::result::Result<_, _>>()?;
            // With several servers behind one UUID and no matching MAC, guessing would boot
            // the wrong machine's environment: treat it as unknown.
            if let [id] = ids.as_slice() {
                return load(id);
            }
        }
        Ok(None)
    }

    /// Every server registered under `uuid` (more than one only for duplicate UUIDs).
    pub fn with_uuid(&self, uuid: &str) -> Result<Vec<Server>> {
        let txn = self.db.begin_read()?;
        let servers = txn.open_table(SERVERS)?;
        let by_uuid = txn.open_multimap_table(BY_UUID)?;
        let mut out = Vec::new();
        for id in by_uuid.get(uuid)? {
            let id = id?.value().to_string();
            if let Some(v) = servers.get(id.as_str())? {
                out.push(decode(&id, v.value())?);
            }
        }
        Ok(out)
    }

    /// Runs `f` in one write transaction, committed (durably) when it returns `Ok`; an
    /// `Err` leaves the store as it was. The core's identity rules run in here, so a check
    /// and the write it allows can never be split by another request.
    pub fn write<R>(&self, f: impl FnOnce(&Tx<'_>) -> Result<R>) -> Result<R> {
        let txn = self.db.begin_write()?;
        let out = f(&Tx { txn: &txn })?;
        txn.commit()?;
        Ok(out)
    }

    /// The server whose window secret hashes to `sha256`, if any.
    pub fn grant_owner(&self, sha256: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(GRANTS)?;
        for row in t.iter()? {
            let (k, v) = row?;
            if let Ok(g) = serde_json::from_slice::<Grant>(v.value())
                && crate::core::secret_eq(&g.sha256, sha256)
            {
                return Ok(Some(k.value().to_string()));
            }
        }
        Ok(None)
    }

    /// Seals configuration blobs written before configurations were sealed, once: `seal`
    /// turns a server's plain blob into its sealed form.
    pub fn seal_plain_configs(
        &self,
        seal: impl Fn(&str, &[u8]) -> std::result::Result<Vec<u8>, String>,
    ) -> Result<usize> {
        self.write(|t| {
            let mut meta = t.txn.open_table(META)?;
            if meta.get(CONFIGS_SEALED)?.is_some() {
                return Ok(0);
            }
            let mut configs = t.txn.open_table(CONFIGS)?;
            let plain: Vec<(String, Vec<u8>)> = configs
                .iter()?
                .map(|row| row.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
                .collect::<std::result::Result<_, _>>()?;
            for (id, blob) in &plain {
                let sealed = seal(id, blob).map_err(InventoryError::Invalid)?;
                configs.insert(id.as_str(), sealed.as_slice())?;
            }
            meta.insert(CONFIGS_SEALED, &b"1"[..])?;
            Ok(plain.len())
        })
    }

    /// Loads a server in a write transaction, lets `change` edit it (and other tables of
    /// the same transaction), stores it and commits: one atomic, durable step.
    fn edit<F>(&self, id: &str, change: F) -> Result<Server>
    where
        F: FnOnce(&WriteTransaction, &mut Server) -> Result<()>,
    {
        self.write(|t| {
            let mut s = t.require(id)?;
            change(t.txn, &mut s)?;
            t.put(&mut s)?;
            Ok(s)
        })
    }

    /// Applies `change` to a server and stores it, in one transaction.
    pub fn update<F: FnOnce(&mut Server)>(&self, id: &str, change: F) -> Result<Server> {
        self.edit(id, |_, s| {
            change(s);
            Ok(())
        })
    }

    /// Stores (or with `None`, removes) a server's configuration blob.
    pub fn set_config(&self, id: &str, blob: Option<&[u8]>) -> Result<Server> {
        self.edit(id, |txn, s| {
            let mut c = txn.open_table(CONFIGS)?;
            match blob {
                Some(b) => {
                    c.insert(id, b)?;
                }
                None => {
                    c.remove(id)?;
                }
            }
            s.has_config = blob.is_some();
            Ok(())
        })
    }

    /// Claims a server for a machine and stages its configuration, in one transaction:
    /// refused when another machine holds it or it waits for a wipe. The same machine
    /// claiming again only refreshes the configuration (its install progress is kept).
    /// The flag says the claim is new.
    pub fn claim(&self, id: &str, claim: Claim, blob: &[u8]) -> Result<(Server, bool)> {
        let mut fresh = false;
        let s = self.edit(id, |txn, s| {
            let p = &mut s.provisioning;
            match &mut p.claim {
                Some(held) if held.same_holder(&claim.machine, &claim.uid) => {
                    if claim.server_object.is_some() {
                        held.server_object = claim.server_object;
                    }
                }
                Some(held) => {
                    return Err(InventoryError::Conflict(format!(
                        "server {id} is in use by {}",
                        held.machine
                    )));
                }
                None if p.dirty => {
                    return Err(InventoryError::Conflict(format!(
                        "server {id} was used and is not wiped yet"
                    )));
                }
                None => {
                    p.claim = Some(claim);
                    p.dirty = true;
                    p.wipe_requested_at = None;
                    fresh = true;
                }
            }
            txn.open_table(CONFIGS)?.insert(id, blob)?;
            s.has_config = true;
            Ok(())
        })?;
        Ok((s, fresh))
    }

    /// Releases the server from the machine `uid` (or from any machine, with `None`),
    /// dropping its configuration: dirty until wiped when `wipe`, else free at once.
    /// Releasing a server that is not held is a no-op; one held by another is refused.
    pub fn release(&self, id: &str, uid: Option<&str>, wipe: bool) -> Result<(Server, bool)> {
        let mut released = false;
        let s = self.edit(id, |txn, s| {
            let p = &mut s.provisioning;
            match &p.claim {
                None => return Ok(()),
                Some(held) if uid.is_some_and(|u| u != held.uid) => {
                    return Err(InventoryError::Conflict(format!(
                        "server {id} is held by {}, not by the releasing machine",
                        held.machine
                    )));
                }
                Some(_) => {}
            }
            p.claim = None;
            if wipe {
                p.wipe_requested_at = Some(now());
            } else {
                p.dirty = false;
            }
            txn.open_table(CONFIGS)?.remove(id)?;
            s.has_config = false;
            released = true;
            Ok(())
        })?;
        Ok((s, released))
    }

    /// A server's configuration blob.
    pub fn config(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let c = txn.open_table(CONFIGS)?;
        Ok(c.get(id)?.map(|v| v.value().to_vec()))
    }

    /// Sets (or with `None`, removes) a server's own BMC and its sealed password,
    /// together.
    pub fn set_bmc(&self, id: &str, bmc: Option<(BmcSettings, Vec<u8>)>) -> Result<Server> {
        self.edit(id, |txn, s| put_bmc(txn, s, bmc, None))
    }

    /// Lends a server the BMC a MetalMachine claim (`uid`) names, for that claim only.
    /// Refused (conflict) when the server has a BMC of its own at another address; the
    /// same address keeps the server's own settings.
    pub fn lend_bmc(&self, id: &str, uid: &str, bmc: (BmcSettings, Vec<u8>)) -> Result<Server> {
        self.edit(id, |txn, s| {
            if let Some(own) = s.bmc.as_ref().filter(|_| s.bmc_lent_to.is_none()) {
                if own.authority() == bmc.0.authority() {
                    return Ok(());
                }
                return Err(InventoryError::Conflict(format!(
                    "server {id} has its own BMC at {}; a MetalMachine may not redirect it to {}",
                    own.authority(),
                    bmc.0.authority()
                )));
            }
            put_bmc(txn, s, Some(bmc), Some(uid.to_string()))
        })
    }

    /// Forgets the BMC lent to claim `uid`, if it still is.
    pub fn forget_lent_bmc(&self, id: &str, uid: &str) -> Result<Server> {
        self.edit(id, |txn, s| {
            if s.bmc_lent_to.as_deref() != Some(uid) {
                return Ok(());
            }
            put_bmc(txn, s, None, None)
        })
    }

    /// A server and its sealed BMC password, read together (one snapshot, so the
    /// settings and the password always belong to each other).
    pub fn with_bmc_secret(&self, id: &str) -> Result<(Server, Option<Vec<u8>>)> {
        let txn = self.db.begin_read()?;
        let server = {
            let t = txn.open_table(SERVERS)?;
            let v = t
                .get(id)?
                .ok_or_else(|| InventoryError::NotFound(id.to_string()))?;
            decode(id, v.value())?
        };
        let secret = txn
            .open_table(BMC_SECRETS)?
            .get(id)?
            .map(|v| v.value().to_vec());
        Ok((server, secret))
    }

    /// Removes a server, its indexes and its configuration.
    pub fn delete(&self, id: &str) -> Result<Server> {
        let txn = self.db.begin_write()?;
        let server = {
            let mut t = txn.open_table(SERVERS)?;
            let s = match t.remove(id)? {
                Some(v) => decode(id, v.value())?,
                None => return Err(InventoryError::NotFound(id.to_string())),
            };
            txn.open_table(CONFIGS)?.remove(id)?;
            txn.open_table(BMC_SECRETS)?.remove(id)?;
            txn.open_table(GRANTS)?.remove(id)?;
            txn.open_multimap_table(BY_UUID)?
                .remove(s.uuid.as_str(), id)?;
            let mut by_mac = txn.open_table(BY_MAC)?;
            for m in &s.macs {
                let owner = by_mac.get(m.as_str())?.map(|g| g.value().to_string());
                if owner.as_deref() == Some(id) {
                    by_mac.remove(m.as_str())?;
                }
            }
            s
        };
        txn.commit()?;
        Ok(server)
    }

    /// Records a served boot.
    pub fn record_boot(&self, id: &str, record: BootRecord) -> Result<Server> {
        self.update(id, |s| s.push_boot(record))
    }

    /// Appends `entries` to the audit log in one commit, numbering them, then prunes
    /// entries older than `min_at_ms` and the oldest past `max_entries`. The numbers given.
    pub fn append_audit(
        &self,
        entries: &mut [AuditEntry],
        min_at_ms: u64,
        max_entries: u64,
    ) -> Result<std::ops::RangeInclusive<u64>> {
        let txn = self.db.begin_write()?;
        let range = {
            let mut t = txn.open_table(AUDIT)?;
            let mut next = t.last()?.map_or(1, |(k, _)| k.value() + 1);
            let first = next;
            for e in entries.iter_mut() {
                e.seq = next;
                let bytes = serde_json::to_vec(e).unwrap_or_default();
                t.insert(next, bytes.as_slice())?;
                next += 1;
            }
            let mut stale = Vec::new();
            let over = t.len()?.saturating_sub(max_entries);
            for row in t.iter()? {
                let (k, v) = row?;
                let old = serde_json::from_slice::<AuditEntry>(v.value())
                    .map_or(true, |e| e.at_ms < min_at_ms);
                if (stale.len() as u64) < over || old {
                    stale.push(k.value());
                } else {
                    break;
                }
            }
            for k in stale {
                t.remove(k)?;
            }
            first..=next.saturating_sub(1)
        };
        txn.commit()?;
        Ok(range)
    }

    /// Audit entries after `after`, oldest first, at most `limit`.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            out.push(serde_json::from_slice(v.value()).map_err(|source| {
                InventoryError::Corrupt {
                    id: format!("audit {}", k.value()),
                    source,
                }
            })?);
        }
        Ok(out)
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let last = {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(AUDIT)?;
            t.last()?.map_or(0, |(k, _)| k.value())
        };
        self.audit(last.saturating_sub(limit as u64), limit)
    }
}

/// One write transaction, as [`Inventory::write`] lends it.
pub struct Tx<'a> {
    txn: &'a WriteTransaction,
}

/// A server's BMC settings and sealed password, written together (or removed), lent to
/// a claim or the server's own.
fn put_bmc(
    txn: &WriteTransaction,
    s: &mut Server,
    bmc: Option<(BmcSettings, Vec<u8>)>,
    lent_to: Option<String>,
) -> Result<()> {
    let mut t = txn.open_table(BMC_SECRETS)?;
    match bmc {
        Some((settings, sealed)) => {
            t.insert(s.id.as_str(), sealed.as_slice())?;
            s.bmc = Some(settings);
        }
        None => {
            t.remove(s.id.as_str())?;
            s.bmc = None;
        }
    }
    s.bmc_lent_to = lent_to;
    Ok(())
}

/// Where a registration lands among the servers its UUID and MACs name.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The server with this UUID that shares a MAC with the registration.
    pub existing: Option<Server>,
    /// The other servers with this UUID (duplicate-UUID boards).
    pub others: Vec<Server>,
    /// Reported MACs that belong to some other server: (MAC, its server's id).
    pub foreign_macs: Vec<(String, String)>,
}

impl Tx<'_> {
    /// One server by id, if there is one.
    pub fn server(&self, id: &str) -> Result<Option<Server>> {
        let t = self.txn.open_table(SERVERS)?;
        let v = t.get(id)?;
        v.map(|v| decode(id, v.value())).transpose()
    }

    /// One server by id.
    pub fn require(&self, id: &str) -> Result<Server> {
        self.server(id)?
            .ok_or_else(|| InventoryError::NotFound(id.to_string()))
    }

    /// Stores a server (stamping `updated_at`) and indexes its MACs.
    pub fn put(&self, s: &mut Server) -> Result<()> {
        s.updated_at = now();
        self.txn
            .open_table(SERVERS)?
            .insert(s.id.as_str(), encode(s).as_slice())?;
        let mut by_mac = self.txn.open_table(BY_MAC)?;
        for m in &s.macs {
            by_mac.insert(m.as_str(), s.id.as_str())?;
        }
        Ok(())
    }

    /// The secret (its hash) of a server's current window.
    pub fn grant(&self, id: &str) -> Result<Option<Grant>> {
        let t = self.txn.open_table(GRANTS)?;
        let v = t.get(id)?;
        v.map(|v| {
            serde_json::from_slice(v.value()).map_err(|source| InventoryError::Corrupt {
                id: format!("grant of {id}"),
                source,
            })
        })
        .transpose()
    }

    /// Sets (or with `None`, revokes) a server's window secret.
    pub fn set_grant(&self, id: &str, grant: Option<&Grant>) -> Result<()> {
        let mut t = self.txn.open_table(GRANTS)?;
        match grant {
            // Serialising a plain struct to JSON cannot fail.
            Some(g) => {
                t.insert(id, serde_json::to_vec(g).unwrap_or_default().as_slice())?;
            }
            None => {
                t.remove(id)?;
            }
        }
        Ok(())
    }

    /// Every server registered under `uuid`.
    pub fn with_uuid(&self, uuid: &str) -> Result<Vec<Server>> {
        let ids: Vec<String> = self
            .txn
            .open_multimap_table(BY_UUID)?
            .get(uuid)?
            .map(|g| g.map(|g| g.value().to_string()))
            .collect::<std::result::Result<_, _>>()?;
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.server(&id)?);
        }
        Ok(out)
    }

    /// Finds the server a registration speaks of: the one with its UUID sharing a MAC
    /// (or one registered without MACs), and any MAC it reports that another server owns.
    pub fn resolve(&self, reg: &ValidRegistration) -> Result<Resolved> {
        let mut others = self.with_uuid(&reg.uuid)?;
        let existing = others
            .iter()
            .position(|s| s.macs.is_empty() || s.macs.iter().any(|m| reg.macs.contains(m)))
            .map(|i| others.swap_remove(i));
        let by_mac = self.txn.open_table(BY_MAC)?;
        let mut foreign_macs = Vec::new();
        for m in &reg.macs {
            if let Some(owner) = by_mac.get(m.as_str())?.map(|g| g.value().to_string())
                && existing.as_ref().is_none_or(|e| e.id != owner)
                && self.server(&owner)?.is_some()
            {
                foreign_macs.push((m.clone(), owner));
            }
        }
        Ok(Resolved {
            existing,
            others,
            foreign_macs,
        })
    }

    /// Creates the server a registration describes. With `others` (servers already
    /// registered under the same UUID) it is `<uuid>-<mac>`, and all are flagged
    /// `uuid_conflict`.
    /// Servers registered and not accepted.
    pub fn unaccepted(&self) -> Result<usize> {
        let t = self.txn.open_table(SERVERS)?;
        let mut n = 0;
        for row in t.iter()? {
            let (k, v) = row?;
            if !decode(k.value(), v.value())?.accepted {
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn create(&self, reg: &ValidRegistration, others: &[Server]) -> Result<Server> {
        let conflict = !others.is_empty();
        let id = match reg.macs.first() {
            Some(m) if conflict => format!("{}-{}", reg.uuid, m.replace(':', "")),
            _ => reg.uuid.clone(),
        };
        if self.server(&id)?.is_some() {
            return Err(InventoryError::Conflict(format!(
                "server {id} already exists"
            )));
        }
        if conflict {
            tracing::warn!(
                uuid = %reg.uuid,
                id,
                "another machine already registered with this UUID; keeping both apart by MAC"
            );
            for other in others {
                let mut other = other.clone();
                if !other.uuid_conflict {
                    other.uuid_conflict = true;
                    self.put(&mut other)?;
                }
            }
        }
        let now = now();
        let mut s = Server {
            id,
            uuid: reg.uuid.clone(),
            macs: Vec::new(),
            hardware: Default::default(),
            labels: Default::default(),
            accepted: false,
            cordoned: false,
            environment: None,
            bmc_address: None,
            bmc: None,
            bmc_lent_to: None,
            power: Default::default(),
            uuid_conflict: conflict,
            has_config: false,
            registered_at: now,
            updated_at: now,
            boot_history: Default::default(),
            window: None,
            alarm: None,
            arm_key: None,
            refusals: Default::default(),
            provisioning: Default::default(),
        };
        self.txn
            .open_multimap_table(BY_UUID)?
            .insert(reg.uuid.as_str(), s.id.as_str())?;
        self.apply_registration(&mut s, reg)?;
        Ok(s)
    }

    /// Makes a server what its registration reports (MACs, hardware, the BMC's address)
    /// and stores it; MACs it no longer reports leave the index.
    pub fn apply_registration(&self, s: &mut Server, reg: &ValidRegistration) -> Result<()> {
        {
            let mut by_mac = self.txn.open_table(BY_MAC)?;
            for old in s.macs.iter().filter(|m| !reg.macs.contains(m)) {
                let owner = by_mac.get(old.as_str())?.map(|g| g.value().to_string());
                if owner.as_deref() == Some(s.id.as_str()) {
                    by_mac.remove(old.as_str())?;
                }
            }
        }
        s.macs = reg.macs.clone();
        s.hardware = reg.hardware.clone();
        if let Some(bmc) = &reg.hardware.bmc
            && !bmc.ip.is_empty()
        {
            s.bmc_address = Some(bmc.ip.clone());
        }
        self.put(s)
    }

    /// A server's configuration blob (as stored: sealed).
    pub fn config(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let c = self.txn.open_table(CONFIGS)?;
        let v = c.get(id)?;
        Ok(v.map(|v| v.value().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::{Hardware, Nic, RegistrationMode, RegistrationRequest};

    const U: &str = "03000200-0400-0500-0006-000700080009";

    fn reg(macs: &[&str]) -> ValidRegistration {
        RegistrationRequest {
            uuid: U.into(),
            hardware: Hardware {
                vendor: "QEMU".into(),
                nics: macs
                    .iter()
                    .map(|m| Nic {
                        name: "eth0".into(),
                        mac: m.to_string(),
                        addresses: vec![],
                    })
                    .collect(),
                ..Default::default()
            },
            mode: RegistrationMode::Discover,
        }
        .validate()
        .unwrap()
    }

    /// Registers as the core does once a registration may change the inventory: the
    /// server it names updated, else created. Whether it was created.
    fn register(inv: &Inventory, macs: &[&str]) -> (Server, bool) {
        let r = reg(macs);
        inv.write(|t| {
            let found = t.resolve(&r)?;
            match found.existing {
                Some(mut s) => {
                    t.apply_registration(&mut s, &r)?;
                    Ok((s, false))
                }
                None => Ok((t.create(&r, &found.others)?, true)),
            }
        })
        .unwrap()
    }

    #[test]
    fn duplicate_uuids_do_not_merge() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("i.redb")).unwrap();
        let (a, created) = register(&inv, &["52:54:00:00:00:01"]);
        assert!(created);
        assert_eq!(a.id, U);
        let (_, created) = register(&inv, &["52:54:00:00:00:01", "52:54:00:00:01:01"]);
        assert!(!created, "same UUID and a shared MAC is the same machine");
        let (b, created) = register(&inv, &["52:54:00:00:00:02"]);
        assert!(created);
        assert_eq!(b.id, format!("{U}-525400000002"));
        assert!(b.uuid_conflict);
        assert!(inv.get(U).unwrap().uuid_conflict);
        assert_eq!(inv.list().unwrap().len(), 2);
        // Booting: the MAC tells them apart; the UUID alone is ambiguous.
        assert_eq!(
            inv.find_for_boot(Some(U), Some("52:54:00:00:00:02"))
                .unwrap()
                .unwrap()
                .id,
            b.id
        );
        assert_eq!(
            inv.find_for_boot(Some(U), Some("52:54:00:00:01:01"))
                .unwrap()
                .unwrap()
                .id,
            U
        );
        assert!(inv.find_for_boot(Some(U), None).unwrap().is_none());
        // A MAC of one server reported for another is found, never silently moved.
        let r = reg(&["52:54:00:00:00:01", "52:54:00:00:00:02"]);
        let found = inv.write(|t| t.resolve(&r)).unwrap();
        assert_eq!(found.existing.unwrap().id, U);
        assert_eq!(
            found.foreign_macs,
            vec![("52:54:00:00:00:02".to_string(), b.id.clone())]
        );
        // A MAC the machine no longer reports leaves the index.
        register(&inv, &["52:54:00:00:01:01"]);
        assert!(
            inv.find_for_boot(None, Some("52:54:00:00:00:01"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn update_config_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        {
            let inv = Inventory::open(&path).unwrap();
            register(&inv, &["52:54:00:00:00:01"]);
            inv.update(U, |s| s.accepted = true).unwrap();
            inv.set_config(U, Some(b"machine: {}")).unwrap();
            for i in 0..30 {
                inv.record_boot(
                    U,
                    BootRecord {
                        at: i,
                        action: "discover".into(),
                        environment: None,
                        source: None,
                    },
                )
                .unwrap();
            }
        }
        let inv = Inventory::open(&path).unwrap();
        let s = inv.get(U).unwrap();
        assert!(s.accepted && s.has_config);
        assert_eq!(s.boot_history.len(), model::BOOT_HISTORY_LEN);
        assert_eq!(s.boot_history.back().unwrap().at, 29);
        assert_eq!(inv.config(U).unwrap().unwrap(), b"machine: {}");
        inv.delete(U).unwrap();
        assert!(matches!(inv.get(U), Err(InventoryError::NotFound(_))));
        assert!(inv.config(U).unwrap().is_none());
        assert!(
            inv.find_for_boot(Some(U), Some("52:54:00:00:00:01"))
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            inv.update("nope", |_| {}),
            Err(InventoryError::NotFound(_))
        ));
    }

    fn claim(uid: &str) -> Claim {
        Claim {
            machine: format!("ns/{uid}"),
            uid: uid.into(),
            cluster: Some("c".into()),
            claimed_at: 1,
            powered_at: None,
            config_served_at: None,
            installed_at: None,
            installed_by: None,
            paused: false,
            server_object: None,
        }
    }

    #[test]
    fn one_machine_holds_a_server_until_it_is_released_and_wiped() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("i.redb")).unwrap();
        register(&inv, &["52:54:00:00:00:01"]);
        let (s, fresh) = inv.claim(U, claim("a"), b"config-a").unwrap();
        assert!(fresh && s.has_config && s.provisioning.dirty);
        assert_eq!(inv.config(U).unwrap().unwrap(), b"config-a");
        // Another machine is refused; the holder claiming again keeps its progress.
        assert!(matches!(
            inv.claim(U, claim("b"), b"config-b"),
            Err(InventoryError::Conflict(_))
        ));
        inv.update(U, |s| {
            s.provisioning.claim.as_mut().unwrap().powered_at = Some(5)
        })
        .unwrap();
        let (s, fresh) = inv.claim(U, claim("a"), b"config-a2").unwrap();
        assert!(!fresh, "the holder claiming again");
        assert_eq!(s.provisioning.claim.unwrap().powered_at, Some(5));
        assert_eq!(inv.config(U).unwrap().unwrap(), b"config-a2");
        // Only the holder releases; a release to wipe leaves it dirty and unclaimable.
        assert!(matches!(
            inv.release(U, Some("b"), true),
            Err(InventoryError::Conflict(_))
        ));
        let (s, released) = inv.release(U, Some("a"), true).unwrap();
        assert!(released && s.provisioning.claim.is_none() && !s.has_config);
        assert!(s.provisioning.dirty && s.provisioning.wipe_requested_at.is_some());
        assert!(inv.config(U).unwrap().is_none());
        let (_, again) = inv.release(U, Some("a"), true).unwrap();
        assert!(!again, "a second release does nothing");
        assert!(matches!(
            inv.claim(U, claim("c"), b"x"),
            Err(InventoryError::Conflict(_))
        ));
        // Released without a wipe: free at once.
        inv.update(U, |s| s.provisioning = Default::default())
            .unwrap();
        inv.claim(U, claim("d"), b"x").unwrap();
        let (s, _) = inv.release(U, None, false).unwrap();
        assert!(s.provisioning.is_free());
    }
}
