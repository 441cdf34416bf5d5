//! `cloud catalog source check`: the mapping against the database's catalog (tables, columns,
//! column types, primary keys), every problem reported, none hidden behind the first.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel::PgConnection;

use super::mapping::{EntityMapping, SourceMapping};
use super::{Problem, ProblemCode, SourceError};

/// How a column's value becomes JSON; only types with one exact JSON form are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// `smallint`, `integer`, `bigint`: a JSON integer.
    Integer,
    /// `text`, `varchar`, `char(n)`: a JSON string.
    Text,
    /// `uuid`: its canonical text as a JSON string.
    Uuid,
    /// `boolean`: `true` / `false`.
    Boolean,
    /// `date`: `"YYYY-MM-DD"`.
    Date,
    /// `timestamptz`: RFC 3339 UTC with microseconds, `"YYYY-MM-DDTHH:MM:SS.ffffffZ"`.
    Timestamptz,
}

impl ColumnKind {
    fn of(type_name: &str) -> Result<ColumnKind, &'static str> {
        Ok(match type_name {
            "int2" | "int4" | "int8" => ColumnKind::Integer,
            "text" | "varchar" | "bpchar" => ColumnKind::Text,
            "uuid" => ColumnKind::Uuid,
            "bool" => ColumnKind::Boolean,
            "date" => ColumnKind::Date,
            "timestamptz" => ColumnKind::Timestamptz,
            "numeric" | "money" => {
                return Err(
                    "decimal amounts cannot be carried exactly; store money as integer \
                            minor units (bigint), or map a view's integer column",
                )
            }
            "float4" | "float8" => {
                return Err("floating-point text differs between PostgreSQL and JSON \
                            printers, so the document hash could not be reproduced; use \
                            integers (e.g. basis points for a tax rate)")
            }
            "json" | "jsonb" => {
                return Err(
                    "JSON columns cannot be canonicalised inside the trigger; map \
                            their fields as columns",
                )
            }
            "timestamp" => {
                return Err("a timestamp without time zone names no instant; use timestamptz")
            }
            _ => return Err("this type has no exact JSON form in a catalog document"),
        })
    }
}

/// One mapped type whose columns were found with supported types.
#[derive(Debug, Clone)]
pub struct CheckedEntity {
    /// The mapping.
    pub mapping: EntityMapping,
    /// Kind of every mapped column.
    pub kinds: HashMap<String, ColumnKind>,
    /// SQL type of every mapped column as `format_type` prints it (for casts).
    pub sql_types: HashMap<String, String>,
}

impl CheckedEntity {
    /// The kind of a mapped column (checked to exist).
    pub fn kind(&self, column: &str) -> ColumnKind {
        self.kinds.get(column).copied().unwrap_or(ColumnKind::Text)
    }
}

/// A mapping that passed `check`, with the schema possync's own tables live in.
#[derive(Debug, Clone)]
pub struct CheckedSource {
    /// The mapped types.
    pub entities: Vec<CheckedEntity>,
    /// The schema holding `catalog_entities` (the cloud connection's `current_schema()`).
    pub possync_schema: String,
}

#[derive(QueryableByName)]
struct OneText {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct ColumnRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    type_name: String,
    #[diesel(sql_type = Text)]
    shown: String,
}

fn problem(code: ProblemCode, e: &EntityMapping, message: String) -> Problem {
    Problem {
        code,
        entity_type: e.entity_type.clone(),
        message,
    }
}

/// Checks `mapping` against the database and returns it with its column types, or every
/// problem found.
pub fn check(
    conn: &mut PgConnection,
    mapping: &SourceMapping,
) -> Result<CheckedSource, SourceError> {
    let mut problems = Vec::new();
    let encoding = diesel::sql_query("SELECT current_setting('server_encoding') AS value")
        .get_result::<OneText>(conn)?
        .value;
    if encoding != "UTF8" {
        problems.push(Problem {
            code: ProblemCode::NotUtf8,
            entity_type: String::new(),
            message: format!(
                "the database encoding is {encoding}; document hashes are over UTF-8 text"
            ),
        });
    }
    let possync_schema = diesel::sql_query("SELECT current_schema()::text AS value")
        .get_result::<OneText>(conn)?
        .value;
    let mut entities = Vec::new();
    for e in &mapping.entities {
        if let Some(checked) = check_entity(conn, e, &mut problems)? {
            entities.push(checked);
        }
    }
    if problems.is_empty() {
        Ok(CheckedSource {
            entities,
            possync_schema,
        })
    } else {
        Err(SourceError::Problems(problems))
    }
}

