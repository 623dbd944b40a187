//! The simulated cloud the tools act on: four services, a fleet, and an action log.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::tools::ToolCall;

/// Entries kept for `read_logs`; older ones are dropped so memory stays bounded.
/// Only state changes are logged: reads change nothing and would drown them.
pub const ACTION_LOG_CAPACITY: usize = 1000;
/// Fleet size of a fresh infrastructure, as in the seed.
pub const INITIAL_FLEET_SIZE: i64 = 3;
/// Services of a fresh infrastructure, as in the seed.
pub const INITIAL_SERVICES: [&str; 4] = ["web-server", "api-gateway", "database", "cache"];

/// Health of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceHealth {
    /// Working normally.
    Healthy,
    /// Working, but impaired.
    Degraded,
    /// Down or close to it.
    Critical,
}

impl ServiceHealth {
    /// The lowercase wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceHealth::Healthy => "healthy",
            ServiceHealth::Degraded => "degraded",
            ServiceHealth::Critical => "critical",
        }
    }
}

impl fmt::Display for ServiceHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tool ran but could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfraError {
    /// No service has that name.
    #[error("service '{0}' does not exist (known services: {1})")]
    UnknownService(String, String),
    /// No database has that name.
    #[error("database '{0}' does not exist")]
    UnknownDatabase(String),
}

impl InfraError {
    /// The reason code of the failure.
    pub fn reason(&self) -> crate::reason::Reason {
        use crate::reason::Reason;
        match self {
            InfraError::UnknownService(..) => Reason::UnknownService,
            InfraError::UnknownDatabase(_) => Reason::UnknownDatabase,
        }
    }
}

/// One entry of the action log that `read_logs` returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ActionLogEntry {
    /// When the action happened.
    pub timestamp: DateTime<Utc>,
    /// What was done, e.g. `restart_service`.
    pub action: Cow<'static, str>,
    /// Action-specific details.
    pub details: Value,
}

/// The whole simulated environment.
#[derive(Debug)]
pub struct CloudInfrastructure {
    services: Vec<(String, ServiceHealth)>,
    fleet_size: i64,
    actions: VecDeque<ActionLogEntry>,
}

/// A point-in-time view for `/infrastructure/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InfrastructureStatus {
    /// Service name to health, in a stable order.
    pub services: serde_json::Map<String, Value>,
    /// Number of instances.
    pub fleet_size: i64,
}

impl Default for CloudInfrastructure {
    fn default() -> Self {
        CloudInfrastructure::new()
    }
}

impl CloudInfrastructure {
    /// The seed's starting state: four healthy services, three instances.
    pub fn new() -> CloudInfrastructure {
        CloudInfrastructure {
            services: INITIAL_SERVICES
                .iter()
                .map(|name| ((*name).to_owned(), ServiceHealth::Healthy))
                .collect(),
            fleet_size: INITIAL_FLEET_SIZE,
            actions: VecDeque::with_capacity(64),
        }
    }

    /// Runs an already-authorized call.
    pub fn execute(&mut self, call: &ToolCall, now: DateTime<Utc>) -> Result<Value, InfraError> {
        match call {
            ToolCall::ListServices => {
                let services: Vec<Value> = self
                    .services
                    .iter()
                    .map(|(name, health)| json!({"name": name, "status": health}))
                    .collect();
                Ok(json!({"services": services, "fleet_size": self.fleet_size}))
            }
            ToolCall::GetServiceStatus { service_name } => {
                let health = self.service(service_name)?.1;
                Ok(json!({"service": service_name, "status": health}))
            }
            ToolCall::ReadLogs { lines } => {
                let wanted = usize::try_from(*lines).unwrap_or(0);
                let skip = self.actions.len().saturating_sub(wanted);
                let entries: Vec<&ActionLogEntry> = self.actions.iter().skip(skip).collect();
                Ok(json!({"entries": entries, "returned": entries.len()}))
            }
            ToolCall::RestartService { service_name } => {
                let service = self.service_mut(service_name)?;
                let previous = service.1;
                service.1 = ServiceHealth::Healthy;
                self.log(
                    now,
                    "restart_service",
                    json!({"service": service_name, "previous_status": previous}),
                );
                Ok(json!({
                    "service": service_name,
                    "previous_status": previous,
                    "status": ServiceHealth::Healthy,
                    "message": format!("Service {service_name} restarted successfully"),
                }))
            }
            ToolCall::ScaleFleet { count } => {
                let previous = std::mem::replace(&mut self.fleet_size, *count);
                self.log(
                    now,
                    "scale_fleet",
                    json!({"previous_size": previous, "new_size": count}),
                );
                Ok(json!({
                    "previous_size": previous,
                    "fleet_size": count,
                    "message": format!("Fleet scaled from {previous} to {count} instances"),
                }))
            }
            ToolCall::DeleteDatabase { db_name } => {
                // Only the `database` service is a database in the simulation.
                let position = self
                    .services
                    .iter()
                    .position(|(name, _)| name == db_name && name == "database")
                    .ok_or_else(|| InfraError::UnknownDatabase(db_name.clone()))?;
                self.services.remove(position);
                self.log(now, "delete_database", json!({"database": db_name}));
                Ok(json!({"database": db_name, "message": format!("Database {db_name} deleted")}))
            }
        }
    }

