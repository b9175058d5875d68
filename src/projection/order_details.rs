//! order_details -> the `order_details` documents (enriched with the product's name and the order's
//! status), and the line embedded in its order's document: added, replaced or removed by
//! `order_detail_id`, with the order's `totals` recomputed.
//!
//! Embedded lines are changed here, in Rust, on the order document as read, and written back with one
//! `$set` per order and batch however many of its lines changed (an order's lines arrive together). The
//! write is conditional on the document's lines version `_lv` being the one read, which every other writer
//! of lines bumps (the products job's fan-out, another process of this job): when it moved, the order is
//! read and its lines redone.
//!
//! Order independence: a line may arrive before its order (the order document is created without a
//! header, which the orders job fills in later) or before its product (the products job fills in the
//! product when it gets there). The product's name and price and the order's status are read before the
//! batch is written and copied in; after the writes they are read again, and a copy that changed meanwhile
//! is fanned out again. The products and orders jobs write their document before they look for copies to
//! fan out to, so a concurrent change is caught by one side or the other: copies are never left stale.
//!
//! Removed lines leave `{order_detail_id, _v}` in the order's `_removed`, so a replayed older insert of a
//! removed line is recognised as older and ignored.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail};
use bson::{Document, RawArrayBuf, RawBson, RawBsonRef, RawDocument, RawDocumentBuf, cstr, doc, rawdoc};
use rust_decimal::Decimal;

use super::orders::status_fan_out;
use super::products::{details_fan_out, lines_fan_out};
use super::{
    Collection, Existing, LIVE_BELOW, Write, decimal_of_128, field, guarded_replace, set_if_unchanged, tombstone,
    truncate_all, value,
};
use crate::envelope::Event;
use crate::readmodel;
use crate::rows::OrderDetail;
use crate::runtime::Job;
use crate::sink::ReadModels;

/// The `stream_order_details` job.
pub struct OrderDetailsJob;

impl Job for OrderDetailsJob {
    const TABLE: &'static str = "order_details";
    const BIN: &'static str = "stream_order_details";
    type Row = OrderDetail;

    fn key(row: &OrderDetail) -> i32 {
        row.order_detail_id
    }

    /// An order's lines are written together, in its document: by order.
    fn lane_key(row: &OrderDetail) -> i32 {
        row.order_id
    }

    /// An order's lines are keyed by line, so a transaction's lines of one order are in several partitions.
    const BATCHES_BY_TIME: bool = true;

    /// A move to another order must reach the old order even when a later change of the line follows.
    fn must_keep(event: &Event<OrderDetail>) -> bool {
        matches!(event, Event::Upsert { row, before: Some(b), .. } if b.order_id != row.order_id)
    }

