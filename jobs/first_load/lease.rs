//! One first_load at a time per read store. Two at once would drop and fill the same collections from two
//! snapshots: a run takes an unfinished load for one that died and starts it over, under the other's feet.
//!
//! A run holds a lease, a document in `_handoff` renewed every few seconds, from before it reads the handoff
//! state until it is done. Another run waits for it: a holder on this host whose process is gone is replaced
//! at once (a load killed and run again); one that is running is refused at once, or, on another host, as soon
//! as it is seen renewing its lease; one that has not renewed for [`EXPIRY_MS`] is taken for dead and replaced.
//! A run that could not renew its lease for half that time (MongoDB unreachable) stops before anyone may take it
//! over. `compact` refuses to run while a lease is live (a rebuild's rewind would replay changes its horizon
//! drops). The lease's times are MongoDB's (`$$NOW`), so the hosts' clocks do not matter; a run times its own
//! renewals on its monotonic clock. Time alone does not fence a run frozen past its lease (a paused VM): its
//! owner id names the shadow collections it writes (`target`) and is checked in the transaction that starts
//! its swap (`handoff::begin`), so what it writes after losing the lease is never swapped in.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use cdc_cqrs::{cli, handoff};
use mongodb::{Collection, Database};
use tokio::sync::watch;

const ID: &str = handoff::LEASE_ID;
const RENEW_EVERY: Duration = Duration::from_secs(5);
const EXPIRY_MS: i64 = handoff::LEASE_EXPIRY_MS;
/// A run that could not renew its lease for this long stops, before another run may take the store over
/// (half the expiry: the renewal's own waits and the two clocks' drift fit in the other half).
const FENCE: Duration = Duration::from_millis(EXPIRY_MS as u64 / 2);

/// This run's hold on the store.
pub struct Lease {
    leases: Collection<Document>,
    owner: ObjectId,
    /// Set, with why, if another run took the lease over (this one stopped renewing it in time).
    lost: watch::Receiver<Option<String>>,
    renewer: tokio::task::JoinHandle<()>,
}

/// Who holds the lease, as its document says.
struct Holder {
    owner: ObjectId,
    host: String,
    pid: u32,
    since: DateTime,
    renewed_at: DateTime,
}

impl Holder {
    fn of(d: &Document) -> Result<Holder> {
        Ok(Holder {
            owner: d.get_object_id("owner")?,
            host: d.get_str("host")?.to_owned(),
            pid: u32::try_from(d.get_i64("pid")?)?,
            since: *d.get_datetime("since")?,
            renewed_at: *d.get_datetime("renewed_at")?,
        })
    }

    fn describe(&self) -> String {
        format!(
            "host {}, pid {}, since {}",
            self.host,
            self.pid,
            self.since.try_to_rfc3339_string().unwrap_or_default()
        )
    }
}

