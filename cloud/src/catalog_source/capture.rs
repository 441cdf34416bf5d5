//! The DDL `cloud catalog source install` adds and `uninstall` removes (module docs of
//! [`super`] argue why it keeps commit order = version order).
//!
//! On each mapped table: four statement-level triggers (`AFTER INSERT`, `AFTER UPDATE`,
//! `AFTER DELETE` with `REFERENCING` transition tables, and `AFTER TRUNCATE`, which deletes
//! without firing delete triggers and would otherwise be a missed delete), named
//! `possync_<type>_ins|upd|del|trn`. A statement that touches 100 000 rows runs each trigger
//! once, set-based, instead of 100 000 times. In possync's schema: the functions those triggers call, a staging table
//! `possync_source_changes`, a marker table `possync_source_pending` (one row per writing
//! transaction) and the deferred constraint trigger on it that flushes the transaction's
//! changes at commit. Every function is `SECURITY DEFINER` with a fixed `search_path`: the
//! back office's role needs no rights on possync's tables, and no object of the back office
//! can shadow a name the functions use.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use diesel::PgConnection;
use possync_protocol::sha256_hex;

use super::inspect::{CheckedEntity, CheckedSource, ColumnKind};
use super::SourceError;

/// Dollar-quote tag of generated function bodies; mapping names are plain identifiers and
/// type names are `[a-z_]`, so no generated text can contain it.
const TAG: &str = "$possync$";

/// Double-quotes a plain identifier (checked by the mapping parser: no quotes inside).
pub(super) fn q(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// A SQL string literal.
pub(super) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The JSON text of column `col` of row alias `r`, NULL when the value is NULL.
fn value_json(kind: ColumnKind, col: &str) -> String {
    let c = format!("r.{}", q(col));
    match kind {
        // Integer output is the decimal literal serde_json prints.
        ColumnKind::Integer => format!("({c})::text"),
        ColumnKind::Boolean => {
            format!("(CASE {c} WHEN true THEN 'true' WHEN false THEN 'false' END)")
        }
        // to_json escapes `"`, `\`, \b \f \n \r \t and other control characters as \u00xx —
        // exactly serde_json's escapes — and leaves every other character as it is.
        ColumnKind::Text | ColumnKind::Uuid => format!("to_json(({c})::text)::text"),
        // to_json of a date is ISO 8601 whatever the session's DateStyle.
        ColumnKind::Date => format!("to_json({c})::text"),
        ColumnKind::Timestamptz => format!(
            "to_json(to_char(({c}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text"
        ),
    }
}

/// The canonical JSON text of the mapped document of row alias `r`: keys sorted bytewise, no
/// whitespace, NULL columns as `null` (the same text `possync_protocol::canonical_json`
/// prints for the parsed document).
pub(super) fn document_sql(e: &CheckedEntity) -> String {
    let mut fields: Vec<_> = e.mapping.data.iter().collect();
    fields.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    let parts: Vec<String> = fields
        .iter()
        .map(|f| {
            format!(
                "'\"{}\":' || coalesce({}, 'null')",
                f.key,
                value_json(e.kind(&f.column), &f.column)
            )
        })
        .collect();
    format!("('{{' || {} || '}}')", parts.join(" || ',' || "))
}

/// The entity id of row alias `alias`: the id columns' text joined by `:`.
pub(super) fn id_sql(e: &CheckedEntity, alias: &str) -> String {
    let parts: Vec<String> = e
        .mapping
        .id
        .iter()
        .map(|c| format!("({alias}.{})::text", q(c)))
        .collect();
    format!("({})", parts.join(" || ':' || "))
}

fn branch_sql(e: &CheckedEntity) -> String {
    e.mapping
        .branch
        .as_ref()
        .map_or("NULL::text".to_string(), |b| format!("(r.{})::text", q(b)))
}

fn deleted_sql(e: &CheckedEntity) -> String {
    e.mapping.deleted.as_ref().map_or("false".to_string(), |d| {
        format!("coalesce(r.{}, false)", q(d))
    })
}

/// `schema.table` of the mapped table, quoted.
pub(super) fn table_sql(e: &CheckedEntity) -> String {
    format!("{}.{}", q(&e.mapping.schema), q(&e.mapping.table))
}

/// Whether a staged row is the row's state or a tombstone of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Staged {
    /// The row as it is now (a tombstone if its soft-delete column says so).
    State,
    /// The key is gone (row deleted, or its id changed).
    Tombstone,
}

