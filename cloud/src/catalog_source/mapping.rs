//! The mapping file: which back-office table feeds which catalog entity type, parsed into
//! typed configuration before anything touches a database.
//!
//! ```toml
//! [[entity]]
//! type = "product"                      # catalog entity type ([a-z][a-z_]*)
//! table = "backoffice.products"         # schema-qualified table
//! id = "sku"                            # column, or ["product_id", "branch_id"] (joined by ':')
//! data = ["name", "price_minor as price", "tax_rate_id"]
//! deleted = "archived"                  # optional boolean soft-delete column
//!
//! [[entity]]
//! type = "price"
//! table = "backoffice.branch_prices"
//! id = ["product_id", "branch_id"]
//! branch = "branch_id"                  # optional; NULL in the column = all branches
//! data = ["product_id", "price_minor"]
//! ```
//!
//! Names are restricted to plain identifiers (`[A-Za-z_][A-Za-z0-9_]*`) so that every name can
//! be quoted into generated SQL without any escaping question, and data keys are unique within
//! an entity (a document cannot hold one key twice).

use std::collections::HashSet;
use std::path::Path;

use possync_protocol::valid_entity_type;
use serde::Deserialize;

use super::SourceError;

/// One mapped entity type, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityMapping {
    /// Catalog entity type.
    pub entity_type: String,
    /// The table's schema.
    pub schema: String,
    /// The table's name.
    pub table: String,
    /// The columns whose values, joined by `:`, form the entity id; must be the primary key.
    pub id: Vec<String>,
    /// The branch column; `None` = every entity of this type is global.
    pub branch: Option<String>,
    /// The document's fields, in the file's order.
    pub data: Vec<DataField>,
    /// Soft-delete column (boolean): a row with `true` is a tombstone.
    pub deleted: Option<String>,
}

impl EntityMapping {
    /// `schema.table`, as written in the file.
    pub fn table_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Every column the mapping reads, each once, in a stable order.
    pub fn columns(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.id
            .iter()
            .map(String::as_str)
            .chain(self.branch.as_deref())
            .chain(self.data.iter().map(|f| f.column.as_str()))
            .chain(self.deleted.as_deref())
            .filter(|c| seen.insert(*c))
            .collect()
    }
}

/// One field of the document: a column and the key it is stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataField {
    /// The source column.
    pub column: String,
    /// The key in the entity's data (the column's name unless renamed with `as`).
    pub key: String,
}

/// A whole mapping file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMapping {
    /// The mapped types, in the file's order.
    pub entities: Vec<EntityMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entity: Vec<RawEntity>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawId {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    #[serde(rename = "type")]
    entity_type: String,
    table: String,
    id: RawId,
    branch: Option<String>,
    data: Vec<String>,
    deleted: Option<String>,
}

/// A plain SQL identifier: safe to double-quote into generated SQL as it is.
pub fn plain_identifier(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && s.len() <= 63
}

impl SourceMapping {
    /// Reads and validates a mapping file; errors name the file and the entity.
    pub fn from_file(path: &Path) -> Result<SourceMapping, SourceError> {
        let text = std::fs::read_to_string(path).map_err(|e| SourceError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        SourceMapping::parse(&text).map_err(|message| SourceError::Config {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates mapping text.
    pub fn parse(text: &str) -> Result<SourceMapping, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if raw.entity.is_empty() {
            return Err("no [[entity]] is declared".into());
        }
        let mut types = HashSet::new();
        let mut entities = Vec::with_capacity(raw.entity.len());
        for (n, e) in raw.entity.into_iter().enumerate() {
            let at = format!("entity #{} ({:?})", n + 1, e.entity_type);
            let mapped = validate(e).map_err(|m| format!("{at}: {m}"))?;
            if !types.insert(mapped.entity_type.clone()) {
                return Err(format!("{at}: type is mapped twice"));
            }
            entities.push(mapped);
        }
        Ok(SourceMapping { entities })
    }
}

fn column(what: &str, name: &str) -> Result<String, String> {
    if plain_identifier(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{what} {name:?} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63)"
        ))
    }
}

