//! Decoding Debezium's JSON change events (the first step of every stream job).
//!
//! A record of a table topic is one of: a change (`op` = `r` snapshot read, `c`, `u`, `d`), a tombstone
//! (null value after a delete, kept for compaction), a truncate (`op` = `t`, no rows), or something this
//! project does not produce or know. Rows decode straight into the table's typed row in one pass; money
//! stays exact (`decimal.handling.mode=string`). A column whose unchanged TOASTed value Debezium could not
//! read arrives as [`UNAVAILABLE`] and decodes to [`Toasted::Unavailable`], so no projection can write the
//! placeholder into a read model by mistake. Anything malformed is a [`DecodeError`] with the reason the
//! dead-letter topic records.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Debezium's stand-in for an unchanged TOASTed value it could not read.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// A column value that may be Debezium's unavailable-value placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Toasted<T> {
    Value(T),
    /// Unchanged by this change and not sent: keep what the read model has.
    Unavailable,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Toasted<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            Placeholder(Placeholder),
            Value(T),
        }
        #[derive(Deserialize)]
        enum Placeholder {
            #[serde(rename = "__debezium_unavailable_value")]
            Unavailable,
        }
        Ok(match Raw::<T>::deserialize(d)? {
            Raw::Placeholder(Placeholder::Unavailable) => Toasted::Unavailable,
            Raw::Value(v) => Toasted::Value(v),
        })
    }
}

/// Where a change comes from in the source database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// WAL position of the change: for one row, a later change always has a higher one.
    pub lsn: u64,
    /// The writing transaction, to decide whether first_load's snapshot already holds the change.
    pub tx_id: Option<u64>,
    /// Commit time in the source, epoch milliseconds.
    pub ts_ms: i64,
    /// Read by Debezium's snapshot rather than from the WAL.
    pub snapshot: bool,
    /// Where the job read the change (set by the runtime: the payload does not say).
    pub place: Option<Place>,
    /// Sent back from the dead-letter topic (set by the runtime, from the record's headers).
    pub redriven: bool,
}

/// A record's place in its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub partition: i32,
    pub offset: i64,
}

/// `source` as Debezium writes it; its text is borrowed from the record (decoding allocates only rows).
#[derive(Deserialize)]
struct RawSource<'a> {
    lsn: u64,
    #[serde(rename = "txId")]
    tx_id: Option<u64>,
    ts_ms: i64,
    #[serde(borrow)]
    table: Cow<'a, str>,
    /// "true", "false", "first", "last", "incremental"...
    #[serde(default, borrow)]
    snapshot: Option<Cow<'a, str>>,
}

/// One decoded record of a table topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<R> {
    /// `c`, `u` or `r`: the row as it is after the change, and for `u` as it was before.
    Upsert { row: R, before: Option<R>, source: Source },
    /// `d`: the row is gone; `before` is the old row (REPLICA IDENTITY FULL).
    Delete { before: R, source: Source },
    /// `t`: every row of the table is gone.
    Truncate { source: Source },
    /// The null-value record that follows a delete: nothing to do.
    Tombstone,
}

impl<R> Event<R> {
    /// The row a change is about: the new image of an upsert, the old one of a delete.
    pub fn row(&self) -> Option<&R> {
        match self {
            Event::Upsert { row, .. } | Event::Delete { before: row, .. } => Some(row),
            Event::Truncate { .. } | Event::Tombstone => None,
        }
    }

    /// The change's origin (none for a tombstone).
    pub fn source(&self) -> Option<&Source> {
        match self {
            Event::Upsert { source, .. } | Event::Delete { source, .. } | Event::Truncate { source } => Some(source),
            Event::Tombstone => None,
        }
    }

    /// The change read at `place` of its topic (`redriven`: a copy sent back from the dead-letter topic).
    pub fn at(mut self, place: Place, redriven: bool) -> Self {
        if let Event::Upsert { source, .. } | Event::Delete { source, .. } | Event::Truncate { source } = &mut self {
            source.place = Some(place);
            source.redriven = redriven;
        }
        self
    }
}