    async fn apply(&self, events: &[Event<OrderDetail>], store: &ReadModels<'_>) -> anyhow::Result<()> {
        let (mut product_ids, mut status_ids, mut order_ids) = (Vec::new(), Vec::new(), Vec::new());
        // The orders this batch copies each product into, and the lines it copies each order's status into:
        // where its re-check fans a change out to.
        let mut holders: HashMap<i32, Vec<i32>> = HashMap::new();
        let mut lines_of: HashMap<i32, Vec<i32>> = HashMap::new();
        for event in events {
            match event {
                Event::Upsert { row, before, .. } => {
                    product_ids.push(row.product_id);
                    holders.entry(row.product_id).or_default().push(row.order_id);
                    lines_of.entry(row.order_id).or_default().push(row.order_detail_id);
                    status_ids.push(row.order_id);
                    order_ids.push(row.order_id);
                    order_ids.extend(before.as_ref().map(|b| b.order_id));
                }
                Event::Delete { before, .. } => order_ids.push(before.order_id),
                Event::Truncate { .. } | Event::Tombstone => {}
            }
        }
        for ids in [&mut product_ids, &mut status_ids, &mut order_ids] {
            ids.sort_unstable();
            ids.dedup();
        }
        // What is copied in, as it is before the writes, the lines the batch changes (one read of orders),
        // and which documents exist (most of a catch-up's do not: they are inserted).
        let ((products, statuses), existing) = tokio::try_join!(
            copied(store, &product_ids, &order_ids, order_fields(true)),
            Existing::read(store, Collection::OrderDetails, events, Self::key),
        )?;

        let copies = |row: &OrderDetail| {
            let product = products.get(&row.product_id).filter(|p| is_known(p));
            (product, statuses.get(&row.order_id).filter(|o| field(o, "status").is_some()))
        };
        // The guarded write of a change (a TRUNCATE's two), or the document it makes where there is none.
        let guarded = |event: &Event<OrderDetail>| match event {
            Event::Upsert { row, source, .. } => {
                let (product, order) = copies(row);
                let statement = detail_statement(row, source.lsn as i64, product, order);
                vec![Write { collection: Collection::OrderDetails, statement }]
            }
            Event::Delete { before, source } => {
                let (id, pos) = (before.order_detail_id, source.lsn as i64);
                vec![Write::raw(Collection::OrderDetails, guarded_replace(id, pos, tombstone(id, pos)))]
            }
            Event::Truncate { source } => {
                let pos = source.lsn as i64;
                // Every order's lines older than it too (it bumps their `_lv`: the lines below are redone).
                vec![
                    Write::new(Collection::OrderDetails, truncate_all(pos)),
                    Write::new(Collection::Orders, remove_all_lines(pos)),
                ]
            }
            Event::Tombstone => Vec::new(),
        };
        let new = |event: &Event<OrderDetail>| match event {
            Event::Upsert { row, source, .. } => {
                let (product, order) = copies(row);
                Some(new_detail(row, source.lsn as i64, product, order))
            }
            Event::Delete { before, source } => Some(tombstone(before.order_detail_id, source.lsn as i64)),
            Event::Truncate { .. } | Event::Tombstone => None,
        };
        // The documents and the lines: at once for a live batch (a round trip less), one after the other
        // when catching up (at once, a catch-up's peak RSS was 15-25 MB higher for no measured gain in
        // throughput: the server is the bottleneck). Either way both are written before the re-check.
        let documents = existing.write(store, Collection::OrderDetails, events, Self::key, new, guarded);
        let live = events.len() < LIVE_BELOW;
        let lines = write_lines(events, order_ids, &products, &statuses, store, live);
        if live {
            // Both to their end even if one is refused (see `ReadModels::write`).
            let (documents, lines) = tokio::join!(documents, lines);
            documents?;
            lines?;
        } else {
            documents.await?;
            lines.await?;
        }

        // The copies read before the writes, read again: what changed meanwhile is fanned out again to the
        // copies this batch wrote (the products job's own fan-out, which looks for copies after writing the
        // product, sees every copy written before that; a copy written after it is one this re-check sees
        // the change for).
        let (products_now, statuses_now) = copied(store, &product_ids, &status_ids, order_fields(false)).await?;
        let mut again = Vec::new();
        for (id, now) in products_now.iter().filter(|(_, p)| is_known(p)) {
            let copied = products.get(id).filter(|p| is_known(p));
            let pos = now.get_i64("_v")?;
            let name_changed = copied.is_none_or(|p| field(p, "name") != field(now, "name"));
            let price_changed = copied.is_some_and(|p| field(p, "price") != field(now, "price"));
            if !(name_changed || price_changed) {
                continue; // most products: decode nothing
            }
            let (name, price) = (value(now, "name"), value(now, "price"));
            let mut orders = holders.remove(id).unwrap_or_default();
            orders.sort_unstable();
            orders.dedup();
            again.extend(lines_fan_out(*id, &name, &price, pos, &orders));
            if name_changed {
                again.push(details_fan_out(*id, &name, pos));
            }
        }
        for (id, now) in statuses_now.iter().filter(|(_, o)| field(o, "status").is_some()) {
            let copied = statuses.get(id).filter(|o| field(o, "status").is_some());
            if copied.is_none_or(|o| field(o, "status") != field(now, "status")) {
                let mut details = lines_of.remove(id).unwrap_or_default();
                details.sort_unstable();
                details.dedup();
                again.push(status_fan_out(*id, &details, &value(now, "status"), now.get_i64("_v")?));
            }
        }
        store.write(again).await
    }
}

/// Documents as read, by `_id`.
type Read = HashMap<i32, RawDocumentBuf>;

/// The data order_details copy, both reads at once: the products' name and price, and of the orders
/// `order_fields` (their status and version, and their lines when these are about to be changed).
async fn copied(
    store: &ReadModels<'_>,
    product_ids: &[i32],
    order_ids: &[i32],
    order_fields: Document,
) -> anyhow::Result<(Read, Read)> {
    tokio::try_join!(
        store.fields(Collection::Products, product_ids, doc! { "name": 1, "price": 1, "_v": 1 }),
        store.fields(Collection::Orders, order_ids, order_fields),
    )
}

