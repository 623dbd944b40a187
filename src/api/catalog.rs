//! `GET /tools/catalog`: the wire shape of [`crate::catalog::CatalogEntry`] and
//! the page that lists them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tools::ToolCategory;

/// One tool as `GET /tools/catalog` lists it. Field order is the JSON order
/// clients have always received; `annotations` is omitted, not null, for built-ins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The name callers use in `/tools/execute` and MCP `tools/call`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// `read_only`, `active` or `destructive`.
    pub category: ToolCategory,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
    /// Whether the current mode allows it.
    pub allowed: bool,
    /// Every mode that allows it.
    pub allowed_modes: Vec<String>,
    /// An upstream tool's MCP annotations as its server listed them (absent for
    /// built-ins, whose annotations follow from `category`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Value>,
}

impl From<&crate::catalog::CatalogEntry> for CatalogEntry {
    fn from(entry: &crate::catalog::CatalogEntry) -> CatalogEntry {
        CatalogEntry {
            name: entry.name.clone(),
            description: entry.description.clone(),
            category: entry.category,
            input_schema: entry.input_schema.clone(),
            allowed: entry.allowed,
            allowed_modes: entry.allowed_modes.clone(),
            annotations: entry.annotations.clone(),
        }
    }
}

impl From<crate::catalog::CatalogEntry> for CatalogEntry {
    fn from(entry: crate::catalog::CatalogEntry) -> CatalogEntry {
        CatalogEntry {
            name: entry.name,
            description: entry.description,
            category: entry.category,
            input_schema: entry.input_schema,
            allowed: entry.allowed,
            allowed_modes: entry.allowed_modes,
            annotations: entry.annotations,
        }
    }
}

/// `GET /tools/catalog`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// The mode `allowed` refers to.
    pub mode: String,
    /// Every tool.
    pub tools: Vec<CatalogEntry>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::wire_tests::keys_in_order;
    use super::*;

    fn upstream_tool() -> crate::catalog::CatalogEntry {
        crate::catalog::CatalogEntry {
            name: "fs__read_file".into(),
            description: "Reads a file".into(),
            category: ToolCategory::ReadOnly,
            input_schema: json!({"type": "object"}),
            allowed: true,
            allowed_modes: vec!["NORMAL".into(), "EMERGENCY".into()],
            annotations: Some(json!({"readOnlyHint": true})),
        }
    }

    #[test]
    fn the_wire_shape_is_pinned() {
        let page = Catalog {
            mode: "NORMAL".into(),
            tools: vec![CatalogEntry::from(&upstream_tool())],
        };
        let text = serde_json::to_string(&page).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({
                "mode": "NORMAL",
                "tools": [{
                    "name": "fs__read_file",
                    "description": "Reads a file",
                    "category": "read_only",
                    "input_schema": {"type": "object"},
                    "allowed": true,
                    "allowed_modes": ["NORMAL", "EMERGENCY"],
                    "annotations": {"readOnlyHint": true},
                }],
            })
        );
        assert_eq!(keys_in_order(&text), ["mode", "tools"]);
        let entry = serde_json::to_string(&page.tools[0]).unwrap();
        assert_eq!(
            keys_in_order(&entry),
            [
                "name",
                "description",
                "category",
                "input_schema",
                "allowed",
                "allowed_modes",
                "annotations",
            ]
        );
        assert_eq!(serde_json::from_str::<Catalog>(&text).unwrap(), page);
        assert_eq!(CatalogEntry::from(upstream_tool()), page.tools[0]);
    }

    #[test]
    fn a_built_in_has_no_annotations_key() {
        let mut builtin = upstream_tool();
        builtin.name = "delete_database".into();
        builtin.category = ToolCategory::Destructive;
        builtin.annotations = None;
        let value = serde_json::to_value(CatalogEntry::from(&builtin)).unwrap();
        assert_eq!(value["category"], json!("destructive"));
        assert!(value.get("annotations").is_none(), "{value}");
    }
}