fn validate(e: RawEntity) -> Result<EntityMapping, String> {
    if !valid_entity_type(&e.entity_type) {
        return Err("type must be 1-32 of [a-z_] starting with a letter".into());
    }
    let (schema, table) = e.table.split_once('.').ok_or_else(|| {
        format!(
            "table {:?} must be schema-qualified (schema.table)",
            e.table
        )
    })?;
    let schema = column("schema", schema)?;
    let table = column("table", table)?;
    let id = match e.id {
        RawId::One(c) => vec![column("id column", &c)?],
        RawId::Many(cs) if !cs.is_empty() => cs
            .iter()
            .map(|c| column("id column", c))
            .collect::<Result<_, _>>()?,
        RawId::Many(_) => return Err("id must name at least one column".into()),
    };
    let branch = e.branch.map(|c| column("branch column", &c)).transpose()?;
    let deleted = e
        .deleted
        .map(|c| column("deleted column", &c))
        .transpose()?;
    if e.data.is_empty() {
        return Err("data must name at least one column".into());
    }
    let mut keys = HashSet::new();
    let mut data = Vec::with_capacity(e.data.len());
    for item in &e.data {
        let words: Vec<&str> = item.split_whitespace().collect();
        let (col, key) = match words.as_slice() {
            [c] => (*c, *c),
            [c, kw, k] if kw.eq_ignore_ascii_case("as") => (*c, *k),
            _ => {
                return Err(format!(
                    "data item {item:?} must be \"column\" or \"column as key\""
                ))
            }
        };
        let field = DataField {
            column: column("data column", col)?,
            key: column("data key", key)?,
        };
        if !keys.insert(field.key.clone()) {
            return Err(format!("data key {:?} appears twice", field.key));
        }
        data.push(field);
    }
    Ok(EntityMapping {
        entity_type: e.entity_type,
        schema,
        table,
        id,
        branch,
        data,
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[entity]]
type = "product"
table = "backoffice.products"
id = "sku"
data = ["name", "price_minor as price"]
deleted = "archived"

[[entity]]
type = "price"
table = "backoffice.branch_prices"
id = ["product_id", "branch_id"]
branch = "branch_id"
data = ["product_id", "price_minor"]
"#;

    #[test]
    fn a_mapping_parses_into_typed_entities() {
        let m = SourceMapping::parse(SAMPLE).expect("parses");
        assert_eq!(m.entities.len(), 2);
        let p = &m.entities[0];
        assert_eq!(p.table_name(), "backoffice.products");
        assert_eq!(p.id, ["sku"]);
        assert_eq!(p.data[1].column, "price_minor");
        assert_eq!(p.data[1].key, "price");
        assert_eq!(p.deleted.as_deref(), Some("archived"));
        let b = &m.entities[1];
        assert_eq!(b.id, ["product_id", "branch_id"]);
        assert_eq!(b.branch.as_deref(), Some("branch_id"));
        assert_eq!(b.columns(), ["product_id", "branch_id", "price_minor"]);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("", "no [[entity]]"),
            (
                "[[entity]]\ntype='Product'\ntable='s.t'\nid='i'\ndata=['a']",
                "type must be",
            ),
            (
                "[[entity]]\ntype='p'\ntable='t'\nid='i'\ndata=['a']",
                "schema-qualified",
            ),
            (
                "[[entity]]\ntype='p'\ntable='s.t'\nid='i'\ndata=['a as b', 'c as b']",
                "appears twice",
            ),
            (
                "[[entity]]\ntype='p'\ntable='s.t'\nid='i'\ndata=['a; drop table x']",
                "must be \"column\"",
            ),
            (
                "[[entity]]\ntype='p'\ntable='s.t'\nid='i\"x'\ndata=['a']",
                "not a plain identifier",
            ),
            (
                "[[entity]]\ntype='p'\ntable='s.t'\nid='i'\ndata=['a']\nprice='x'",
                "unknown field",
            ),
            (
                "[[entity]]\ntype='p'\ntable='s.t'\nid='i'\ndata=['a']\n[[entity]]\ntype='p'\ntable='s.u'\nid='i'\ndata=['a']",
                "mapped twice",
            ),
        ];
        for (text, want) in cases {
            let err = SourceMapping::parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
