//! Projections: from a batch of one table's change events to the MongoDB writes that bring the read models
//! up to date. This is where the CDC semantics live; the runtime and the sink know nothing of tables.
//!
//! Every write is guarded by the source position (`_v`, the change's WAL position) of what it writes: a
//! document, an embedded line or an embedded product reference changes only when the incoming position is
//! newer. Guards are pipeline updates with `$cond`, never filters that make an upsert collide, so a stale
//! write is a no-op and not an error. Guarded writes of one document commute and a replay changes nothing,
//! which is what lets the sink write them outside transactions (see [`crate::sink`]); the one
//! read-modify-write, an order's lines, is conditional on the version it read (see [`order_details`]).
//! A document that does not exist yet is inserted instead ([`Existing`]): where there is none, the guarded
//! write would write exactly that, and an insert that finds its `_id` taken falls back to it.
//! Deletes leave a tombstone document (`_deleted: true` with its `_v`) so that a replayed older insert
//! cannot resurrect the row; readers and `verify` skip tombstones and every field whose name starts with `_`
//! other than `_id`.
//!
//! A copy of another job's data (a product's name and price in lines, an order's status in order_details)
//! is written by both sides: the job that owns the data writes its document and then fans the change out
//! to the copies it finds; the job that copies writes the copy and then reads the data again, and fans it
//! out itself when it changed meanwhile. Whatever the interleaving, one of the two sees the other.

pub mod order_details;
pub mod orders;
pub mod products;

use std::collections::HashSet;

use bson::{Bson, Decimal128, Document, RawBsonRef, RawDocument, RawDocumentBuf, cstr, doc, rawdoc};

use crate::envelope::Event;
use crate::sink::ReadModels;

/// A read collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Collection {
    Products,
    Orders,
    OrderDetails,
}

impl Collection {
    pub const ALL: [Collection; 3] = [Collection::Products, Collection::Orders, Collection::OrderDetails];

    /// The keys of the secondary indexes: what the projections' fan-out updates query by, and the order
    /// listings of the query service (by customer, by status, paged in `_id` order).
    pub fn indexes(self) -> Vec<Document> {
        match self {
            Collection::Products => Vec::new(),
            Collection::Orders => vec![doc! { "customer_name": 1, "_id": 1 }, doc! { "status": 1, "_id": 1 }],
            // (product_id, order_id): the orders a product's change fans out to, from the index alone. An order's
            // status reaches its order_details by the ids of its embedded lines: no index by order.
            Collection::OrderDetails => vec![doc! { "product_id": 1, "order_id": 1 }],
        }
    }

    /// Indexes earlier versions created and no query uses any more (every write pays for an index): dropped
    /// where found. `lines.product_id` (multikey, rewritten with every order's lines) gave way to
    /// `order_details`' (product_id, order_id), and `order_details`' `order_id` to the ids of an order's lines
    /// (an insert of an order line cost MongoDB 13% less CPU without it).
    pub fn retired_indexes(self) -> &'static [&'static str] {
        match self {
            Collection::Products => &[],
            Collection::Orders => &["lines.product_id_1"],
            Collection::OrderDetails => &["product_id_1", "order_id_1"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Collection::Products => "products",
            Collection::Orders => "orders",
            Collection::OrderDetails => "order_details",
        }
    }
}

/// One statement of a MongoDB `update` command (`{q, u, upsert, multi, arrayFilters}`), encoded: a catch-up
/// batch holds thousands, and as BSON bytes they take a tenth of the memory they take as documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub collection: Collection,
    pub statement: RawDocumentBuf,
}

impl Write {
    pub fn new(collection: Collection, statement: Document) -> Write {
        Write { collection, statement: encode(&statement) }
    }

    /// A statement built as raw BSON already (the ones written once per change).
    pub fn raw(collection: Collection, statement: RawDocumentBuf) -> Write {
        Write { collection, statement }
    }
}

/// A statement as BSON bytes.
pub fn encode(statement: &Document) -> RawDocumentBuf {
    RawDocumentBuf::try_from(statement).expect("statements have constant keys, and constant keys hold no NUL")
}

/// Below this many changes a batch is live (a catch-up's are thousands): its time is its round trips, not
/// MongoDB's CPU, and its new documents are as likely as not written by another job at the same moment (a
/// new order's header and lines reach the orders and order_details jobs together). There, an upsert that
/// merges costs nothing extra, where an insert that finds the `_id` taken costs a failed write and a redo.
pub const LIVE_BELOW: usize = 1000;

/// Which of a batch's documents exist: one that does not is inserted whole (an `insert` costs MongoDB a third
/// of a guarded upsert), the others get their guarded write. An insert writes exactly what the guarded
/// write would where no document exists, and one that finds its `_id` taken falls back to it (see
/// [`ReadModels::write_or_insert`]). A batch holding a TRUNCATE inserts none of its table's documents: their
/// writes must stay in order with it.
pub struct Existing(Option<HashSet<i32>>);

