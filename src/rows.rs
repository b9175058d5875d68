//! The write model's rows as the change stream carries them (decoded by [`crate::envelope`]).

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::envelope::Toasted;

/// A row of `products`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Product {
    pub product_id: i32,
    pub name: String,
    /// `text`, so the only column that can be TOASTed.
    pub description: Option<Toasted<String>>,
    #[serde(with = "rust_decimal::serde::str")]
    pub price: Decimal,
    pub stock_quantity: i32,
}

/// A row of `orders`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Order {
    pub order_id: i32,
    pub customer_name: String,
    pub address: String,
    pub phone: String,
    /// Epoch microseconds: Debezium sends a `timestamp` as those (`adaptive_time_microseconds`) and a
    /// `timestamptz` as ISO 8601 text, so a migration from one to the other goes on streaming.
    #[serde(default, deserialize_with = "epoch_micros")]
    pub order_date: Option<i64>,
    pub status: Option<String>,
}

/// A timestamp as epoch microseconds, from either of Debezium's encodings (a number for `timestamp`, text
/// with its offset for `timestamptz`).
fn epoch_micros<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct Micros;
    impl<'de> serde::de::Visitor<'de> for Micros {
        type Value = Option<i64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("epoch microseconds or an ISO 8601 timestamp with its offset")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_i64<E: serde::de::Error>(self, us: i64) -> Result<Self::Value, E> {
            Ok(Some(us))
        }

        fn visit_u64<E: serde::de::Error>(self, us: u64) -> Result<Self::Value, E> {
            i64::try_from(us).map(Some).map_err(|_| E::custom(format!("timestamp {us} us is out of range")))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let at = chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|e| E::custom(format!("timestamp {text:?} is not ISO 8601 with an offset: {e}")))?;
            Ok(Some(at.timestamp_micros()))
        }
    }
    d.deserialize_any(Micros)
}

/// A row of `order_details`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OrderDetail {
    pub order_detail_id: i32,
    pub order_id: i32,
    pub product_id: i32,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    pub quantity: i32,
    #[serde(with = "rust_decimal::serde::str")]
    pub discount: Decimal,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_date(value: serde_json::Value) -> Result<Option<i64>, serde_json::Error> {
        let mut row = serde_json::json!({ "order_id": 1, "customer_name": "a", "address": "b", "phone": "c" });
        row["order_date"] = value;
        serde_json::from_value::<Order>(row).map(|o| o.order_date)
    }

    #[test]
    fn an_order_date_decodes_from_timestamp_and_timestamptz_alike() {
        let us = 1_764_000_000_123_456_i64;
        assert_eq!(order_date(serde_json::json!(us)).unwrap(), Some(us));
        assert_eq!(order_date(serde_json::json!("2025-11-24T16:00:00.123456Z")).unwrap(), Some(us));
        // Debezium writes timestamptz in UTC, but an offset is honoured.
        assert_eq!(order_date(serde_json::json!("2025-11-24T17:30:00.123456+01:30")).unwrap(), Some(us));
        assert_eq!(order_date(serde_json::json!("2025-11-24T16:00:00Z")).unwrap(), Some(us - 123_456));
        assert_eq!(order_date(serde_json::json!(-1)).unwrap(), Some(-1));
        assert_eq!(order_date(serde_json::Value::Null).unwrap(), None);
        let without = serde_json::json!({ "order_id": 1, "customer_name": "a", "address": "b", "phone": "c" });
        assert_eq!(serde_json::from_value::<Order>(without).unwrap().order_date, None);
        let err = order_date(serde_json::json!("yesterday")).unwrap_err().to_string();
        assert!(err.contains("\"yesterday\" is not ISO 8601"), "{err}");
        assert!(order_date(serde_json::json!(true)).is_err());
    }
}