/// The fields of an order that order_details copies (its status, with its version), and with `lines`
/// those its lines are changed from (lines, removed lines, lines version).
fn order_fields(lines: bool) -> Document {
    let mut fields = doc! { "status": 1, "_v": 1 };
    if lines {
        fields.extend(doc! { "lines": 1, "_removed": 1, "_lv": 1 });
    }
    fields
}

/// How many times an order's lines are redone because another writer changed them first, before the batch
/// fails (and the runtime retries it with backoff).
const LINE_ATTEMPTS: usize = 50;

/// Writes the batch's changes to the lines of orders `ids` (sorted), as `read` before the batch: changed,
/// and written back if nobody changed them since; the orders somebody did are read again and redone. An
/// order with no document is inserted, or, in a `live` batch, upserted (see [`LinesWrite::Update`]).
async fn write_lines(
    events: &[Event<OrderDetail>],
    mut ids: Vec<i32>,
    products: &Read,
    read: &Read,
    store: &ReadModels<'_>,
    live: bool,
) -> anyhow::Result<()> {
    let mut stored = std::borrow::Cow::Borrowed(read);
    for attempt in 1..=LINE_ATTEMPTS {
        if ids.is_empty() {
            return Ok(());
        }
        if attempt > 1 {
            stored = std::borrow::Cow::Owned(store.fields(Collection::Orders, &ids, order_fields(true)).await?);
        }
        let mut lines = Lines::new(&stored);
        let mine = |order_id: &i32| ids.binary_search(order_id).is_ok();
        for event in events {
            match event {
                Event::Upsert { row, before, source } => {
                    let pos = source.lsn as i64;
                    if mine(&row.order_id) {
                        let product = products.get(&row.product_id).filter(|p| is_known(p));
                        lines.of(row.order_id)?.upsert(row, pos, product);
                    }
                    // Moved to another order: it leaves the old one.
                    if let Some(old) = before.as_ref().filter(|b| b.order_id != row.order_id && mine(&b.order_id)) {
                        lines.of(old.order_id)?.remove(row.order_detail_id, pos);
                    }
                }
                Event::Delete { before, source } if mine(&before.order_id) => {
                    lines.of(before.order_id)?.remove(before.order_detail_id, source.lsn as i64);
                }
                Event::Truncate { source } => lines.truncate(source.lsn as i64),
                Event::Delete { .. } | Event::Tombstone => {}
            }
        }
        let ((updated, updates), (inserted, documents)) = lines.into_writes(live)?;
        // Both to their end even if one is refused (see `ReadModels::write`).
        let (lost, taken) = tokio::join!(
            store.write_if_unchanged(Collection::Orders, updates),
            store.insert(Collection::Orders, documents),
        );
        let (lost, taken) = (lost?, taken?);
        ids = lost.into_iter().map(|i| updated[i]).chain(taken.into_iter().map(|i| inserted[i])).collect();
        ids.sort_unstable();
        if !ids.is_empty() && attempt % 5 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(rand::random_range(1..=20 * attempt as u64))).await;
        }
    }
    bail!("the lines of {} orders kept changing under this job ({LINE_ATTEMPTS} attempts)", ids.len())
}

/// Whether a `products` document is a product (not a tombstone): one whose name and price can be embedded.
fn is_known(product: &RawDocument) -> bool {
    field(product, "name").is_some() && field(product, "_v").is_some()
}

/// The embedded lines of the orders a batch changes, each read once per attempt.
struct Lines<'a> {
    stored: &'a Read,
    orders: BTreeMap<i32, OrderLines>,
    /// TRUNCATEs met so far in the batch, to apply to an order first read after them.
    truncates: Vec<i64>,
}

impl<'a> Lines<'a> {
    fn new(stored: &'a Read) -> Self {
        Lines { stored, orders: BTreeMap::new(), truncates: Vec::new() }
    }