fn check_entity(
    conn: &mut PgConnection,
    e: &EntityMapping,
    problems: &mut Vec<Problem>,
) -> Result<Option<CheckedEntity>, SourceError> {
    let kind: Option<OneText> = diesel::sql_query(
        "SELECT c.relkind::text AS value FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind::<Text, _>(&e.schema)
    .bind::<Text, _>(&e.table)
    .get_result(conn)
    .optional()?;
    match kind.map(|k| k.value) {
        Some(k) if k == "r" => {}
        Some(k) => {
            problems.push(problem(
                ProblemCode::NoTable,
                e,
                format!(
                    "{} is not a plain table (relkind {k}); triggers capture plain tables only",
                    e.table_name()
                ),
            ));
            return Ok(None);
        }
        None => {
            problems.push(problem(
                ProblemCode::NoTable,
                e,
                format!("table {} does not exist", e.table_name()),
            ));
            return Ok(None);
        }
    }
    let columns: Vec<ColumnRow> = diesel::sql_query(
        "SELECT a.attname::text AS name, bt.typname::text AS type_name, \
                format_type(a.atttypid, a.atttypmod) AS shown \
         FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_type t ON t.oid = a.atttypid \
         JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind::<Text, _>(&e.schema)
    .bind::<Text, _>(&e.table)
    .load(conn)?;
    let by_name: HashMap<&str, &ColumnRow> = columns.iter().map(|c| (c.name.as_str(), c)).collect();
    let before = problems.len();
    let mut kinds = HashMap::new();
    let mut sql_types = HashMap::new();
    for col in e.columns() {
        let Some(row) = by_name.get(col) else {
            problems.push(problem(
                ProblemCode::NoColumn,
                e,
                format!("column {col} does not exist in {}", e.table_name()),
            ));
            continue;
        };
        match ColumnKind::of(&row.type_name) {
            Ok(k) => {
                kinds.insert(col.to_string(), k);
                sql_types.insert(col.to_string(), row.shown.clone());
            }
            Err(why) => problems.push(problem(
                ProblemCode::UnsupportedType,
                e,
                format!("column {col} is {}: {why}", row.shown),
            )),
        }
    }
    let want = |col: &str, ok: &[ColumnKind], what: &str, problems: &mut Vec<Problem>| {
        if let Some(k) = kinds.get(col) {
            if !ok.contains(k) {
                problems.push(problem(
                    ProblemCode::UnsupportedType,
                    e,
                    format!(
                        "{what} column {col} is {}; it must be {}",
                        by_name.get(col).map_or("?", |r| r.shown.as_str()),
                        match what {
                            "id" => "an integer, text or uuid",
                            "branch" => "text",
                            _ => "boolean",
                        }
                    ),
                ));
            }
        }
    };
    for col in &e.id {
        want(
            col,
            &[ColumnKind::Integer, ColumnKind::Text, ColumnKind::Uuid],
            "id",
            problems,
        );
    }
    if let Some(b) = &e.branch {
        want(b, &[ColumnKind::Text], "branch", problems);
    }
    if let Some(d) = &e.deleted {
        want(d, &[ColumnKind::Boolean], "deleted", problems);
    }
    let pk: Vec<OneText> = diesel::sql_query(
        "SELECT a.attname::text AS value FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
         WHERE i.indisprimary AND n.nspname = $1 AND c.relname = $2",
    )
    .bind::<Text, _>(&e.schema)
    .bind::<Text, _>(&e.table)
    .load(conn)?;
    let pk: HashSet<&str> = pk.iter().map(|r| r.value.as_str()).collect();
    let id: HashSet<&str> = e.id.iter().map(String::as_str).collect();
    if pk != id {
        let mut shown: Vec<&str> = pk.into_iter().collect();
        shown.sort_unstable();
        problems.push(problem(
            ProblemCode::IdNotPrimaryKey,
            e,
            if shown.is_empty() {
                format!(
                    "{} has no primary key; an entity id must name exactly one row",
                    e.table_name()
                )
            } else {
                format!(
                    "id [{}] is not the primary key of {} ([{}]); an entity id must name \
                     exactly one row",
                    e.id.join(", "),
                    e.table_name(),
                    shown.join(", ")
                )
            },
        ));
    }
    if problems.len() > before {
        return Ok(None);
    }
    Ok(Some(CheckedEntity {
        mapping: e.clone(),
        kinds,
        sql_types,
    }))
}