/// `INSERT` staging every row of `from` (a relation with alias `r`, plus an optional `WHERE`).
pub(super) fn stage_sql(
    s: &str,
    e: &CheckedEntity,
    from: &str,
    staged: Staged,
    filter: &str,
) -> String {
    let tombstone = staged == Staged::Tombstone;
    let deleted = if tombstone {
        "true".to_string()
    } else {
        deleted_sql(e)
    };
    format!(
        "INSERT INTO {s}.possync_source_changes \
             (txid, entity_type, entity_id, branch_id, deleted, data, hash) \
         SELECT txid_current(), {ty}, x.id, x.branch, x.deleted, x.doc, \
                encode(sha256(convert_to(x.doc, 'UTF8')), 'hex') \
         FROM (SELECT {id} AS id, {branch} AS branch, {deleted} AS deleted, \
                      CASE WHEN {deleted} THEN 'null' ELSE {doc} END AS doc \
               FROM {from} r {filter}) x",
        ty = lit(&e.mapping.entity_type),
        id = id_sql(e, "r"),
        branch = branch_sql(e),
        doc = document_sql(e),
    )
}

/// SQL condition: the staged row's id or branch is one the catalog cannot hold — the rules of
/// `possync_protocol::valid_entity_id` / `valid_branch_id`. Written as a length test plus a
/// search for one forbidden character: a bounded repetition like `^[!-~]{1,128}$` costs
/// PostgreSQL's regex engine about 10 µs a row (1.2 s for a 100 000-row statement).
pub(super) const BAD_KEY_SQL: &str = "(entity_id IS NULL \
     OR length(entity_id) NOT BETWEEN 1 AND 128 OR entity_id ~ '[^!-~]' \
     OR (branch_id IS NOT NULL AND (length(branch_id) NOT BETWEEN 1 AND 64 \
         OR branch_id ~ '[^a-z0-9_-]')))";

/// The refusal of a staged key the catalog cannot hold, raised with a message naming the
/// value, so the back office's statement fails instead of the change being lost.
pub(super) fn refuse_bad_keys_sql(staged: &str, entity_type: &str) -> String {
    format!(
        "WITH staged AS ({staged} RETURNING entity_id, branch_id) \
         SELECT entity_id, branch_id INTO bad FROM staged WHERE {BAD_KEY_SQL} LIMIT 1; \
         IF FOUND THEN \
           RAISE EXCEPTION 'possync catalog source: {ty} row with id % and branch % cannot \
             enter the catalog (ids: 1-128 printable ASCII without spaces; branches: 1-64 of \
             [a-z0-9_-])', bad.entity_id, bad.branch_id USING ERRCODE = 'check_violation'; \
         END IF;",
        ty = entity_type
    )
}

fn mark_pending(s: &str) -> String {
    format!(
        "INSERT INTO {s}.possync_source_pending (txid) VALUES (txid_current()) \
         ON CONFLICT DO NOTHING;"
    )
}

/// A trigger function. `SECURITY DEFINER` lets it write possync's tables for any back-office
/// role; `EXECUTE` is revoked from `PUBLIC` because attaching a trigger function to a table
/// needs that right (firing does not): otherwise any role able to create a table could attach
/// a capture function to a look-alike table of its own and write the catalog.
fn function(s: &str, name: &str, declare: &str, body: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {s}.{name}() RETURNS trigger LANGUAGE plpgsql \
         SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET work_mem = '64MB' AS {TAG} \
         DECLARE {declare} \
         BEGIN {body} RETURN NULL; END {TAG};\n\
         REVOKE ALL ON FUNCTION {s}.{name}() FROM PUBLIC;\n"
    )
}

