//! The tool catalog: every tool a policy can name, as data.
//!
//! A catalog is built from its sources: the six built-in simulated-cloud tools
//! (when the policy has them) and the tools each upstream MCP server listed, under
//! their exposed names `<upstream>__<tool>`. Each entry gets a dense [`ToolId`], so
//! the policy can keep per-mode sets as [`ToolBits`] and decide without allocating.
//! A catalog is immutable; when an upstream's tools change, a new one is built and
//! the policy is bound to it again ([`crate::policy::PolicyEngine::bind`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rmcp::model::{Tool, ToolAnnotations};
use serde_json::{Map, Value};

use crate::policy::{ModeId, PolicyEngine};
use crate::tools::{ToolCategory, ToolName};
use crate::upstream::client::{ToolListing, UpstreamClient, UpstreamError, UpstreamHandler};
use crate::upstream::config::Transport;
use crate::upstream::names::{SkipReason, SkippedTool};

/// Most tools one upstream may contribute; the rest are left out (and reported),
/// so an upstream cannot grow the catalog, the policy's bitsets and its compiled
/// schemas without bound.
pub const MAX_TOOLS_PER_UPSTREAM: usize = 1000;

/// Dense index of a tool in one [`Catalog`]; meaningless in another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToolId(u32);

impl ToolId {
    /// Position of the tool in its catalog.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a tool's calls go.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolOrigin {
    /// One of the simulated cloud's six tools, run in process.
    Builtin(ToolName),
    /// A tool of an upstream MCP server.
    Upstream {
        /// The upstream's name, as declared in the policy.
        upstream: Arc<str>,
        /// The tool's own name at the upstream (not the exposed one).
        tool: Arc<str>,
    },
}

/// One tool of the catalog, with what agents are told about it.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogTool {
    name: Arc<str>,
    origin: ToolOrigin,
    description: String,
    input_schema: Arc<Map<String, Value>>,
    annotations: Option<ToolAnnotations>,
    category: ToolCategory,
}

impl CatalogTool {
    /// The exposed name agents call it by (`restart_service`, `fs__read_text_file`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exposed name, shared.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// Built-in or upstream, and where its calls go.
    pub fn origin(&self) -> &ToolOrigin {
        &self.origin
    }

    /// The built-in tool, if this is one.
    pub fn builtin(&self) -> Option<ToolName> {
        match self.origin {
            ToolOrigin::Builtin(tool) => Some(tool),
            ToolOrigin::Upstream { .. } => None,
        }
    }

    /// What the tool does: the built-in's text, or the upstream's description (may be empty).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The JSON Schema (an object schema) its arguments must match.
    pub fn input_schema(&self) -> &Arc<Map<String, Value>> {
        &self.input_schema
    }

    /// The upstream's annotations, as listed; `None` for built-ins (their
    /// annotations follow from [`CatalogTool::category`]).
    pub fn annotations(&self) -> Option<&ToolAnnotations> {
        self.annotations.as_ref()
    }

    /// The harm category: the built-in's own, or for an upstream tool derived from
    /// its annotation hints the way MCP defaults them (a tool that does not say it
    /// is read-only is assumed destructive unless it says otherwise).
    pub fn category(&self) -> ToolCategory {
        self.category
    }

    /// The JSON type(s) the schema gives a top-level argument, or `None` when the
    /// schema has no such property. An empty list means the property has no `type`.
    pub fn argument_types(&self, argument: &str) -> Option<Vec<&str>> {
        let property = self
            .input_schema
            .get("properties")
            .and_then(Value::as_object)?
            .get(argument)?;
        Some(match property.get("type") {
            Some(Value::String(kind)) => vec![kind.as_str()],
            Some(Value::Array(kinds)) => kinds.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        })
    }