    fn of(&mut self, order_id: i32) -> anyhow::Result<&mut OrderLines> {
        Ok(match self.orders.entry(order_id) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(first) => {
                let mut lines = OrderLines::stored(self.stored.get(&order_id))?;
                for &pos in &self.truncates {
                    lines.truncate(pos);
                }
                first.insert(lines)
            }
        })
    }

    fn truncate(&mut self, pos: i64) {
        self.truncates.push(pos);
        for lines in self.orders.values_mut() {
            lines.truncate(pos);
        }
    }

    /// The writes of the orders whose lines changed, with the orders' ids: a conditional `$set` of lines,
    /// `_removed` and totals where the order's document was read (or, `live`, where there was none), a new
    /// document where there was none.
    fn into_writes(self, live: bool) -> anyhow::Result<(Changed, Changed)> {
        let (mut updated, mut inserted): (Changed, Changed) = Default::default();
        for (order_id, lines) in self.orders {
            match lines.write(order_id, live)? {
                Some(LinesWrite::Update(statement)) => {
                    updated.0.push(order_id);
                    updated.1.push(statement);
                }
                Some(LinesWrite::Insert(document)) => {
                    inserted.0.push(order_id);
                    inserted.1.push(document);
                }
                None => {}
            }
        }
        Ok((updated, inserted))
    }
}

/// Orders and their writes, in the same order.
type Changed = (Vec<i32>, Vec<RawDocumentBuf>);

/// How an order's changed lines are written.
enum LinesWrite {
    /// An upsert of the document read, conditional on its lines being the ones read. Where none was read,
    /// in a live batch, conditional on the document having no lines version: it merges into a header the
    /// orders job wrote meanwhile, where an insert would collide with it.
    Update(RawDocumentBuf),
    /// A new document (none was read, and the batch is catching up).
    Insert(RawDocumentBuf),
}

/// One order's `lines` (sorted by `order_detail_id`; raw BSON as read, a line rebuilt only when it changes)
/// and `_removed` (`order_detail_id` -> `_v` of lines gone), changed only by events newer than what the order
/// knows of that line; `version` is the `_lv` read, and `exists` whether a document was. A line is found by
/// binary search: an order of n lines changed by a batch of as many costs n log n, not n squared (measured, an
/// order of 10,000 lines in one batch: over 60 s in a debug build with a scan per line).
#[derive(Debug, Default)]
struct OrderLines {
    lines: Vec<RawDocumentBuf>,
    removed: BTreeMap<i32, i64>,
    version: Option<i64>,
    exists: bool,
    changed: bool,
}

/// A line's `order_detail_id` (its first field).
fn line_id(line: &RawDocument) -> Option<i32> {
    line.get_i32("order_detail_id").ok()
}

/// A line's `_v`: the position of the change it reflects (-1 if none).
fn line_version(line: &RawDocument) -> i64 {
    line.get_i64("_v").unwrap_or(-1)
}

impl OrderLines {
    /// An order's lines as read, to be changed (only the orders a batch changes ever are).
    fn stored(order: Option<&RawDocumentBuf>) -> anyhow::Result<Self> {
        let Some(order) = order else { return Ok(OrderLines::default()) };
        let array = |name| -> anyhow::Result<Vec<&RawDocument>> {
            match order.get_array(name) {
                Ok(items) => {
                    items.into_iter().filter_map(|b| b.map(|b| b.as_document()).transpose()).collect::<Result<_, _>>()
                }
                Err(_) => Ok(Vec::new()),
            }
            .with_context(|| format!("an order whose {name} are not BSON"))
        };
        let mut lines: Vec<RawDocumentBuf> = array("lines")?.into_iter().map(RawDocument::to_owned).collect();
        if !lines.is_sorted_by_key(|l| line_id(l)) {
            lines.sort_by_key(|l| line_id(l)); // written unsorted by a version before sorting
        }
        let mut removed = BTreeMap::new();
        for r in array("_removed")? {
            if let Some(id) = line_id(r) {
                let v = removed.entry(id).or_insert(-1);
                *v = line_version(r).max(*v);
            }
        }
        Ok(OrderLines { lines, removed, version: order.get_i64("_lv").ok(), exists: true, changed: false })
    }

    /// Where line `id` is in `lines`, or where it would go.
    fn find(&self, id: i32) -> Result<usize, usize> {
        self.lines.binary_search_by_key(&Some(id), |l| line_id(l))
    }

