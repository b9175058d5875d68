//! `stream_orders`: keeps the header fields of the `orders` read model, and the order status embedded in
//! order_details, in step with the `orders` table.

fn main() -> std::process::ExitCode {
    cdc_cqrs::runtime::main(
        cdc_cqrs::projection::orders::OrdersJob,
        "Stream the changes of `orders` into the MongoDB read models: the header fields of the `orders` \
         documents (never their lines) and `order_details.order_status`.",
    )
}
