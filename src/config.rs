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

    /// Extra librdkafka settings, `key=value`, separated by spaces in the environment variable (e.g.
    /// "security.protocol=SASL_SSL sasl.mechanism=PLAIN sasl.username=... sasl.password=..."): what a
    /// managed cluster needs, or tuning. Applied over the project's own settings.
    #[arg(long = "kafka-option", env = "CDC_KAFKA_OPTIONS", value_delimiter = ' ', value_parser = KafkaOptionParser)]
    pub options: Vec<KafkaOption>,
}

/// One librdkafka setting given by the user. Its value may be a secret: never printed.
#[derive(Clone)]
pub struct KafkaOption {
    pub key: String,
    pub value: String,
}

/// Parses `key=value`; its error never repeats the text (clap's usual one would: it may be a password
/// given without its key).
#[derive(Clone)]
struct KafkaOptionParser;

impl clap::builder::TypedValueParser for KafkaOptionParser {
    type Value = KafkaOption;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KafkaOption, clap::Error> {
        match value.to_str().and_then(|text| text.split_once('=')) {
            Some((key, value)) if !key.trim().is_empty() => {
                let key = key.trim();
                // librdkafka's own complaint quotes the value.
                if rdkafka::ClientConfig::new().set(key, value).create_native_config().is_err() {
                    let message = format!(
                        "--kafka-option / CDC_KAFKA_OPTIONS: {key} is not a librdkafka setting, or its value is not \
                         one it takes (see librdkafka's CONFIGURATION.md)\n"
                    );
                    return Err(clap::Error::raw(clap::error::ErrorKind::InvalidValue, message).with_cmd(cmd));
                }
                Ok(KafkaOption { key: key.to_owned(), value: value.to_owned() })
            }
            _ => Err(clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                "a Kafka option (--kafka-option / CDC_KAFKA_OPTIONS) is a librdkafka setting as key=value, \
                 e.g. security.protocol=SSL\n",
            )
            .with_cmd(cmd)),
        }
    }
}

impl std::fmt::Debug for KafkaOption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}=<hidden>", self.key)
    }
}

impl KafkaArgs {
    /// The change topic Debezium writes for one table.
    pub fn table_topic(&self, table: &str) -> String {
        format!("{}.public.{}", self.topic_prefix, table)
    }
}

/// The prefix of the stream jobs' default consumer groups.
pub const GROUP_PREFIX: &str = "cdc-cqrs";

/// The consumer group of the job following `table`, under `prefix` (the checkpoints in a store carry it).
pub fn job_group(prefix: &str, table: &str) -> String {
    format!("{prefix}-{table}")
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

/// The read stores a stream job keeps up to date, or the query service reads from: MongoDB deployments
/// (each a replica set) holding the same read models, each with its own checkpoints.
#[derive(Debug, Clone, Args)]
pub struct StoresArgs {
    /// MongoDB read stores, space separated (a URI may itself hold commas), each holding the read models. A
    /// job keeps each one up to date on its own (a slow or unreachable store holds back only itself);
    /// first_load loads them all from one snapshot; the query service spreads its reads over them; verify
    /// and compact work on each.
    #[arg(
        id = "mongo_uri",
        long = "mongo-uri",
        env = "CDC_MONGO_URI",
        value_delimiter = ' ',
        num_args = 1..,
        default_value = "mongodb://127.0.0.1:57017/?directConnection=true"
    )]
    pub uris: Vec<String>,

    /// MongoDB database of the read models (the same in every store).
    #[arg(id = "mongo_database", long = "mongo-database", env = "CDC_MONGO_DATABASE", default_value = "ecommerce")]
    pub database: String,
}

/// One read store: a name for logs, metrics and responses (never the URI, which may hold a password).
#[derive(Debug, Clone)]
pub struct Store {
    pub index: usize,
    pub name: String,
    pub mongo: MongoArgs,
}

impl StoresArgs {
    pub fn stores(&self) -> Vec<Store> {
        self.uris
            .iter()
            .filter(|u| !u.trim().is_empty())
            .enumerate()
            .map(|(index, uri)| Store {
                index,
                name: format!("store{index} ({})", hosts_of(uri)),
                mongo: MongoArgs { uri: uri.trim().to_owned(), database: self.database.clone() },
            })
            .collect()
    }
}

/// The host list of a MongoDB URI, without scheme, credentials, path or options.
fn hosts_of(uri: &str) -> &str {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let hosts = rest.split(['/', '?']).next().unwrap_or(rest);
    hosts.rsplit_once('@').map_or(hosts, |(_, h)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        stores: StoresArgs,
    }

    #[test]
    fn stores_are_named_by_host_never_by_credentials() {
        let cli = Cli::parse_from([
            "x",
            "--mongo-uri",
            "mongodb://u:secret@a:1,b:2/?replicaSet=rs mongodb+srv://c.example.net/db",
        ]);
        let names: Vec<_> = cli.stores.stores().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["store0 (a:1,b:2)", "store1 (c.example.net)"]);
    }
}