/// Why a record could not be decoded: what the dead-letter topic records as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("value is not a Debezium JSON envelope: {0}")]
    Malformed(String),
    #[error("unknown op '{0}'")]
    UnknownOp(String),
    #[error("op '{op}' without its {missing} image")]
    MissingImage { op: String, missing: &'static str },
    #[error("event of table '{found}' on the topic of table '{expected}'")]
    WrongTable { expected: String, found: String },
}

#[derive(Deserialize)]
struct Envelope<'a, R> {
    before: Option<R>,
    after: Option<R>,
    #[serde(borrow)]
    source: RawSource<'a>,
    #[serde(borrow)]
    op: Cow<'a, str>,
}

/// Decodes the value of a record from `table`'s topic (`None` for a tombstone).
pub fn decode<R: DeserializeOwned>(table: &str, value: Option<&[u8]>) -> Result<Event<R>, DecodeError> {
    let Some(bytes) = value else { return Ok(Event::Tombstone) };
    let envelope: Envelope<R> = serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let raw = envelope.source;
    if raw.table != table {
        return Err(DecodeError::WrongTable { expected: table.to_owned(), found: raw.table.into_owned() });
    }
    let snapshot = raw.snapshot.is_some_and(|s| s != "false");
    let source = Source { lsn: raw.lsn, tx_id: raw.tx_id, ts_ms: raw.ts_ms, snapshot, place: None, redriven: false };
    let missing = |op: &str, missing| DecodeError::MissingImage { op: op.to_owned(), missing };
    match envelope.op.as_ref() {
        "c" | "u" | "r" => {
            let row = envelope.after.ok_or_else(|| missing(&envelope.op, "after"))?;
            Ok(Event::Upsert { row, before: envelope.before, source })
        }
        "d" => {
            let before = envelope.before.ok_or_else(|| missing("d", "before"))?;
            Ok(Event::Delete { before, source })
        }
        "t" => Ok(Event::Truncate { source }),
        other => Err(DecodeError::UnknownOp(other.to_owned())),
    }
}

