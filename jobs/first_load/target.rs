//! Where `first_load` writes: shadow collections named for the run (its lease's owner), which replace the
//! live ones in one step at the end. Readers never see a half-built model during a `--rebuild` (the jobs go on
//! meanwhile); and a run that lost its lease while frozen (a paused VM) and writes on when it wakes writes only
//! into its own shadows, which no swap takes: the lease fences its every write, not only its phase changes.

use anyhow::{Context, Result, bail};
use bson::oid::ObjectId;
use bson::{Document, RawDocumentBuf, doc};
use cdc_cqrs::projection::Collection;
use cdc_cqrs::sink;
use mongodb::Database;

/// The shadow collection the run whose lease is `owner` loads `collection` into (`None`: a swap begun by a
/// version before shadows were named for their run).
fn shadow(collection: Collection, owner: Option<&str>) -> String {
    match owner {
        Some(owner) => format!("{}_load_{owner}", collection.name()),
        None => format!("{}_rebuild", collection.name()),
    }
}

/// Whether `name` is a shadow of `collection`, whichever run's.
fn is_shadow(name: &str, collection: Collection) -> bool {
    name == shadow(collection, None) || name.starts_with(&format!("{}_load_", collection.name()))
}

pub struct Target {
    db: Database,
    owner: String,
}

impl Target {
    /// The target of the run holding the lease `owner`.
    pub fn new(db: Database, owner: ObjectId) -> Target {
        Target { db, owner: owner.to_hex() }
    }

    /// The MongoDB collection this load writes `collection`'s documents to.
    pub fn name(&self, collection: Collection) -> String {
        shadow(collection, Some(&self.owner))
    }

    /// Fails, naming the fix, if a read collection holds documents (tombstones count: the stream wrote it).
    /// `one_of_several`: the run loads other stores too (this one may be loaded already by an earlier run).
    pub async fn check_empty(db: &Database, one_of_several: bool) -> Result<()> {
        for collection in Collection::ALL {
            let n = db.collection::<Document>(collection.name()).estimated_document_count().await?;
            if n > 0 {
                let or = if one_of_several { ", or leave this store out of --mongo-uri" } else { "" };
                bail!(
                    "collection {}.{} is not empty ({n} documents): use --rebuild to load beside the live read models and \
                     swap them in when done{or}",
                    db.name(),
                    collection.name()
                );
            }
        }
        Ok(())
    }

    /// Drops every shadow, whichever run's (what an interrupted run left), and with `live` the read collections
    /// too (a first load: they are empty, or what a run of a version that loaded into them left).
    pub async fn reset(&self, live: bool) -> Result<()> {
        let existing = self.db.list_collection_names().await.context("listing the collections")?;
        for collection in Collection::ALL {
            let live = live.then(|| collection.name().to_owned());
            let shadows = existing.iter().filter(|name| is_shadow(name, collection)).cloned();
            for name in shadows.chain(live) {
                if name != collection.name() {
                    tracing::info!(collection = %name, "dropping a shadow an earlier run left (it died, or lost its lease)");
                }
                self.db.collection::<Document>(&name).drop().await.with_context(|| format!("dropping {name}"))?;
            }
        }
        Ok(())
    }

    /// Inserts documents in large unordered batches (the driver splits them at the server's limits).
    pub async fn insert(&self, collection: Collection, docs: &[RawDocumentBuf]) -> Result<u64> {
        if docs.is_empty() {
            return Ok(0);
        }
        let name = self.name(collection);
        let done = self
            .db
            .collection::<RawDocumentBuf>(&name)
            .insert_many(docs)
            .ordered(false)
            .await
            .with_context(|| format!("writing {name}"))?;
        Ok(done.inserted_ids.len() as u64)
    }

    /// The indexes the stream jobs' updates need, built once after the bulk insert (faster than during), the
    /// collections' at once: a build scans its collection on one core.
    pub async fn create_indexes(&self) -> Result<()> {
        let builds = Collection::ALL.map(|collection| {
            let name = self.name(collection);
            async move { sink::create_indexes(&self.db, collection, &name).await }
        });
        futures::future::try_join_all(builds).await?;
        Ok(())
    }

    /// Replaces each live collection by its shadow loaded by the run `loaded_by` (the handoff state's:
    /// `renameCollection` with `dropTarget`, one atomic step per collection). Shadows already swapped by an
    /// interrupted run are skipped.
    pub async fn swap_in(db: &Database, loaded_by: Option<&str>) -> Result<()> {
        let existing = db.list_collection_names().await?;
        let admin = db.client().database("admin");
        for collection in Collection::ALL {
            let shadow = shadow(collection, loaded_by);
            if !existing.contains(&shadow) {
                continue;
            }
            admin
                .run_command(doc! {
                    "renameCollection": format!("{}.{shadow}", db.name()),
                    "to": format!("{}.{}", db.name(), collection.name()),
                    "dropTarget": true,
                })
                .await
                .with_context(|| format!("swapping {shadow} in"))?;
        }
        Ok(())
    }
}

/// Every store's target of a run: each document is built once and inserted into every store.
pub struct Targets {
    /// Each store's target, with the name that says which store in an error (empty with one store).
    stores: Vec<(String, Target)>,
}

impl Targets {
    pub fn new(stores: Vec<(String, Target)>) -> Targets {
        Targets { stores }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.stores.iter().map(|(_, target)| target)
    }

    /// Inserts `docs` into every store at once; returns how many each took (all, or it failed).
    pub async fn insert(&self, collection: Collection, docs: &[RawDocumentBuf]) -> Result<u64> {
        let each = self.stores.iter().map(|(store, target)| async move {
            target.insert(collection, docs).await.map_err(|e| crate::naming(store, e))
        });
        let written = futures::future::try_join_all(each).await?;
        Ok(written.into_iter().min().unwrap_or(0))
    }
}