impl Existing {
    /// Reads which of `events`' rows (by `key`) have a document in `collection`, unless `events` hold a
    /// TRUNCATE.
    pub async fn read<R>(
        store: &ReadModels<'_>,
        collection: Collection,
        events: &[Event<R>],
        key: impl Fn(&R) -> i32,
    ) -> anyhow::Result<Existing> {
        if truncates(events) {
            return Ok(Existing(None));
        }
        let mut ids: Vec<i32> = events.iter().filter_map(|e| e.row().map(&key)).collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(Existing(Some(store.existing(collection, &ids).await?)))
    }

    /// Insert nothing: every change gets its guarded write (an upsert), so no insert can collide with a
    /// document another job creates meanwhile (see [`LIVE_BELOW`]).
    pub fn none() -> Existing {
        Existing(None)
    }

    /// Existing as already read (`ids`), unless `events` hold a TRUNCATE.
    pub fn known<R>(ids: impl IntoIterator<Item = i32>, events: &[Event<R>]) -> Existing {
        Existing((!truncates(events)).then(|| ids.into_iter().collect()))
    }

    /// Whether `id`'s document is to be inserted.
    pub fn is_new(&self, id: i32) -> bool {
        self.0.as_ref().is_some_and(|existing| !existing.contains(&id))
    }

    /// Writes `events` to `collection`: the document `new` makes of an event whose row (by `key`) has none
    /// yet is inserted, the others get their `guarded` writes, all at once (see
    /// [`ReadModels::write_or_insert`]); an insert that finds its `_id` taken gets the same guarded write.
    /// Returns the events whose insert found the `_id` taken.
    pub async fn write<'e, R: Sync, W: IntoIterator<Item = Write>>(
        &self,
        store: &ReadModels<'_>,
        collection: Collection,
        events: &'e [Event<R>],
        key: impl Fn(&R) -> i32,
        new: impl Fn(&Event<R>) -> Option<RawDocumentBuf>,
        guarded: impl Fn(&Event<R>) -> W,
    ) -> anyhow::Result<Vec<&'e Event<R>>> {
        let (inserts, writes) = self.split(events, key, new, &guarded);
        store.write_or_insert(writes, collection, inserts, |e| guarded(e)).await
    }

    /// `events` as written: the document `new` makes of an event whose row (by `key`) has none yet, with
    /// the event (for the insert's fallback), and the `guarded` writes of the others.
    fn split<'e, R, W: IntoIterator<Item = Write>>(
        &self,
        events: &'e [Event<R>],
        key: impl Fn(&R) -> i32,
        new: impl Fn(&Event<R>) -> Option<RawDocumentBuf>,
        guarded: impl Fn(&Event<R>) -> W,
    ) -> (Vec<(&'e Event<R>, RawDocumentBuf)>, Vec<Write>) {
        let (mut inserts, mut writes) = (Vec::new(), Vec::with_capacity(events.len()));
        for event in events {
            match event.row().filter(|r| self.is_new(key(r))).and_then(|_| new(event)) {
                Some(document) => inserts.push((event, document)),
                None => writes.extend(guarded(event)),
            }
        }
        (inserts, writes)
    }
}

/// Whether `events` hold a TRUNCATE.
fn truncates<R>(events: &[Event<R>]) -> bool {
    events.iter().any(|e| matches!(e, Event::Truncate { .. }))
}

/// `{$literal: v}`: a value inside an aggregation expression that must never be read as a field path or
/// an operator (a product called "$5 deal" stays a name).
pub fn literal(v: impl Into<Bson>) -> Bson {
    Bson::Document(doc! { "$literal": v.into() })
}

/// Field `key` of a document as read (raw BSON, see [`crate::sink::ReadModels::fields`]), if it has one.
pub fn field<'a>(document: &'a RawDocument, key: &str) -> Option<RawBsonRef<'a>> {
    document.get(key).ok().flatten()
}

/// Field `key` of a document as read, as a value to copy into a write (`null` when it has none).
pub fn value(document: &RawDocument, key: &str) -> Bson {
    field(document, key).and_then(|b| Bson::try_from(b).ok()).unwrap_or(Bson::Null)
}

/// True when `position` is newer than the version `$_v` of the document being updated.
fn newer(position: i64) -> RawDocumentBuf {
    rawdoc! { "$gt": [ position, { "$ifNull": [ "$_v", -1_i64 ] } ] }
}

/// Replaces the document by `replacement` (an aggregation expression) if `position` is newer than its `_v`,
/// else leaves it.
pub fn guarded_replace(id: i32, position: i64, replacement: RawDocumentBuf) -> RawDocumentBuf {
    rawdoc! {
        "q": { "_id": id },
        "u": [ { "$replaceWith": { "$cond": [ newer(position), replacement, "$$ROOT" ] } } ],
        "upsert": true,
    }
}