    /// The names of the schema's top-level properties, in schema order.
    pub fn argument_names(&self) -> Vec<&str> {
        self.input_schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|properties| properties.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// Every tool a policy is bound to, each with a dense id, and the upstream tools
/// that were left out (their names break the providers' rule).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    tools: Vec<CatalogTool>,
    by_name: HashMap<Arc<str>, ToolId>,
    skipped: Vec<SkippedTool>,
    /// Per upstream, how many tools beyond [`MAX_TOOLS_PER_UPSTREAM`] were left out.
    over_cap: Vec<(String, usize)>,
    /// The built-ins, when present, hold ids 0..6 in [`ToolName::ALL`] order.
    builtins: bool,
}

impl Catalog {
    /// The six built-in tools, in [`ToolName::ALL`] order.
    pub fn builtin() -> Catalog {
        let mut catalog = Catalog::default();
        catalog.add_builtins();
        catalog
    }

    /// A catalog of the built-ins (when `simulated_cloud`) followed by each
    /// upstream's listed tools, in the order given.
    pub fn from_sources<'a>(
        simulated_cloud: bool,
        upstreams: impl IntoIterator<Item = (&'a str, &'a ToolListing)>,
    ) -> Catalog {
        let mut catalog = Catalog::default();
        if simulated_cloud {
            catalog.add_builtins();
        }
        for (upstream, listing) in upstreams {
            catalog.add_upstream(upstream, listing);
        }
        catalog
    }

    /// A catalog from an [`crate::upstream::set::UpstreamSet`]'s current
    /// listings: the built-ins (when `simulated_cloud`) and every upstream that
    /// has listed its tools; an upstream without a listing contributes none (its
    /// tools are unknown until it lists them, then the policy is bound again).
    pub fn from_listings(
        simulated_cloud: bool,
        listings: &BTreeMap<String, Result<ToolListing, UpstreamError>>,
    ) -> Catalog {
        Catalog::from_sources(
            simulated_cloud,
            listings.iter().filter_map(|(name, listing)| {
                listing
                    .as_ref()
                    .ok()
                    .map(|listing| (name.as_str(), listing))
            }),
        )
    }

    fn add_builtins(&mut self) {
        // Only ever called on an empty catalog, so the built-ins take ids 0..6.
        debug_assert!(self.tools.is_empty());
        self.builtins = true;
        for tool in ToolName::ALL {
            self.push(CatalogTool {
                name: Arc::from(tool.as_str()),
                origin: ToolOrigin::Builtin(tool),
                description: tool.description().to_owned(),
                input_schema: Arc::clone(tool.input_schema()),
                annotations: None,
                category: tool.category(),
            });
        }
    }

    /// Adds the tools of one upstream listing; its skipped tools are kept for reports.
    pub fn add_upstream(&mut self, upstream: &str, listing: &ToolListing) {
        let upstream_name: Arc<str> = Arc::from(upstream);
        self.skipped.extend(listing.skipped.iter().cloned());
        if listing.tools.len() > MAX_TOOLS_PER_UPSTREAM {
            let left_out = listing.tools.len() - MAX_TOOLS_PER_UPSTREAM;
            tracing::warn!(
                upstream,
                left_out,
                "upstream lists more than {MAX_TOOLS_PER_UPSTREAM} tools; the rest are left out of the catalog"
            );
            self.over_cap.push((upstream.to_owned(), left_out));
        }
        for exposed in listing.tools.iter().take(MAX_TOOLS_PER_UPSTREAM) {
            if self.by_name.contains_key(exposed.exposed_name.as_str()) {
                self.skipped.push(SkippedTool {
                    upstream: upstream.to_owned(),
                    tool: exposed.tool.name.to_string(),
                    reason: SkipReason::Duplicate,
                });
                continue;
            }
            self.push(upstream_tool(
                Arc::clone(&upstream_name),
                &exposed.exposed_name,
                &exposed.tool,
            ));
        }
    }

    fn push(&mut self, tool: CatalogTool) {
        // A catalog holds at most the tools of a bounded set of upstream listings,
        // far below u32::MAX entries.
        let id = ToolId(u32::try_from(self.tools.len()).unwrap_or(u32::MAX));
        self.by_name.insert(Arc::clone(&tool.name), id);
        self.tools.push(tool);
    }