/// Names of the four capture functions / triggers of an entity type.
pub(super) fn capture_names(entity_type: &str) -> [String; 4] {
    ["ins", "upd", "del", "trn"].map(|op| format!("possync_{entity_type}_{op}"))
}

/// The shared objects: staging, pending marker, and the flush at commit.
fn shared_sql(s: &str) -> String {
    let flush_body = format!(
        "UPDATE {s}.catalog_counter SET version = version WHERE id = 1 \
           RETURNING version, horizon INTO base, hz; \
         WITH last AS ( \
           SELECT DISTINCT ON (entity_type, entity_id) * FROM {s}.possync_source_changes \
            WHERE txid = NEW.txid ORDER BY entity_type, entity_id, seq DESC \
         ), changed AS ( \
           SELECT l.seq, l.entity_type, l.entity_id, \
                  CASE WHEN l.deleted THEN e.branch_id ELSE l.branch_id END AS branch_id, \
                  l.deleted, l.hash, l.data \
             FROM last l LEFT JOIN {s}.catalog_entities e \
               ON e.entity_type = l.entity_type AND e.entity_id = l.entity_id \
            WHERE CASE WHEN l.deleted THEN e.entity_id IS NOT NULL AND NOT e.deleted \
                       ELSE e.entity_id IS NULL OR e.deleted OR e.hash <> l.hash END \
         ), written AS ( \
           INSERT INTO {s}.catalog_entities AS t \
                  (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at) \
           SELECT entity_type, entity_id, branch_id, base + row_number() OVER (ORDER BY seq), \
                  deleted, hash, data, clock_timestamp() AT TIME ZONE 'UTC' FROM changed \
           ON CONFLICT (entity_type, entity_id) DO UPDATE SET \
             branch_id = EXCLUDED.branch_id, version = EXCLUDED.version, \
             deleted = EXCLUDED.deleted, hash = EXCLUDED.hash, data = EXCLUDED.data, \
             updated_at = EXCLUDED.updated_at \
           WHERE t.branch_id IS NOT DISTINCT FROM EXCLUDED.branch_id \
           RETURNING 1 \
         ) \
         SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM written) \
           INTO n_changed, n_written; \
         IF n_written < n_changed THEN \
           SELECT l.entity_type, l.entity_id, e.branch_id AS old_branch, \
                  l.branch_id AS new_branch INTO moved \
             FROM {s}.possync_source_changes l JOIN {s}.catalog_entities e \
               ON e.entity_type = l.entity_type AND e.entity_id = l.entity_id \
            WHERE l.txid = NEW.txid AND NOT l.deleted \
              AND e.branch_id IS DISTINCT FROM l.branch_id LIMIT 1; \
           RAISE EXCEPTION 'possync catalog source: %/% belongs to branch % in the catalog; its \
             scope cannot change to branch % (delete the row and use a new id)', \
             moved.entity_type, moved.entity_id, coalesce(moved.old_branch, '(global)'), \
             coalesce(moved.new_branch, '(global)') USING ERRCODE = 'check_violation'; \
         END IF; \
         IF n_changed > 0 THEN \
           UPDATE {s}.catalog_counter SET version = base + n_changed WHERE id = 1; \
         END IF; \
         DELETE FROM {s}.possync_source_changes WHERE txid = NEW.txid; \
         DELETE FROM {s}.possync_source_pending WHERE txid = NEW.txid;"
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.possync_source_changes ( \
            seq BIGSERIAL PRIMARY KEY, \
            txid BIGINT NOT NULL, \
            entity_type TEXT COLLATE \"C\" NOT NULL, \
            entity_id TEXT COLLATE \"C\", \
            branch_id TEXT COLLATE \"C\", \
            deleted BOOLEAN NOT NULL, \
            data TEXT NOT NULL, \
            hash TEXT NOT NULL);\n\
         CREATE INDEX IF NOT EXISTS possync_source_changes_txid_idx \
            ON {s}.possync_source_changes (txid, entity_type, entity_id, seq);\n\
         CREATE TABLE IF NOT EXISTS {s}.possync_source_pending (txid BIGINT PRIMARY KEY);\n\
         {flush}\
         DROP TRIGGER IF EXISTS possync_source_flush ON {s}.possync_source_pending;\n\
         CREATE CONSTRAINT TRIGGER possync_source_flush AFTER INSERT ON {s}.possync_source_pending \
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
            EXECUTE FUNCTION {s}.possync_source_flush();\n",
        flush = function(
            s,
            "possync_source_flush",
            "base BIGINT; hz BIGINT; n_changed BIGINT; n_written BIGINT; moved RECORD;",
            &flush_body
        ),
    )
}

/// The DDL of one mapped type (functions, then triggers), re-runnable.
pub(super) fn entity_sql(s: &str, e: &CheckedEntity) -> String {
    let t = table_sql(e);
    let ty = &e.mapping.entity_type;
    let [ins, upd, del, trn] = capture_names(ty);
    let ins_body = format!(
        "{} {}",
        refuse_bad_keys_sql(&stage_sql(s, e, "possync_new", Staged::State, ""), ty),
        mark_pending(s)
    );
    // A row whose id changed is a delete of the old key and an upsert of the new one.
    let gone = format!(
        "WHERE NOT EXISTS (SELECT 1 FROM possync_new n WHERE {} = {})",
        id_sql(e, "n"),
        id_sql(e, "r")
    );
    let upd_body = format!(
        "{}; {} {}",
        stage_sql(s, e, "possync_old", Staged::Tombstone, &gone),
        refuse_bad_keys_sql(&stage_sql(s, e, "possync_new", Staged::State, ""), ty),
        mark_pending(s)
    );
    let del_body = format!(
        "{}; {}",
        stage_sql(s, e, "possync_old", Staged::Tombstone, ""),
        mark_pending(s)
    );
    // TRUNCATE has no transition table: every key of the type the catalog holds live, and
    // every key this transaction staged before the truncate, is gone.
    let trn_body = format!(
        "INSERT INTO {s}.possync_source_changes \
             (txid, entity_type, entity_id, branch_id, deleted, data, hash) \
         SELECT txid_current(), k.entity_type, k.entity_id, k.branch_id, true, 'null', \
                encode(sha256(convert_to('null', 'UTF8')), 'hex') \
         FROM (SELECT entity_type, entity_id, branch_id FROM {s}.catalog_entities \
               WHERE entity_type = {ty} AND NOT deleted \
               UNION SELECT entity_type, entity_id, branch_id FROM {s}.possync_source_changes \
               WHERE txid = txid_current() AND entity_type = {ty}) k; {}",
        mark_pending(s),
        ty = lit(ty),
    );
    let mut sql = String::new();
    sql.push_str(&function(s, &ins, "bad RECORD;", &ins_body));
    sql.push_str(&function(s, &upd, "bad RECORD;", &upd_body));
    sql.push_str(&function(s, &del, "", &del_body));
    sql.push_str(&function(s, &trn, "", &trn_body));
    for (name, event, transition) in [
        (&ins, "INSERT", "NEW TABLE AS possync_new"),
        (
            &upd,
            "UPDATE",
            "OLD TABLE AS possync_old NEW TABLE AS possync_new",
        ),
        (&del, "DELETE", "OLD TABLE AS possync_old"),
    ] {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {name} ON {t};\n\
             CREATE TRIGGER {name} AFTER {event} ON {t} REFERENCING {transition} \
             FOR EACH STATEMENT EXECUTE FUNCTION {s}.{name}();\n"
        ));
    }
    sql.push_str(&format!(
        "DROP TRIGGER IF EXISTS {trn} ON {t};\n\
         CREATE TRIGGER {trn} AFTER TRUNCATE ON {t} \
         FOR EACH STATEMENT EXECUTE FUNCTION {s}.{trn}();\n"
    ));
    sql
}

