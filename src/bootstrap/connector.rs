//! The Debezium connector: its configuration (`connector/ecommerce.json` plus per-deployment settings)
//! and its registration with Kafka Connect's REST API, waiting until it really streams.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The shipped connector configuration.
pub const CONFIG_TEMPLATE: &str = include_str!("../../connector/ecommerce.json");

const SECRET_KEYS: [&str; 1] = ["database.password"];

/// The settings that differ from one deployment to another.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// PostgreSQL host and port as Kafka Connect reaches them.
    pub pg_host: String,
    pub pg_port: u16,
    pub database: String,
    pub user: String,
    pub password: String,
    pub topic_prefix: String,
    pub slot: String,
    pub snapshot_mode: String,
}

/// The template with the deployment's settings filled in.
pub fn render(template: &str, d: &Deployment) -> Result<Map<String, Value>> {
    let mut cfg: Map<String, Value> =
        serde_json::from_str(template).context("the connector config is not a JSON object of settings")?;
    let mut set = |k: &str, v: String| cfg.insert(k.to_owned(), Value::String(v));
    set("database.hostname", d.pg_host.clone());
    set("database.port", d.pg_port.to_string());
    set("database.dbname", d.database.clone());
    set("database.user", d.user.clone());
    set("database.password", d.password.clone());
    set("topic.prefix", d.topic_prefix.clone());
    set("slot.name", d.slot.clone());
    set("snapshot.mode", d.snapshot_mode.clone());
    Ok(cfg)
}

/// A copy safe to log or print: secrets replaced.
pub fn redacted(cfg: &Map<String, Value>) -> Map<String, Value> {
    let mut out = cfg.clone();
    for k in SECRET_KEYS {
        if let Some(v) = out.get_mut(k) {
            *v = Value::String("********".into());
        }
    }
    out
}

/// A connector's state as Kafka Connect reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub name: String,
    pub connector: State,
    pub tasks: Vec<TaskState>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct State {
    pub state: String,
    pub worker_id: String,
    #[serde(default)]
    pub trace: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskState {
    pub id: u32,
    pub state: String,
    pub worker_id: String,
    #[serde(default)]
    pub trace: Option<String>,
}

impl Status {
    pub fn is_running(&self) -> bool {
        self.connector.state == "RUNNING" && !self.tasks.is_empty() && self.tasks.iter().all(|t| t.state == "RUNNING")
    }

    /// The first failure's message, if the connector or a task failed.
    pub fn failure(&self) -> Option<String> {
        let first_line =
            |t: &Option<String>| t.as_deref().and_then(|s| s.lines().next()).unwrap_or("no trace").to_owned();
        if self.connector.state == "FAILED" {
            return Some(format!("connector failed: {}", first_line(&self.connector.trace)));
        }
        self.tasks
            .iter()
            .find(|t| t.state == "FAILED")
            .map(|t| format!("task {} failed: {}", t.id, first_line(&t.trace)))
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connector {} {} on {}", self.name, self.connector.state, self.connector.worker_id)?;
        for t in &self.tasks {
            write!(f, "; task {} {} on {}", t.id, t.state, t.worker_id)?;
        }
        Ok(())
    }
}

/// Kafka Connect's REST API, the parts the project uses.
pub struct ConnectClient {
    http: reqwest::Client,
    base: String,
}

impl ConnectClient {
    pub fn new(base_url: &str) -> Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(ConnectClient { http, base: base_url.trim_end_matches('/').to_owned() })
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach Kafka Connect at {} ({e}): start it (`scripts/stack up`) or point CDC_CONNECT_URL at it",
            self.base
        )
    }

    /// Creates the connector, or updates its config (PUT is idempotent).
    pub async fn put_config(&self, name: &str, cfg: &Map<String, Value>) -> Result<()> {
        let resp = self
            .http
            .put(format!("{}/connectors/{name}/config", self.base))
            .json(cfg)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("Kafka Connect refused the config of connector {name} ({status}): {body}");
        }
        Ok(())
    }

    /// The connector's status, or `None` if there is no such connector (yet).
    pub async fn status(&self, name: &str) -> Result<Option<Status>> {
        let resp = self
            .http
            .get(format!("{}/connectors/{name}/status", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = resp.error_for_status().with_context(|| format!("status of connector {name}"))?;
        Ok(Some(resp.json().await.with_context(|| format!("decoding the status of connector {name}"))?))
    }

    /// Polls until the connector and all its tasks are RUNNING; fails at once if one FAILED.
    pub async fn wait_running(&self, name: &str, timeout: Duration) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(status) = self.status(name).await? {
                if status.is_running() {
                    return Ok(status);
                }
                if let Some(failure) = status.failure() {
                    bail!("{failure} (see the Kafka Connect log)");
                }
                last = Some(status.to_string());
            }
            if Instant::now() >= deadline {
                bail!(
                    "connector {name} is not RUNNING after {}s (last: {})",
                    timeout.as_secs(),
                    last.as_deref().unwrap_or("not created yet")
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Names of the registered connectors.
    pub async fn list(&self) -> Result<Vec<String>> {
        let resp = self.http.get(format!("{}/connectors", self.base)).send().await.map_err(|e| self.unreachable(e))?;
        resp.error_for_status().context("listing connectors")?.json().await.context("decoding the connector list")
    }

    /// Removes the connector (its replication slot stays in PostgreSQL).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let resp = self
            .http
            .delete(format!("{}/connectors/{name}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() && resp.status() != reqwest::StatusCode::NOT_FOUND {
            bail!("Kafka Connect refused to delete connector {name} ({})", resp.status());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment {
            pg_host: "db".into(),
            pg_port: 5432,
            database: "shop".into(),
            user: "debezium".into(),
            password: "s3cret".into(),
            topic_prefix: "shop".into(),
            slot: "shop_slot".into(),
            snapshot_mode: "no_data".into(),
        }
    }

    #[test]
    fn render_fills_the_deployment_and_keeps_the_capture_choices() {
        let cfg = render(CONFIG_TEMPLATE, &deployment()).unwrap();
        assert_eq!(cfg["database.hostname"], "db");
        assert_eq!(cfg["database.port"], "5432");
        assert_eq!(cfg["slot.name"], "shop_slot");
        assert_eq!(cfg["decimal.handling.mode"], "string");
        assert_eq!(cfg["plugin.name"], "pgoutput");
        assert_eq!(cfg["skipped.operations"], "none");
        assert_eq!(cfg["table.include.list"], "public.products,public.orders,public.order_details");
    }

    #[test]
    fn redacted_hides_the_password() {
        let cfg = render(CONFIG_TEMPLATE, &deployment()).unwrap();
        let shown = serde_json::to_string(&redacted(&cfg)).unwrap();
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("********"));
    }

    #[test]
    fn the_template_holds_no_password() {
        let cfg: Map<String, Value> = serde_json::from_str(CONFIG_TEMPLATE).unwrap();
        assert!(!cfg.contains_key("database.password"));
    }
}
