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
    /// Epoch microseconds (Debezium's `adaptive_time_microseconds`).
    pub order_date: Option<i64>,
    pub status: Option<String>,
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