    /// The tool called `name`, if the catalog has it.
    pub fn lookup(&self, name: &str) -> Option<ToolId> {
        self.by_name.get(name).copied()
    }

    /// The built-in tool's id, if the catalog has the built-ins (no hashing: they
    /// hold the first ids).
    pub fn builtin_id(&self, tool: ToolName) -> Option<ToolId> {
        self.builtins.then(|| ToolId(tool.index() as u32))
    }

    /// The tool with this id. Ids are only minted by this catalog, so the index is
    /// in range for ids that came from it.
    pub fn tool(&self, id: ToolId) -> &CatalogTool {
        &self.tools[id.index()]
    }

    /// Every tool with its id, in catalog order.
    pub fn tools(&self) -> impl Iterator<Item = (ToolId, &CatalogTool)> {
        self.tools
            .iter()
            .enumerate()
            .map(|(index, tool)| (ToolId(index as u32), tool))
    }

    /// How many tools the catalog has.
    pub fn len(&self) -> usize {
        self.tools.len()
    }

    /// Whether the catalog has no tool at all.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Whether the six built-ins are in the catalog.
    pub fn has_builtins(&self) -> bool {
        self.builtins
    }

    /// Upstream tools left out of the catalog, with why.
    pub fn skipped(&self) -> &[SkippedTool] {
        &self.skipped
    }

    /// Upstreams that listed more than [`MAX_TOOLS_PER_UPSTREAM`] tools, with how
    /// many were left out.
    pub fn over_cap(&self) -> &[(String, usize)] {
        &self.over_cap
    }
}

fn upstream_tool(upstream: Arc<str>, exposed_name: &str, tool: &Tool) -> CatalogTool {
    let annotations = tool.annotations.clone();
    let hints = annotations.as_ref();
    let read_only = hints.and_then(|a| a.read_only_hint) == Some(true);
    let destructive = hints.and_then(|a| a.destructive_hint).unwrap_or(true);
    let category = if read_only {
        ToolCategory::ReadOnly
    } else if destructive {
        ToolCategory::Destructive
    } else {
        ToolCategory::Active
    };
    CatalogTool {
        name: Arc::from(exposed_name),
        origin: ToolOrigin::Upstream {
            upstream,
            tool: Arc::from(tool.name.as_ref()),
        },
        description: tool.description.as_deref().unwrap_or_default().to_owned(),
        input_schema: Arc::clone(&tool.input_schema),
        annotations,
        category,
    }
}

/// A set of catalog tools, one bit per [`ToolId`]. Sized for its catalog at
/// compile time, so membership tests never allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolBits(Box<[u64]>);

impl ToolBits {
    /// An empty set for a catalog of `len` tools.
    pub fn empty(len: usize) -> ToolBits {
        ToolBits(vec![0; len.div_ceil(64)].into_boxed_slice())
    }

    /// Whether `tool` is in the set.
    pub fn contains(&self, tool: ToolId) -> bool {
        let index = tool.index();
        self.0
            .get(index / 64)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Adds `tool`; ids beyond the catalog the set was sized for are ignored.
    pub fn insert(&mut self, tool: ToolId) {
        let index = tool.index();
        if let Some(word) = self.0.get_mut(index / 64) {
            *word |= 1 << (index % 64);
        }
    }

    /// The tools in the set, in id order.
    pub fn iter(&self) -> impl Iterator<Item = ToolId> + '_ {
        self.0.iter().enumerate().flat_map(|(word_index, word)| {
            (0..64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| ToolId((word_index * 64 + bit) as u32))
        })
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|word| *word == 0)
    }
}

/// What connecting to a policy's upstreams learned: the catalog of those that
/// answered (with the built-ins if the policy has them), and why the others did not.
#[derive(Debug)]
pub struct Discovery {
    /// The built-ins (when the policy has them) and every listed upstream tool.
    pub catalog: Catalog,
    /// Upstreams that could not be resolved, started, reached or listed, with why.
    pub failures: Vec<(String, String)>,
}

