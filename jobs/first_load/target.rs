//! Where `first_load` writes: straight into the read collections (a first load, with the stream jobs
//! paused), or into shadow collections that replace the live ones in one step at the end (`--rebuild`,
//! readers never see a half-built model and the jobs go on meanwhile).

use anyhow::{Context, Result, bail};
use bson::{Document, RawDocumentBuf, doc};
use cdc_cqrs::projection::Collection;
use cdc_cqrs::sink;
use mongodb::Database;

/// The shadow collection a rebuild loads `collection` into.
fn shadow(collection: Collection) -> String {
    format!("{}_rebuild", collection.name())
}

pub struct Target {
    db: Database,
    rebuild: bool,
}

impl Target {
    pub fn new(db: Database, rebuild: bool) -> Target {
        Target { db, rebuild }
    }

    /// The MongoDB collection this load writes `collection`'s documents to.
    pub fn name(&self, collection: Collection) -> String {
        if self.rebuild { shadow(collection) } else { collection.name().to_owned() }
    }

    /// Fails, naming the fix, if a read collection holds documents (tombstones count: the stream wrote it).
    pub async fn check_empty(db: &Database) -> Result<()> {
        for collection in Collection::ALL {
            let n = db.collection::<Document>(collection.name()).estimated_document_count().await?;
            if n > 0 {
                bail!(
                    "collection {}.{} is not empty ({n} documents): use --rebuild to load beside the live read models and \
                     swap them in when done",
                    db.name(),
                    collection.name()
                );
            }
        }
        Ok(())
    }

    /// Empty target collections (whatever an interrupted run left is dropped).
    pub async fn reset(&self) -> Result<()> {
        for collection in Collection::ALL {
            let name = self.name(collection);
            self.db.collection::<Document>(&name).drop().await.with_context(|| format!("dropping {name}"))?;
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

    /// The indexes the stream jobs' updates need, built once after the bulk insert (faster than during).
    pub async fn create_indexes(&self) -> Result<()> {
        for collection in Collection::ALL {
            sink::create_indexes(&self.db, collection, &self.name(collection)).await?;
        }
        Ok(())
    }

    /// Replaces each live collection by its shadow (`renameCollection` with `dropTarget`, one atomic step
    /// per collection). Shadows already swapped by an interrupted run are skipped.
    pub async fn swap_in(db: &Database) -> Result<()> {
        let existing = db.list_collection_names().await?;
        let admin = db.client().database("admin");
        for collection in Collection::ALL {
            let shadow = shadow(collection);
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