    /// The newest position this order knows for line `id` (present or removed), -1 if none.
    fn seen(&self, id: i32) -> i64 {
        let present = self.find(id).map_or(-1, |i| line_version(&self.lines[i]));
        present.max(self.removed.get(&id).copied().unwrap_or(-1))
    }

    /// Line `row` as of `pos`, its product copied from `product` (as read; `None`: not known yet) or from
    /// the line's copy of the same product when that is newer. An older or replayed change of the line
    /// still refreshes its product copy, which a crashed run may have left stale.
    fn upsert(&mut self, row: &OrderDetail, pos: i64, product: Option<&RawDocumentBuf>) {
        let id = row.order_detail_id;
        let at = self.find(id).ok();
        let same_product = at.filter(|&i| self.lines[i].get_i32("product_id").ok() == Some(row.product_id));
        let stored_copy = same_product.and_then(|i| self.lines[i].get_document("product").ok());
        let copy_version = |copy: Option<&RawDocument>| copy.and_then(|c| c.get_i64("_v").ok()).unwrap_or(-1);
        let read = product.map(|p| {
            let of = |key| field(p, key).unwrap_or(RawBsonRef::Null);
            readmodel::line_product(of("name"), of("price"), Some(version_read(Some(p))))
        });
        let read_is_newer = copy_version(read.as_deref()) > copy_version(stored_copy);
        if pos <= self.seen(id) {
            if let (Some(i), Some(read), true) = (same_product, read, read_is_newer) {
                self.lines[i] = with_product(&self.lines[i], read);
                self.changed = true;
            }
            return;
        }
        let product = match (read, stored_copy) {
            (Some(read), _) if read_is_newer => Some(read),
            (_, Some(stored)) => Some(stored.to_owned()),
            (read, None) => read,
        };
        let mut line = readmodel::order_line(row, product);
        line.append(cstr!("_v"), pos);
        match self.find(id) {
            Ok(i) => self.lines[i] = line,
            Err(i) => self.lines.insert(i, line),
        }
        self.changed = true;
    }

    fn remove(&mut self, id: i32, pos: i64) {
        if pos <= self.seen(id) {
            return;
        }
        if let Ok(i) = self.find(id) {
            self.lines.remove(i);
        }
        self.removed.insert(id, pos);
        self.changed = true;
    }

    /// Every line older than `pos` leaves (a TRUNCATE of order_details).
    fn truncate(&mut self, pos: i64) {
        let (older, newer): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.lines).into_iter().partition(|l| line_version(l) < pos);
        self.lines = newer;
        if !older.is_empty() {
            self.changed = true;
        }
        for line in older {
            self.removed.insert(line_id(&line).unwrap_or_default(), pos);
        }
    }

    /// `totals` from the lines (the same sums and scale as first_load's and `verify`'s).
    fn totals(&self) -> anyhow::Result<RawDocumentBuf> {
        let (mut quantity, mut subtotal, mut total) = (0, Decimal::ZERO, Decimal::ZERO);
        for line in &self.lines {
            let money = |name| {
                match field(line, name) {
                    Some(RawBsonRef::Decimal128(d)) => decimal_of_128(d),
                    _ => None,
                }
                .with_context(|| format!("an order line without a decimal {name}"))
            };
            let q = line.get_i32("quantity")?;
            quantity += q;
            subtotal += money("unit_price")? * Decimal::from(q);
            total += money("line_total")?;
        }
        Ok(readmodel::totals(self.lines.len() as i32, quantity, subtotal, total))
    }

    /// The write of these lines, if any changed: a new document when none was read (unless `live`), else an
    /// update if the lines are still the ones read (else the upsert collides with the document: a duplicate
    /// key, as an insert does when another writer created the document first).
    fn write(self, order_id: i32, live: bool) -> anyhow::Result<Option<LinesWrite>> {
        if !self.changed {
            return Ok(None);
        }
        let totals = self.totals()?;
        let removed: RawArrayBuf =
            self.removed.iter().map(|(&id, &v)| rawdoc! { "order_detail_id": id, "_v": v }).collect();
        let lines: RawArrayBuf = self.lines.into_iter().collect();
        if !self.exists && !live {
            let document =
                rawdoc! { "_id": order_id, "lines": lines, "_removed": removed, "totals": totals, "_lv": 1_i64 };
            return Ok(Some(LinesWrite::Insert(document)));
        }
        let fields = rawdoc! { "lines": lines, "_removed": removed, "totals": totals };
        Ok(Some(LinesWrite::Update(set_if_unchanged(order_id, self.version, fields))))
    }
}

