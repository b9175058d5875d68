//! Command-line and environment configuration shared by the binaries.
//!
//! Every setting is a flag with an environment variable behind it and a default that matches the local
//! stack (`scripts/stack`), so a binary runs with no flags on a developer machine. Passwords are read from
//! the environment only (`PGPASSWORD`, `DEBEZIUM_PASSWORD`), never from a default.

use clap::Args;

/// Where the write model lives.
#[derive(Debug, Clone, Args)]
pub struct PgArgs {
    /// PostgreSQL server URL, as a superuser or the schema owner. Its database part is only used to reach
    /// the server (see --database). Without a password in the URL, PGPASSWORD is used.
    #[arg(long = "pg-url", env = "CDC_PG_URL", default_value = "postgres://postgres@127.0.0.1:55432/postgres")]
    pub url: String,

    /// Database that holds the write model.
    #[arg(long = "database", env = "CDC_PG_DATABASE", default_value = "ecommerce")]
    pub database: String,
}

/// Where the Kafka-protocol broker is.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, comma separated.
    #[arg(long = "brokers", env = "CDC_KAFKA_BROKERS", default_value = "127.0.0.1:59092")]
    pub brokers: String,

    /// Topic prefix the Debezium connector writes under (`<prefix>.public.<table>`).
    #[arg(long = "topic-prefix", env = "CDC_TOPIC_PREFIX", default_value = "ecommerce")]
    pub topic_prefix: String,
}

impl KafkaArgs {
    /// The change topic Debezium writes for one table.
    pub fn table_topic(&self, table: &str) -> String {
        format!("{}.public.{}", self.topic_prefix, table)
    }
}

/// Where the read models live.
#[derive(Debug, Clone, Args)]
pub struct MongoArgs {
    /// MongoDB holding the read models (a replica set: batches are transactions).
    #[arg(
        id = "mongo_uri",
        long = "mongo-uri",
        env = "CDC_MONGO_URI",
        default_value = "mongodb://127.0.0.1:57017/?directConnection=true"
    )]
    pub uri: String,

    /// MongoDB database of the read models.
    #[arg(id = "mongo_database", long = "mongo-database", env = "CDC_MONGO_DATABASE", default_value = "ecommerce")]
    pub database: String,
}