/// The WAL position of the change in a record's value, if it has one where Debezium writes it: what a record
/// that does not decode (an older job's `DecodeError`) may still tell.
pub fn lsn_of(value: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Position {
        lsn: u64,
    }
    #[derive(Deserialize)]
    struct Positioned {
        source: Position,
    }
    serde_json::from_slice::<Positioned>(value).ok().map(|p| p.source.lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Deserialize)]
    struct Product {
        product_id: i32,
        name: String,
        description: Option<Toasted<String>>,
        #[serde(with = "rust_decimal::serde::str")]
        price: rust_decimal::Decimal,
    }

    // Real events, as Debezium 3.1 wrote them on this project's stack.
    const UPDATE: &str = r#"{"before":{"product_id":10,"name":"Tent","description":"Handmade","price":"498.82","stock_quantity":469},"after":{"product_id":10,"name":"Tent","description":"Handmade","price":"498.82","stock_quantity":485},"source":{"version":"3.1.1.Final","connector":"postgresql","name":"ecommerce","ts_ms":1795318650199,"snapshot":"false","db":"ecommerce","sequence":"[\"31602848\",\"31602848\"]","ts_us":1795318650199586,"ts_ns":1795318650199586000,"schema":"public","table":"products","txId":939,"lsn":31602848,"xmin":null},"transaction":null,"op":"u","ts_ms":1795318650553}"#;
    const DELETE: &str = r#"{"before":{"product_id":10,"name":"Tent","description":null,"price":"1.50","stock_quantity":1},"after":null,"source":{"ts_ms":1,"snapshot":"false","table":"products","txId":940,"lsn":31602900},"op":"d","ts_ms":2}"#;

    #[test]
    fn a_position_is_read_from_whatever_holds_one() {
        assert_eq!(lsn_of(UPDATE.as_bytes()), Some(31602848));
        assert_eq!(lsn_of(br#"{"op":"x","source":{"lsn":77}}"#), Some(77), "an op this version does not know");
        assert_eq!(lsn_of(b"{not json"), None);
        assert_eq!(lsn_of(br#"{"source":{"lsn":"77"}}"#), None);
    }

    #[test]
    fn an_update_decodes_to_the_row_after_with_exact_money_and_its_position() {
        let event: Event<Product> = decode("products", Some(UPDATE.as_bytes())).unwrap();
        let Event::Upsert { row, before, source } = event else { panic!("{event:?}") };
        assert_eq!(before.map(|b| b.price.to_string()), Some("498.82".into()));
        assert_eq!(row.product_id, 10);
        assert_eq!(row.price.to_string(), "498.82");
        assert_eq!(row.description, Some(Toasted::Value("Handmade".into())));
        assert_eq!((source.lsn, source.tx_id, source.snapshot), (31602848, Some(939), false));
    }

    #[test]
    fn a_delete_carries_the_old_row_and_a_null_value_is_a_tombstone() {
        let event: Event<Product> = decode("products", Some(DELETE.as_bytes())).unwrap();
        assert!(
            matches!(event, Event::Delete { ref before, .. } if before.product_id == 10 && before.description.is_none())
        );
        assert_eq!(decode::<Product>("products", None).unwrap(), Event::Tombstone);
    }

    #[test]
    fn the_toast_placeholder_never_decodes_as_text() {
        let json = UPDATE.replace(
            r#""after":{"product_id":10,"name":"Tent","description":"Handmade""#,
            &format!(r#""after":{{"product_id":10,"name":"Tent","description":"{UNAVAILABLE}""#),
        );
        let Event::Upsert { row, .. } = decode::<Product>("products", Some(json.as_bytes())).unwrap() else { panic!() };
        assert_eq!(row.description, Some(Toasted::Unavailable));
    }

    #[test]
    fn truncate_snapshot_reads_and_bad_records_are_told_apart() {
        let truncate = r#"{"before":null,"after":null,"source":{"ts_ms":1,"snapshot":"false","table":"products","txId":5,"lsn":77},"op":"t","ts_ms":2}"#;
        assert!(matches!(decode::<Product>("products", Some(truncate.as_bytes())), Ok(Event::Truncate { .. })));
        let read =
            UPDATE.replace(r#""op":"u""#, r#""op":"r""#).replace(r#""snapshot":"false""#, r#""snapshot":"last""#);
        assert!(
            matches!(decode::<Product>("products", Some(read.as_bytes())), Ok(Event::Upsert { ref source, .. }) if source.snapshot)
        );

        let unknown = UPDATE.replace(r#""op":"u""#, r#""op":"m""#);
        assert_eq!(decode::<Product>("products", Some(unknown.as_bytes())), Err(DecodeError::UnknownOp("m".into())));
        let no_after = DELETE.replace(r#""op":"d""#, r#""op":"c""#);
        assert!(matches!(
            decode::<Product>("products", Some(no_after.as_bytes())),
            Err(DecodeError::MissingImage { .. })
        ));
        assert!(matches!(decode::<Product>("products", Some(b"not json")), Err(DecodeError::Malformed(_))));
        let bad_money =
            UPDATE.replace(r#""price":"498.82","stock_quantity":485"#, r#""price":"lots","stock_quantity":485"#);
        assert!(matches!(decode::<Product>("products", Some(bad_money.as_bytes())), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<Product>("orders", Some(UPDATE.as_bytes())), Err(DecodeError::WrongTable { .. })));
        let heartbeat = r#"{"ts_ms":1795318650553}"#;
        assert!(matches!(decode::<Product>("products", Some(heartbeat.as_bytes())), Err(DecodeError::Malformed(_))));
    }
}
