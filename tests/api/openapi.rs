//! The OpenAPI document is the contract APIM imports: the property-based tester schemathesis
//! throws generated requests at the running broker and checks every answer against it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{FUNCTION_KEY, Setup, jwt_callers, spawn_app_with};

/// schemathesis from `SCHEMATHESIS`, else the virtualenv `scripts/test` installs it in.
fn schemathesis() -> PathBuf {
    std::env::var_os("SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/schemathesis"))
}

#[tokio::test]
async fn every_answer_to_generated_requests_matches_the_openapi_document() {
    // In `jwt` mode the broker enforces the document's security itself (the function key is
    // the host's to check), so schemathesis can also prove that unauthenticated calls fail.
    let app = spawn_app_with(Setup {
        extra_config: jwt_callers("{issuer}", None, 60),
        ..Setup::default()
    })
    .await;
    let bearer = app.idp.caller_token("caller-app").await;
    let program = schemathesis();
    assert!(
        program.exists(),
        "{} is missing: run scripts/test, which installs it",
        program.display()
    );
    let work = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
    let address = app.address.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .current_dir(work.path())
            .args(["run", spec.to_str().unwrap(), "--url", &address])
            // Every check runs, `not_a_server_error` included: a generated request that
            // meets a caught panic (a 500, which the document lists) fails the run. Only
            // `positive_data_acceptance` is off: a schema-valid scope outside a connection's
            // allowed list is rightly a 400.
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args(["--header", &format!("x-functions-key:{FUNCTION_KEY}")])
            .args(["--header", &format!("Authorization:Bearer {bearer}")])
            .args([
                "--max-examples",
                "100",
                "--request-timeout",
                "10",
                "--no-color",
            ])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The broker took real traffic, tokens included, and handed them only to the caller whose
    // token schemathesis presented: generated requests without it never got one.
    let mut app = app;
    assert!(app.terminate().await.success());
    // No answer was a 500, and nothing panicked, whatever schemathesis made of the answers.
    let internal: Vec<String> = app
        .logs()
        .into_iter()
        .filter(|line| line.contains("internal_error") || line.contains("panicked"))
        .collect();
    assert!(internal.is_empty(), "{}", internal.join("\n"));
    let records = app.audit_records();
    let callers: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|record| record["caller"].as_str().unwrap_or("(none)"))
        .collect();
    assert!(
        records.len() >= 2,
        "schemathesis got {} token(s); its positive cases should get several",
        records.len()
    );
    assert_eq!(callers, ["caller-app"].into(), "tokens went to {callers:?}");
    let issued = app.idp.stats().await.token_issued;
    assert!(
        issued >= 2,
        "the broker fetched no token of its own ({issued} issued, one was the caller's)"
    );
}
