//! `stream_order_details`: keeps the `order_details` read model, and the lines and totals embedded in
//! `orders`, in step with the `order_details` table.

fn main() -> std::process::ExitCode {
    cdc_cqrs::runtime::main(
        cdc_cqrs::projection::order_details::OrderDetailsJob,
        "Stream the changes of `order_details` into the MongoDB read models: the `order_details` documents \
         (with product name and order status) and each order's embedded `lines` and `totals`.",
    )
}
