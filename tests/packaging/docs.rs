//! The migrations create the table, the publication and a least-privilege role; the README
//! keeps its two commands and the docs explain every packaging file.

use crate::files::*;

#[test]
fn migrations_create_the_table_the_publication_and_a_least_privilege_role() {
    let table = read("migrations/001_outbox.sql");
    let create = &table[table
        .find("CREATE TABLE IF NOT EXISTS public.outbox (")
        .expect("CREATE TABLE public.outbox")..];
    let create = &create[..create.find(");").expect("end of CREATE TABLE")];
    let columns: Vec<&str> = create
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("--") && !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let defaults = minimal_config();
    for column in defaults.outbox[0].required_columns() {
        assert!(
            columns.contains(&column),
            "001_outbox.sql lacks column {column} that the default [[outbox]] reads: {columns:?}"
        );
    }
    assert!(
        create
            .lines()
            .map(str::trim)
            .any(|l| l.starts_with("id ") && l.contains("uuid PRIMARY KEY")),
        "the event id is not the primary key: {create}"
    );

    let role = read("migrations/002_relay_role.sql");
    let code: String = role
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "CREATE ROLE outbox_relay WITH LOGIN REPLICATION",
        "GRANT SELECT ON public.outbox TO outbox_relay",
        "GRANT USAGE ON SCHEMA public TO outbox_relay",
        "GRANT CONNECT ON DATABASE %I TO outbox_relay",
        &format!(
            "CREATE PUBLICATION {} FOR TABLE public.outbox WITH (publish = 'insert', publish_via_partition_root = true)",
            defaults.postgres.publication
        ),
    ] {
        assert!(
            code.contains(needle),
            "002_relay_role.sql does not run: {needle}"
        );
    }
    // Least privilege: nothing beyond reading the outbox and writing the relay's own record
    // of the slots it created (the lost-slot guard), never deleting it.
    let guard_grant = "GRANT SELECT, INSERT, UPDATE ON public.outbox_relay_slots TO outbox_relay;";
    assert!(
        code.contains(guard_grant),
        "002_relay_role.sql does not run: {guard_grant}"
    );
    let code = code.replace(guard_grant, "");
    for excess in [
        "SUPERUSER",
        "GRANT ALL",
        "INSERT",
        "UPDATE",
        "DELETE",
        "OWNER TO",
    ] {
        assert!(!code.contains(excess), "002_relay_role.sql runs {excess}");
    }
}

#[test]
fn readme_keeps_the_two_commands_and_the_docs_explain_every_packaging_file() {
    let readme = read("README.md");
    let quick_start = &readme[readme.find("## Quick start").expect("Quick start")..];
    let block = &quick_start[quick_start.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").unwrap()];
    let commands: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["scripts/demo.sh", "scripts/test.sh"]);
    // The README is one page; the reference for operators is docs/operations.md.
    let doc = read("docs/operations.md");
    for file in files_in("docker", &[""]) {
        assert!(
            doc.contains(&format!("`{file}`")),
            "docs/operations.md does not explain {file}"
        );
    }
    for needle in [
        "/healthz",
        "/readyz",
        "outbox-relay check",
        "outbox-relay status",
        "--json",
    ] {
        assert!(
            doc.contains(needle),
            "docs/operations.md does not mention {needle}"
        );
    }
}