/// Starts (stdio) or reaches (HTTP) each upstream the policy declares, lists its
/// tools, and stops it again. `${VAR}`s come from `lookup`. Used by
/// `proxi policy check --connect` and `policy explain --connect`.
pub async fn discover(policy: &PolicyEngine, lookup: &dyn Fn(&str) -> Option<String>) -> Discovery {
    let mut failures = Vec::new();
    let mut resolved = Vec::new();
    for (name, declaration) in policy.upstreams() {
        match declaration.resolve(name, lookup) {
            Ok(upstream) => resolved.push(upstream),
            Err(error) => failures.push((name.clone(), error.to_string())),
        }
    }
    let mut listings = Vec::new();
    for upstream in resolved {
        let name = upstream.name.as_str();
        let handler = UpstreamHandler::new(name);
        let client = match &upstream.transport {
            Transport::Stdio(target) => UpstreamClient::connect_stdio(name, target, handler).await,
            Transport::Http(target) => UpstreamClient::connect_http(name, target, handler).await,
        };
        match client {
            Err(error) => failures.push((name.to_owned(), error.to_string())),
            Ok(client) => {
                match client.list_tools().await {
                    Ok(listing) => listings.push((upstream.name.clone(), listing)),
                    Err(error) => failures.push((name.to_owned(), error.to_string())),
                }
                client.shutdown().await;
            }
        }
    }
    let catalog = Catalog::from_sources(
        policy.simulated_cloud(),
        listings
            .iter()
            .map(|(name, listing)| (name.as_str(), listing)),
    );
    Discovery { catalog, failures }
}

/// The names [`listing`] shows, in catalog order: what an unknown-tool refusal
/// offers instead.
pub fn listed_names(policy: &PolicyEngine) -> Vec<&str> {
    policy
        .catalog()
        .tools()
        .filter(|(id, tool)| tool.builtin().is_some() || !policy.modes_permitting(*id).is_empty())
        .map(|(_, tool)| tool.name())
        .collect()
}

/// One tool as the catalog lists it to callers (`GET /tools/catalog`, MCP
/// `tools/list`) in one mode; clients get it as [`crate::api::CatalogEntry`].
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogEntry {
    /// The name callers use in `/tools/execute` and MCP `tools/call`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// `read_only`, `active` or `destructive`.
    pub category: ToolCategory,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
    /// Whether the mode listed for allows it.
    pub allowed: bool,
    /// Every mode that allows it.
    pub allowed_modes: Vec<String>,
    /// An upstream tool's MCP annotations as its server listed them (absent for
    /// built-ins, whose annotations follow from `category`).
    pub annotations: Option<Value>,
}