/// The fingerprint install records on an entity's insert function: `serve` refuses a mapping
/// whose triggers were generated from different text.
fn fingerprint(s: &str, e: &CheckedEntity) -> String {
    format!(
        "possync catalog source {}",
        sha256_hex(entity_sql(s, e).as_bytes())
    )
}

/// Installs (or re-installs) the capture of every mapped type in one transaction.
pub fn install(conn: &mut PgConnection, source: &CheckedSource) -> Result<(), SourceError> {
    let s = q(&source.possync_schema);
    conn.transaction(|c| -> Result<(), SourceError> {
        c.batch_execute(&shared_sql(&s))?;
        for e in &source.entities {
            c.batch_execute(&entity_sql(&s, e))?;
            let [ins, ..] = capture_names(&e.mapping.entity_type);
            c.batch_execute(&format!(
                "COMMENT ON FUNCTION {s}.{ins}() IS {};",
                lit(&fingerprint(&s, e))
            ))?;
        }
        Ok(())
    })
}

#[derive(QueryableByName)]
struct MaybeText {
    #[diesel(sql_type = Nullable<Text>)]
    value: Option<String>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Removes what [`install`] added for these types; the shared objects go with the last
/// capture function. Catalog entities already written stay (they are possync's data).
pub fn uninstall(conn: &mut PgConnection, source: &CheckedSource) -> Result<(), SourceError> {
    let s = q(&source.possync_schema);
    conn.transaction(|c| -> Result<(), SourceError> {
        for e in &source.entities {
            let t = table_sql(e);
            for name in capture_names(&e.mapping.entity_type) {
                c.batch_execute(&format!(
                    "DROP TRIGGER IF EXISTS {name} ON {t};\n\
                     DROP FUNCTION IF EXISTS {s}.{name}();"
                ))?;
            }
        }
        let left: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname ~ '^possync_[a-z_]+_(ins|upd|del|trn)$'",
        )
        .bind::<Text, _>(&source.possync_schema)
        .get_result(c)?;
        if left.n == 0 {
            c.batch_execute(&format!(
                "DROP TABLE IF EXISTS {s}.possync_source_pending;\n\
                 DROP FUNCTION IF EXISTS {s}.possync_source_flush();\n\
                 DROP TABLE IF EXISTS {s}.possync_source_changes;"
            ))?;
        }
        Ok(())
    })
}