/// Sets `fields` (literals) on document `id` if its lines version `_lv` is still `read` (`None`: it has
/// none), and moves that version on; else the statement fails ([`crate::sink::CHANGED_SINCE_READ`]), which
/// [`crate::sink::ReadModels::write_if_unchanged`] reports as lost. An upsert: where no document is, or one
/// without a version (a header the orders job wrote), the fields are merged in. The filter is the `_id`
/// alone, MongoDB's fast path, which a filter on `_lv` too is not (~10% less of its CPU for an order's lines,
/// bench/HISTORY.md, session 25).
pub fn set_if_unchanged(id: i32, read: Option<i64>, fields: RawDocumentBuf) -> RawDocumentBuf {
    let (unchanged, next) = match read {
        Some(v) => (rawdoc! { "$eq": [ "$_lv", v ] }, v + 1),
        None => (rawdoc! { "$eq": [ { "$type": "$_lv" }, "missing" ] }, 1),
    };
    let mut set = RawDocumentBuf::new();
    for (key, value) in fields.iter().filter_map(Result::ok) {
        let mut literal = RawDocumentBuf::new();
        literal.append(cstr!("$literal"), value);
        set.append(key, literal);
    }
    // `$toInt` of text fails the statement: an aggregation expression has no other way to.
    set.append(cstr!("_lv"), rawdoc! { "$cond": [ unchanged, next, { "$toInt": "changed since read" } ] });
    rawdoc! { "q": { "_id": id }, "u": [ { "$set": set } ], "upsert": true }
}

/// A tombstone: the row is gone as of `position`.
pub fn tombstone(id: i32, position: i64) -> RawDocumentBuf {
    rawdoc! { "_id": id, "_deleted": true, "_v": position }
}

/// Turns every document of a collection older than `position` into a tombstone (a TRUNCATE).
pub fn truncate_all(position: i64) -> Document {
    doc! {
        "q": { "_v": { "$not": { "$gte": position } } },
        "u": [ { "$replaceWith": { "_id": "$_id", "_deleted": true, "_v": { "$literal": position } } } ],
        "multi": true,
    }
}

/// A Decimal128 as BSON, exactly (keeps the scale: 11.00 stays 11.00), for the tests' documents; the read
/// models' money goes through [`crate::readmodel::money`].
#[cfg(test)]
pub fn decimal(d: rust_decimal::Decimal) -> Bson {
    Bson::Decimal128(decimal128(d))
}

/// A decimal as BSON Decimal128, exactly (keeps the scale: 11.00 stays 11.00).
///
/// Encoded straight from the coefficient and scale (IEEE 754-2008 binary integer decimal: sign, 14-bit
/// exponent biased by 6176, 113-bit coefficient): a rust_decimal's 96-bit mantissa always fits, and this is
/// a hundred times faster than printing and parsing, which first_load does millions of times.
pub fn decimal128(d: rust_decimal::Decimal) -> Decimal128 {
    const EXPONENT_BIAS: i128 = 6176;
    let sign = u128::from(d.is_sign_negative() && !d.is_zero()) << 127;
    let exponent = ((EXPONENT_BIAS - i128::from(d.scale())) as u128) << 113;
    let coefficient = d.mantissa().unsigned_abs();
    Decimal128::from_bytes((sign | exponent | coefficient).to_le_bytes())
}

/// The exact value of a Decimal128 this project wrote (the inverse of [`decimal`]); `None` for anything else
/// (not a Decimal128, infinities, NaN, or beyond rust_decimal's 28 digits of scale and 96-bit mantissa).
pub fn decimal_of(b: &Bson) -> Option<rust_decimal::Decimal> {
    let Bson::Decimal128(d) = b else { return None };
    decimal_of_128(*d)
}

/// [`decimal_of`] of a Decimal128 itself.
pub fn decimal_of_128(d: Decimal128) -> Option<rust_decimal::Decimal> {
    let bits = u128::from_le_bytes(d.bytes());
    if (bits >> 125) & 0b11 == 0b11 {
        return None; // the large-coefficient form, infinity or NaN: never written by `decimal`
    }
    let exponent = ((bits >> 113) & 0x3FFF) as i64 - 6176;
    let coefficient = bits & ((1_u128 << 113) - 1);
    if !(-28..=0).contains(&exponent) || coefficient >= 1 << 96 {
        return None;
    }
    let signed = if bits >> 127 == 1 { -(coefficient as i128) } else { coefficient as i128 };
    Some(rust_decimal::Decimal::from_i128_with_scale(signed, (-exponent) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact_decimal128() {
        for text in
            ["498.80", "0.00", "0", "-12.345", "0.150", "99999999.99", "-0.01", "1", "79228162514264337593543950335"]
        {
            let d: rust_decimal::Decimal = text.parse().unwrap();
            let parsed: bson::Decimal128 = text.parse().unwrap();
            assert_eq!(decimal(d), Bson::Decimal128(parsed), "{text}");
            assert_eq!(decimal(d).to_string(), text);
            let back = decimal_of(&decimal(d)).unwrap();
            assert_eq!((back, back.scale()), (d, d.scale()), "{text}");
        }
        assert_eq!(decimal_of(&Bson::Decimal128("1E+3".parse().unwrap())), None);
        assert_eq!(decimal_of(&Bson::Int32(3)), None);
    }
}