/// The catalog as agents see it in `mode`: every built-in (listed as always,
/// even one no mode allows), and each upstream tool that some mode allows, with
/// its description, the modes that allow it, its schema and annotations. Upstream
/// tools no mode allows are hidden, but a call to one is still decided and audited.
pub fn listing(policy: &PolicyEngine, mode: ModeId) -> Vec<CatalogEntry> {
    policy
        .catalog()
        .tools()
        .filter_map(|(id, tool)| {
            let allowed_modes: Vec<String> = policy
                .modes_permitting(id)
                .into_iter()
                .map(str::to_owned)
                .collect();
            if tool.builtin().is_none() && allowed_modes.is_empty() {
                return None;
            }
            Some(CatalogEntry {
                name: tool.name().to_owned(),
                description: tool.description().to_owned(),
                category: tool.category(),
                input_schema: Value::Object(tool.input_schema().as_ref().clone()),
                allowed: policy.permits_tool(mode, id),
                allowed_modes,
                annotations: tool
                    .annotations()
                    .and_then(|annotations| serde_json::to_value(annotations).ok()),
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::upstream::client::ExposedTool;
    use serde_json::json;

    pub(crate) fn listing(upstream: &str, tools: &[(&str, Value)]) -> ToolListing {
        ToolListing {
            tools: tools
                .iter()
                .map(|(name, schema)| ExposedTool {
                    exposed_name: format!("{upstream}__{name}"),
                    tool: Tool::new(
                        name.to_string(),
                        format!("does {name}"),
                        schema.as_object().cloned().unwrap_or_default(),
                    ),
                })
                .collect(),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn builtins_come_first_in_their_order_and_upstream_tools_follow() {
        let fs = listing(
            "fs",
            &[(
                "read_file",
                json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            )],
        );
        let catalog = Catalog::from_sources(true, [("fs", &fs)]);
        assert_eq!(catalog.len(), 7);
        for (index, tool) in ToolName::ALL.into_iter().enumerate() {
            let id = catalog.builtin_id(tool).unwrap();
            assert_eq!(id.index(), index);
            assert_eq!(catalog.tool(id).builtin(), Some(tool));
        }
        let read = catalog.lookup("fs__read_file").unwrap();
        assert_eq!(read.index(), 6);
        let entry = catalog.tool(read);
        assert_eq!(
            entry.origin(),
            &ToolOrigin::Upstream {
                upstream: Arc::from("fs"),
                tool: Arc::from("read_file")
            }
        );
        assert_eq!(entry.description(), "does read_file");
        assert_eq!(entry.argument_types("path"), Some(vec!["string"]));
        assert_eq!(entry.argument_types("mode"), None);
        // Without annotations MCP assumes the worst.
        assert_eq!(entry.category(), ToolCategory::Destructive);
    }

    #[test]
    fn an_upstream_contributes_at_most_the_cap() {
        let names: Vec<String> = (0..MAX_TOOLS_PER_UPSTREAM + 5)
            .map(|index| format!("t{index}"))
            .collect();
        let tools: Vec<(&str, Value)> = names
            .iter()
            .map(|name| (name.as_str(), json!({"type": "object"})))
            .collect();
        let big = listing("big", &tools);
        let catalog = Catalog::from_sources(false, [("big", &big)]);
        assert_eq!(catalog.len(), MAX_TOOLS_PER_UPSTREAM);
        assert_eq!(catalog.over_cap(), [("big".to_owned(), 5)]);
        assert!(catalog.lookup("big__t999").is_some());
        assert!(catalog.lookup("big__t1000").is_none());
    }

    #[test]
    fn an_upstream_without_a_listing_adds_no_tools() {
        let fs = listing("fs", &[("read_file", json!({"type": "object"}))]);
        let listings = BTreeMap::from([
            ("fs".to_owned(), Ok(fs)),
            (
                "git".to_owned(),
                Err(UpstreamError::Unavailable {
                    upstream: "git".to_owned(),
                    reason: "it is starting".to_owned(),
                }),
            ),
        ]);
        let catalog = Catalog::from_listings(false, &listings);
        let names: Vec<&str> = catalog.tools().map(|(_, tool)| tool.name()).collect();
        assert_eq!(names, ["fs__read_file"]);
    }

    #[test]
    fn without_the_simulated_cloud_there_are_no_builtins() {
        let catalog = Catalog::from_sources(false, []);
        assert!(catalog.is_empty());
        assert!(!catalog.has_builtins());
        assert_eq!(catalog.lookup("list_services"), None);
    }

    #[test]
    fn bits_cover_catalogs_wider_than_one_word() {
        let mut bits = ToolBits::empty(130);
        for index in [0u32, 63, 64, 129] {
            bits.insert(ToolId(index));
        }
        bits.insert(ToolId(500));
        assert!(bits.contains(ToolId(64)) && bits.contains(ToolId(129)));
        assert!(!bits.contains(ToolId(1)) && !bits.contains(ToolId(500)));
        let members: Vec<usize> = bits.iter().map(ToolId::index).collect();
        assert_eq!(members, [0, 63, 64, 129]);
        assert!(ToolBits::empty(3).is_empty());
    }
}