/// `line` with `product` as its product copy (in its place: a line's fields keep their order).
fn with_product(line: &RawDocument, product: RawDocumentBuf) -> RawDocumentBuf {
    let mut changed = RawDocumentBuf::new();
    for (key, value) in line.iter().filter_map(Result::ok) {
        match key.as_str() {
            "product" => changed.append(key, &product),
            _ => changed.append(key, value),
        }
    }
    changed
}

/// The write of `row` (as of `pos`) to its `order_details` document, guarded by the document's version. The
/// product's name and the order's status are copied from `product` and `order` as read, each kept at the
/// newer of that and the document's copy (the other jobs' fan-outs may have written it since, or first),
/// and refreshed even when the row itself is not newer: a replay after a crash mends a copy the crashed run
/// wrote stale and never re-checked. A copy's version is its product's or order's, comparable only while
/// the document points at the same one; when it points at another, the copy follows the row.
///
/// Built as BSON, not as nested documents: order_details writes one per change, the most of any job.
fn detail_statement(
    row: &OrderDetail,
    pos: i64,
    product: Option<&RawDocumentBuf>,
    order: Option<&RawDocumentBuf>,
) -> RawDocumentBuf {
    // The row's fields in the read model's shape (its null copies are overridden by `copies` below).
    let mut row_fields = readmodel::order_detail(row, None, None);
    row_fields.append(cstr!("_v"), pos);
    row_fields.append(cstr!("_deleted"), false);
    // The copy is ours when the document points at the same source and ours is newer, or points at another
    // and the row is ours.
    let copy = |name: &bson::raw::CStr,
                version: &bson::raw::CStr,
                source: &str,
                source_id: i32,
                read: Option<&RawDocumentBuf>,
                key: &str| {
        let value = read.and_then(|r| field(r, key)).map_or(RawBson::Null, RawBson::from);
        let v = version_read(read);
        let ours = rawdoc! { "$cond": [
            { "$eq": [ format!("${source}"), source_id ] },
            { "$gt": [ v, { "$ifNull": [ format!("${version}"), -1_i64 ] } ] },
            "$$row",
        ] };
        let mut mine = RawDocumentBuf::new();
        mine.append(name, value);
        mine.append(version, v);
        let mut stored = RawDocumentBuf::new();
        stored.append(name, format!("${}", name.as_str()));
        stored.append(version, format!("${}", version.as_str()));
        rawdoc! { "$cond": [ ours, { "$literal": mine }, stored ] }
    };
    let product_copy = copy(cstr!("product_name"), cstr!("_pv"), "product_id", row.product_id, product, "name");
    let order_copy = copy(cstr!("order_status"), cstr!("_ov"), "order_id", row.order_id, order, "status");
    rawdoc! {
        "q": { "_id": row.order_detail_id },
        "u": [ { "$replaceWith": { "$let": {
            "vars": { "row": { "$gt": [ pos, { "$ifNull": [ "$_v", -1_i64 ] } ] } },
            "in": { "$mergeObjects": [ { "$cond": [ "$$row", { "$literal": row_fields }, "$$ROOT" ] }, product_copy, order_copy ] },
        } } } ],
        "upsert": true,
    }
}

/// The version of a product or order as read, for its copy (-1 when not read: older than any).
fn version_read(read: Option<&RawDocumentBuf>) -> i64 {
    read.and_then(|r| field(r, "_v")).and_then(RawBsonRef::as_i64).unwrap_or(-1)
}

/// `row` (as of `pos`) as a new `order_details` document, its copies as read: what [`detail_statement`]
/// writes where no document exists.
fn new_detail(
    row: &OrderDetail,
    pos: i64,
    product: Option<&RawDocumentBuf>,
    order: Option<&RawDocumentBuf>,
) -> RawDocumentBuf {
    let (name, status) = (product.and_then(|p| p.get_str("name").ok()), order.and_then(|o| o.get_str("status").ok()));
    let mut document = readmodel::order_detail(row, name, status);
    document.append(cstr!("_v"), pos);
    document.append(cstr!("_deleted"), false);
    document.append(cstr!("_pv"), version_read(product));
    document.append(cstr!("_ov"), version_read(order));
    document
}