/// Whether the installed capture is the one this mapping generates: every type's four
/// triggers exist on its table and its fingerprint matches.
pub fn verify_installed(
    conn: &mut PgConnection,
    source: &CheckedSource,
) -> Result<(), SourceError> {
    let s = q(&source.possync_schema);
    for e in &source.entities {
        let [ins, upd, del, trn] = capture_names(&e.mapping.entity_type);
        let comment: MaybeText =
            diesel::sql_query("SELECT obj_description(to_regprocedure($1), 'pg_proc') AS value")
                .bind::<Text, _>(format!("{s}.{ins}()"))
                .get_result(conn)?;
        if comment.value.as_deref() != Some(fingerprint(&s, e).as_str()) {
            return Err(SourceError::NotInstalled(format!(
                "the capture of {} on {} is missing or was installed from another mapping",
                e.mapping.entity_type,
                e.mapping.table_name()
            )));
        }
        let triggers: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_trigger \
             WHERE tgrelid = to_regclass($1) AND tgname IN ($2, $3, $4, $5) \
               AND tgenabled <> 'D'",
        )
        .bind::<Text, _>(table_sql(e))
        .bind::<Text, _>(&ins)
        .bind::<Text, _>(&upd)
        .bind::<Text, _>(&del)
        .bind::<Text, _>(&trn)
        .get_result(conn)?;
        if triggers.n != 4 {
            return Err(SourceError::NotInstalled(format!(
                "{} of the 4 capture triggers of {} are enabled on {}",
                triggers.n,
                e.mapping.entity_type,
                e.mapping.table_name()
            )));
        }
    }
    Ok(())
}