    /// Puts a service into a bad state, for demos and drills.
    pub fn simulate_incident(
        &mut self,
        service_name: &str,
        health: ServiceHealth,
        now: DateTime<Utc>,
    ) -> Result<(), InfraError> {
        self.service_mut(service_name)?.1 = health;
        self.log(
            now,
            "incident",
            json!({"service": service_name, "status": health}),
        );
        Ok(())
    }

    /// Health of one service, if it exists.
    pub fn health(&self, service_name: &str) -> Option<ServiceHealth> {
        self.service(service_name).ok().map(|(_, health)| *health)
    }

    /// Current fleet size.
    pub fn fleet_size(&self) -> i64 {
        self.fleet_size
    }

    /// Services and fleet size, for the status endpoint.
    pub fn status(&self) -> InfrastructureStatus {
        InfrastructureStatus {
            services: self
                .services
                .iter()
                .map(|(name, health)| (name.clone(), Value::from(health.as_str())))
                .collect(),
            fleet_size: self.fleet_size,
        }
    }

    fn service(&self, name: &str) -> Result<&(String, ServiceHealth), InfraError> {
        self.services
            .iter()
            .find(|(service, _)| service == name)
            .ok_or_else(|| self.unknown_service(name))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut (String, ServiceHealth), InfraError> {
        let error = self.unknown_service(name);
        self.services
            .iter_mut()
            .find(|(service, _)| service == name)
            .ok_or(error)
    }

    fn unknown_service(&self, name: &str) -> InfraError {
        let known: Vec<&str> = self
            .services
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        InfraError::UnknownService(name.to_owned(), known.join(", "))
    }

    fn log(&mut self, timestamp: DateTime<Utc>, action: &'static str, details: Value) {
        if self.actions.len() == ACTION_LOG_CAPACITY {
            self.actions.pop_front();
        }
        self.actions.push_back(ActionLogEntry {
            timestamp,
            action: Cow::Borrowed(action),
            details,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart(name: &str) -> ToolCall {
        ToolCall::RestartService {
            service_name: name.to_owned(),
        }
    }

    #[test]
    fn starts_like_the_seed() {
        let infra = CloudInfrastructure::new();
        let status = infra.status();
        assert_eq!(status.fleet_size, 3);
        assert_eq!(status.services.len(), 4);
        assert!(status.services.values().all(|health| health == "healthy"));
    }

    #[test]
    fn restart_heals_an_incident() {
        let mut infra = CloudInfrastructure::new();
        let now = Utc::now();
        infra
            .simulate_incident("web-server", ServiceHealth::Critical, now)
            .unwrap();
        assert_eq!(infra.health("web-server"), Some(ServiceHealth::Critical));
        let result = infra.execute(&restart("web-server"), now).unwrap();
        assert_eq!(result["previous_status"], "critical");
        assert_eq!(infra.health("web-server"), Some(ServiceHealth::Healthy));
    }

    #[test]
    fn unknown_services_fail_without_side_effects() {
        let mut infra = CloudInfrastructure::new();
        let error = infra
            .execute(&restart("mainframe"), Utc::now())
            .unwrap_err();
        assert_eq!(error.reason(), crate::reason::Reason::UnknownService);
        assert!(error.to_string().contains("web-server, api-gateway"));
        assert_eq!(infra.actions.len(), 0);
    }

    #[test]
    fn the_action_log_is_bounded() {
        let mut infra = CloudInfrastructure::new();
        let now = Utc::now();
        for count in 0..ACTION_LOG_CAPACITY + 50 {
            infra
                .execute(
                    &ToolCall::ScaleFleet {
                        count: count as i64 % 10 + 1,
                    },
                    now,
                )
                .unwrap();
        }
        infra.execute(&ToolCall::ListServices, now).unwrap();
        assert_eq!(infra.actions.len(), ACTION_LOG_CAPACITY);
        let logs = infra
            .execute(&ToolCall::ReadLogs { lines: 5 }, now)
            .unwrap();
        assert_eq!(logs["returned"], 5);
    }

    #[test]
    fn scale_and_delete_change_state() {
        let mut infra = CloudInfrastructure::new();
        let now = Utc::now();
        infra
            .execute(&ToolCall::ScaleFleet { count: 7 }, now)
            .unwrap();
        assert_eq!(infra.fleet_size(), 7);
        let delete = |name: &str| ToolCall::DeleteDatabase {
            db_name: name.to_owned(),
        };
        assert!(infra.execute(&delete("cache"), now).is_err());
        infra.execute(&delete("database"), now).unwrap();
        assert_eq!(infra.health("database"), None);
    }
}
