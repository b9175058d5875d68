//! `stream_products`: keeps the `products` read model, and the product data embedded in orders and
//! order_details, in step with the `products` table.

fn main() -> std::process::ExitCode {
    cdc_cqrs::runtime::main(
        cdc_cqrs::projection::products::ProductsJob,
        "Stream the changes of `products` into the MongoDB read models: the `products` documents, the \
         product name and price embedded in order lines, and `order_details.product_name`.",
    )
}