impl Lease {
    /// Takes the store's lease, waiting for a holder that died (see the module doc); refuses while another
    /// run holds it.
    pub async fn take(db: &Database) -> Result<Lease> {
        let leases = db.collection::<Document>(handoff::COLLECTION);
        let (owner, host, pid) = (ObjectId::new(), cli::hostname(), std::process::id());
        let claim = vec![doc! { "$set": {
            "owner": owner, "host": &host, "pid": i64::from(pid), "since": "$$NOW", "renewed_at": "$$NOW",
        } }];
        // The holder waited for, and its renewal when first seen.
        let mut waiting: Option<(ObjectId, DateTime)> = None;
        loop {
            let held = leases.find_one(doc! { "_id": ID }).await.context("reading the first_load lease")?;
            let holder = held.as_ref().map(Holder::of).transpose().context("reading the first_load lease")?;
            let taken = match &holder {
                None => {
                    // Upserted only where none is: another run's insert makes this one a duplicate key.
                    let free = doc! { "_id": ID, "owner": { "$exists": false } };
                    match leases.update_one(free, claim.clone()).upsert(true).await {
                        Ok(_) => true,
                        Err(e) if is_duplicate_key(&e) => false,
                        Err(e) => return Err(anyhow!(e).context("taking the first_load lease")),
                    }
                }
                Some(h) => {
                    let from = if h.host == host && (h.pid == pid || !first_load_runs(h.pid)) {
                        doc! { "_id": ID, "owner": h.owner }
                    } else if h.host == host {
                        bail!("another first_load is running on this store ({}): run one at a time", h.describe());
                    } else {
                        match waiting {
                            Some((o, renewed)) if o == h.owner && renewed != h.renewed_at => bail!(
                                "another first_load is running on this store ({}; it renewed its lease just now): run \
                                 one at a time",
                                h.describe()
                            ),
                            Some((o, _)) if o == h.owner => {}
                            _ => {
                                tracing::info!(
                                    holder = %h.describe(),
                                    "another first_load holds this store: waiting to see it renew its lease (then \
                                     this run stops) or {} s pass without (it died: this run takes over)",
                                    EXPIRY_MS / 1000
                                );
                                waiting = Some((h.owner, h.renewed_at));
                            }
                        }
                        doc! { "_id": ID, "owner": h.owner, "$expr": { "$not": [handoff::lease_live()] } }
                    };
                    let replaced =
                        leases.update_one(from, claim.clone()).await.context("taking the first_load lease")?;
                    replaced.modified_count == 1
                }
            };
            if taken {
                if let Some(h) = &holder {
                    tracing::warn!(holder = %h.describe(), "took over the lease of a first_load that died");
                }
                let (tx, lost) = watch::channel(None);
                let renewer = tokio::spawn(renew(leases.clone(), owner, tx));
                return Ok(Lease { leases, owner, lost, renewer });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// This run's mark on the lease, and on what it writes (see the `target` module).
    pub fn owner(&self) -> ObjectId {
        self.owner
    }

    /// Resolves with why if this run lost the lease (another took it over, or it could not renew it in time);
    /// never otherwise.
    pub async fn lost(&self) -> anyhow::Error {
        let mut lost = self.lost.clone();
        match lost.wait_for(Option::is_some).await {
            Ok(why) => anyhow!(why.clone().unwrap_or_default()),
            Err(_) => std::future::pending().await,
        }
    }

    /// Lets the next run go at once (if MongoDB does not answer, the lease expires by itself).
    pub async fn release(self) -> Result<()> {
        self.renewer.abort();
        let release = self.leases.delete_one(doc! { "_id": ID, "owner": self.owner });
        match tokio::time::timeout(RENEW_EVERY, release).await {
            Ok(released) => released.map(|_| ()).context("releasing the first_load lease"),
            Err(_) => {
                let expiry = EXPIRY_MS / 1000;
                tracing::warn!(
                    "releasing the first_load lease got no answer: it expires {expiry} s after its last renewal"
                );
                Ok(())
            }
        }
    }
}

/// Renews the lease until another run has it, or it could not for [`FENCE`] (then says why through `lost`).
async fn renew(leases: Collection<Document>, owner: ObjectId, lost: watch::Sender<Option<String>>) {
    let mut renewed_at = Instant::now();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let renewed = vec![doc! { "$set": { "renewed_at": "$$NOW" } }];
        let renewal = leases.update_one(doc! { "_id": ID, "owner": owner }, renewed);
        match tokio::time::timeout(RENEW_EVERY, renewal).await.unwrap_or_else(|_| Err(timed_out())) {
            Ok(r) if r.matched_count == 0 => {
                let why = format!(
                    "another first_load took this store over: this run could not renew its lease for {} s (was \
                     MongoDB unreachable?); run one at a time",
                    EXPIRY_MS / 1000
                );
                let _ = lost.send(Some(why));
                return;
            }
            Ok(_) => renewed_at = Instant::now(),
            Err(e) => tracing::warn!(error = %e, "renewing the first_load lease failed; trying again"),
        }
        if renewed_at.elapsed() >= FENCE {
            let why = format!(
                "this first_load could not renew its lease for {} s (is MongoDB reachable?): it stopped before another \
                 run could take the store over; run it again",
                FENCE.as_secs()
            );
            let _ = lost.send(Some(why));
            return;
        }
    }
}

fn timed_out() -> mongodb::error::Error {
    mongodb::error::Error::custom(format!("no answer in {RENEW_EVERY:?}"))
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}

/// Whether process `pid` of this host is a first_load (a pid reused by another program is not).
fn first_load_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "first_load")
}
