//! The `postgres` store's SQL: each statement with the table name in
//! place, and the check that the name may be put there as it is.

/// The statements, with the table name in place. Each is prepared once per
/// connection (the pool's statement cache).
pub(super) struct Statements {
    pub(super) create: String,
    pub(super) load: String,
    pub(super) lock: String,
    pub(super) insert: String,
    pub(super) update: String,
    pub(super) update_if_version: String,
    pub(super) delete: String,
    pub(super) touch: String,
    pub(super) sweep_idle: String,
    pub(super) page: String,
    pub(super) delete_many: String,
    pub(super) list: String,
    pub(super) ping: String,
}

impl Statements {
    /// `max_record_bytes`: a record longer is not sent by `load`, `lock`,
    /// `page` and `list`, which send its length instead (see
    /// `PostgresStore::over_bound`).
    pub(super) fn new(table: &str, max_record_bytes: usize) -> Statements {
        // `timestamp` has no time zone: every atime is written and compared
        // as UTC, whatever the server's TimeZone setting.
        const ATIME: &str = "to_timestamp($2::bigint) AT TIME ZONE 'UTC'";
        // The end of a record as this store writes it, and its atime.
        const TOUCHED: &str = r#""atime":[0-9]+(,"ip":"[^"\\]*","ver":[0-9]+\}$)"#;
        const TOUCHED_ATIME: &str = r#""atime":([0-9]+),"ip":"[^"\\]*","ver":[0-9]+\}$"#;
        // A record's data within the bound (else NULL), then its length.
        // `octet_length` of a large (TOASTed) value is read from its
        // header, without fetching the value.
        let bounded = format!(
            "CASE WHEN octet_length(data::text) <= {max_record_bytes} THEN data END, \
             octet_length(data::text)"
        );
        Statements {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 session_id char(128) UNIQUE NOT NULL, \
                 atime timestamp NOT NULL default current_timestamp, \
                 data text)"
            ),
            load: format!("SELECT {bounded} FROM {table} WHERE session_id = $1"),
            lock: format!("SELECT {bounded} FROM {table} WHERE session_id = $1 FOR UPDATE"),
            insert: format!(
                "INSERT INTO {table} (session_id, atime, data) VALUES ($1, {ATIME}, $3) \
                 ON CONFLICT (session_id) DO NOTHING"
            ),
            update: format!("UPDATE {table} SET atime = {ATIME}, data = $3 WHERE session_id = $1"),
            // A touch since the caller's load leaves `ver` as it was and
            // may have stored a later atime than the caller's: kept, in
            // the column and in the JSON, which this store writes with the
            // column's value (the JSON is edited only then, as the touch
            // edits it). The stored atime comes back. Read as a `timestamp`:
            // a `timestamptz` column made by hand holds the UTC wall-clock
            // time this store writes as the session's `TimeZone`, whose
            // offset its epoch would count.
            update_if_version: format!(
                "UPDATE {table} SET atime = GREATEST(atime, {ATIME}), \
                 data = CASE WHEN atime > {ATIME} \
                 THEN regexp_replace($3::text, '{TOUCHED}', \
                 '\"atime\":' || extract(epoch FROM atime::timestamp)::bigint || '\\1') \
                 ELSE $3::text END \
                 WHERE session_id = $1 AND data::jsonb ->> 'ver' = $4::text \
                 RETURNING extract(epoch FROM atime::timestamp)::bigint"
            ),
            delete: format!("DELETE FROM {table} WHERE session_id = $1"),
            // A touch in one statement: the record's atime inside the JSON
            // and the column move together, and never backwards. The JSON
            // is edited as text, where this store writes `atime`: right
            // before the closing `"ip"` and `"ver"` (a record's field
            // order). Not through `jsonb`, which would write the data out
            // again in its own way (1e16 as 10000000000000000, -0.0 as 0):
            // a touch changes the access time only. The stored atime is
            // read as a numeric: a u64 past bigint (written by hand) failed
            // every touch of the session. A record in another
            // layout is not matched; the caller touches it by `modify`.
            touch: format!(
                "UPDATE {table} SET \
                 data = regexp_replace(data, '{TOUCHED}', \
                 '\"atime\":' || GREATEST(substring(data FROM '{TOUCHED_ATIME}')::numeric, \
                 $2::bigint) || '\\1'), \
                 atime = GREATEST(atime, {ATIME}) \
                 WHERE session_id = $1 AND data ~ '{TOUCHED}'"
            ),
            // Locks only the rows it deletes, skips rows another
            // transaction holds, and re-checks `atime` on rows updated since
            // its snapshot (FOR UPDATE), so a session touched meanwhile lives.
            sweep_idle: format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
                 SELECT ctid FROM {table} WHERE atime < to_timestamp($1::bigint) AT TIME ZONE 'UTC' \
                 LIMIT $2 FOR UPDATE SKIP LOCKED))"
            ),
            page: format!(
                "SELECT session_id, {bounded} FROM {table} WHERE session_id > $1 \
                 ORDER BY session_id LIMIT $2"
            ),
            delete_many: format!("DELETE FROM {table} WHERE session_id = ANY($1::bpchar[])"),
            list: format!("SELECT session_id, {bounded} FROM {table}"),
            // The table, not only the server: a table dropped (or its
            // privileges revoked) under a running proxy fails every
            // request, and `/healthz` must say so.
            ping: format!("SELECT 1 FROM {table} LIMIT 0"),
        }
    }
}

/// `name` or `schema.name`, each an unquoted SQL identifier, so it can be
/// put into statements as it is (and means what web.py's name means).
/// Config validation checks `store.table` with it too.
pub(crate) fn is_plain_identifier(table: &str) -> bool {
    let part = |name: &str| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= 63
    };
    match table.split_once('.') {
        Some((schema, name)) => part(schema) && part(name),
        None => part(table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement that reads `data` sends it only within the bound,
    /// with its length: a listing as much as a load.
    #[test]
    fn every_statement_that_reads_data_bounds_it() {
        let sql = Statements::new("sessions", 4096);
        for read in [&sql.load, &sql.lock, &sql.page, &sql.list] {
            let bounded = concat!(
                "CASE WHEN octet_length(data::text) <= 4096 THEN data END, ",
                "octet_length(data::text) FROM"
            );
            assert!(read.contains(bounded), "{read}");
            assert!(!read.contains(", data FROM"), "{read}");
        }
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(is_plain_identifier("sessions"));
        assert!(is_plain_identifier("app.web_sessions2"));
        assert!(!is_plain_identifier("sessions; drop table x"));
        assert!(!is_plain_identifier("2sessions"));
        assert!(!is_plain_identifier("a.b.c"));
        assert!(!is_plain_identifier(""));
    }
}