/// Totals from the lines, in cents (sums of two-decimal amounts; "0.00" fixes the scale of an empty sum).
fn totals_stage() -> Document {
    let zero = readmodel::money(Decimal::ZERO);
    let subtotal = doc! { "$add": [ zero, { "$sum": { "$map": {
        "input": "$lines", "in": { "$multiply": [ "$$this.unit_price", "$$this.quantity" ] },
    } } } ] };
    let total = doc! { "$add": [ zero, { "$sum": "$lines.line_total" } ] };
    doc! { "$set": { "totals": {
        "items": { "$size": "$lines" },
        "quantity": { "$sum": "$lines.quantity" },
        "subtotal": subtotal.clone(),
        "discount": { "$subtract": [ subtotal, total.clone() ] },
        "total": total,
    } } }
}

/// A TRUNCATE of order_details: every line older than it leaves every order.
fn remove_all_lines(pos: i64) -> Document {
    let older =
        doc! { "$filter": { "input": { "$ifNull": [ "$lines", [] ] }, "cond": { "$lt": [ "$$this._v", pos ] } } };
    doc! {
        "q": {},
        "u": [
            { "$set": {
                "_removed": { "$concatArrays": [
                    { "$ifNull": [ "$_removed", [] ] },
                    { "$map": { "input": older, "in": { "order_detail_id": "$$this.order_detail_id", "_v": { "$literal": pos } } } },
                ] },
                "lines": { "$filter": { "input": { "$ifNull": [ "$lines", [] ] }, "cond": { "$gte": [ "$$this._v", pos ] } } },
                "_lv": { "$add": [ { "$ifNull": [ "$_lv", 0_i64 ] }, 1_i64 ] },
            } },
            totals_stage(),
        ],
        "multi": true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{decimal, encode};

    fn line(id: i32, price: &str, quantity: i32, discount: &str) -> OrderDetail {
        OrderDetail {
            order_detail_id: id,
            order_id: 7,
            product_id: 100 + id,
            unit_price: price.parse().unwrap(),
            quantity,
            discount: discount.parse().unwrap(),
        }
    }

    fn ids(lines: &OrderLines) -> Vec<i32> {
        lines.lines.iter().map(|l| l.get_i32("order_detail_id").unwrap()).collect()
    }

    #[test]
    fn a_new_document_is_the_row_with_the_copies_as_read_and_their_versions() {
        let row = line(3, "10.00", 2, "0.100");
        let product = encode(&doc! { "name": "Tent", "price": decimal("19.90".parse().unwrap()), "_v": 8_i64 });
        let document = Document::try_from(new_detail(&row, 40, Some(&product), None).as_ref()).unwrap();
        let mut expected = readmodel::document(&readmodel::order_detail(&row, Some("Tent"), None));
        expected.extend(doc! { "_v": 40_i64, "_deleted": false, "_pv": 8_i64, "_ov": -1_i64 });
        assert_eq!(document, expected);
        assert_eq!(document.keys().next().map(String::as_str), Some("_id"));
    }

    #[test]
    fn lines_stay_sorted_and_only_newer_changes_apply() {
        let mut lines = OrderLines::stored(None).unwrap();
        lines.upsert(&line(2, "10.00", 3, "0.150"), 20, None);
        lines.upsert(&line(1, "2.50", 2, "0"), 10, None);
        assert_eq!(ids(&lines), [1, 2]);
        // A replayed older image of line 2 changes nothing.
        lines.upsert(&line(2, "99.00", 9, "0"), 15, None);
        assert_eq!(lines.lines[1].get_i32("quantity").unwrap(), 3);
        // Removed, then a late insert of the same line older than the removal: it stays gone.
        lines.remove(1, 30);
        lines.upsert(&line(1, "2.50", 2, "0"), 25, None);
        assert_eq!(ids(&lines), [2]);
        assert_eq!(lines.removed, BTreeMap::from([(1, 30)]));
        // A TRUNCATE newer than every line empties the order.
        lines.truncate(40);
        assert!(lines.lines.is_empty());
        assert!(lines.changed);
    }

    #[test]
    fn a_product_copy_keeps_the_newer_of_read_and_stored_even_on_replay() {
        let product = |price: &str, v: i64| doc! { "name": "Tent", "price": decimal(price.parse().unwrap()), "_v": v };
        let copy = |lines: &OrderLines| lines.lines[0].get_document("product").unwrap().get_i64("_v").unwrap();
        let stored = |lines: &OrderLines| {
            let lines: RawArrayBuf = lines.lines.iter().cloned().collect();
            rawdoc! { "lines": lines, "_removed": [] }
        };
        let mut lines = OrderLines::stored(None).unwrap();
        lines.upsert(&line(1, "10.00", 1, "0"), 10, Some(&encode(&product("19.90", 5))));
        // A fan-out wrote a newer copy meanwhile; a newer change of the line read the older product.
        lines.lines[0] = with_product(&lines.lines[0], encode(&product("21.00", 8)));
        lines.upsert(&line(1, "10.00", 2, "0"), 20, Some(&encode(&product("19.90", 5))));
        assert_eq!((lines.lines[0].get_i32("quantity").unwrap(), copy(&lines)), (2, 8));
        // A replay (not newer than the line) with a newer product mends the copy, and only the copy.
        let mut replay = OrderLines::stored(Some(&stored(&lines))).unwrap();
        replay.upsert(&line(1, "99.00", 9, "0"), 20, Some(&encode(&product("22.00", 9))));
        assert_eq!((replay.lines[0].get_i32("quantity").unwrap(), copy(&replay)), (2, 9));
        assert!(replay.changed);
        // A line not known to a product yet (null copy) is mended by a replay too.
        let mut unknown = OrderLines::stored(None).unwrap();
        unknown.upsert(&line(2, "1.00", 1, "0"), 30, None);
        let mut replay = OrderLines::stored(Some(&stored(&unknown))).unwrap();
        replay.upsert(&line(2, "1.00", 1, "0"), 30, Some(&encode(&product("19.90", 5))));
        assert_eq!(copy(&replay), 5);
    }

    #[test]
    fn totals_match_the_contract_and_a_known_product_is_embedded() {
        let product = doc! { "name": "Tent", "price": decimal("498.80".parse().unwrap()), "_v": 5_i64, "_touch": 3 };
        let mut lines = OrderLines::stored(None).unwrap();
        let rows = [line(1, "10.00", 3, "0.150"), line(2, "2.50", 2, "0"), line(3, "0.05", 1, "0.500")];
        for (i, row) in rows.iter().enumerate() {
            lines.upsert(row, 10 + i as i64, Some(&encode(&product)));
        }
        let expected: Vec<_> = rows.iter().map(|r| (r.unit_price, r.quantity, r.discount)).collect();
        assert_eq!(lines.totals().unwrap(), readmodel::order_totals(&expected));
        let embedded = lines.lines[0].get_document("product").unwrap();
        assert_eq!(
            embedded,
            &*encode(&doc! { "name": "Tent", "price": decimal("498.80".parse().unwrap()), "_v": 5_i64 })
        );
        // Unchanged lines write nothing.
        let stored: RawArrayBuf = lines.lines.iter().cloned().collect();
        let mut again = OrderLines::stored(Some(&rawdoc! { "lines": stored, "_removed": [] })).unwrap();
        again.upsert(&rows[0], 10, None);
        assert!(again.write(7, false).unwrap().is_none());
    }

    #[test]
    fn an_order_not_read_is_inserted_when_catching_up_and_merged_into_when_live() {
        let new_order = || {
            let mut lines = OrderLines::stored(None).unwrap();
            lines.upsert(&line(1, "10.00", 3, "0.150"), 10, None);
            lines
        };
        let Some(LinesWrite::Insert(document)) = new_order().write(7, false).unwrap() else {
            panic!("a catch-up inserts an order it did not find")
        };
        assert_eq!((document.get_i32("_id").unwrap(), document.get_i64("_lv").unwrap()), (7, 1));
        // Live: an upsert that merges into a header the orders job wrote meanwhile (no `_lv`), and collides
        // only with another writer of lines.
        let Some(LinesWrite::Update(statement)) = new_order().write(7, true).unwrap() else {
            panic!("a live batch upserts an order it did not find")
        };
        // (How such a write merges and collides against a real mongod: tests/sink.rs.)
        let mut lines = new_order();
        lines.changed = true;
        let fields = rawdoc! { "lines": lines.lines.iter().cloned().collect::<RawArrayBuf>(), "_removed": [], "totals": lines.totals().unwrap() };
        assert_eq!(statement, set_if_unchanged(7, None, fields));
    }
}
